"""Part 6: what PackedLlama holds per layout, strategy, embedding and alpha
dtype."""

from __future__ import annotations

import gc
import json
import pathlib
import tempfile

from experiments.bench_cpu_inference import models
from tequila_jax.inference import InferenceSettings, PackedLlama
from tequila_jax.quant import QuantConfig

TITLE = "part 6: memory"

MEMORY_VARIANTS = (  # strategy, embed, alpha_dtype
    ("lut", "float", "float32"), ("lut", "float", "float16"),
    ("int8", "float", "float32"), ("auto", "float", "float32"),
    ("lut", "int8", "float16"), ("auto", "int8", "float16"))


def bench_memory(config: str,
                 layouts=(("per_group", 128), ("per_group", 256),
                          ("per_channel", None))) -> list[dict]:
  """What `PackedLlama` holds (`memory()`) for a random-init bf16 export of
  `config`'s architecture, per layout and `MEMORY_VARIANTS`."""
  rows = []
  for granularity, group in layouts:
    quant = QuantConfig("tequila", granularity, group_size=group or 128)
    with tempfile.TemporaryDirectory() as tmp:
      models.random_export(config, f"{tmp}/m.tqj", float_dtype="bfloat16",
                           quant=quant)
      for strategy, embed, alpha_dtype in MEMORY_VARIANTS:
        m = PackedLlama.load(f"{tmp}/m.tqj",
                             InferenceSettings(strategy, embed, alpha_dtype))
        rows.append(dict(layout=f"G={group}" if group else granularity,
                         strategy=strategy, embed=embed if embed == "int8"
                         else "bf16", alpha=alpha_dtype, **m.memory()))
        del m  # a model and its compiled step form a cycle: collect it now
        gc.collect()
        print(json.dumps(rows[-1]), flush=True)
  return rows


def add_flags(group) -> None:
  group.add_argument("--skip_memory", action="store_true")


def wanted(args) -> bool:
  return not args.skip_memory


def run(args) -> list[dict]:
  return bench_memory(args.decode_config)


def render(results: dict, decode_config: str) -> list[str]:
  memory = results.get("memory", [])
  if not memory:
    return []
  return [f"What PackedLlama holds, {pathlib.Path(decode_config).name}"
          " architecture, bf16 export (MiB; bits per ternary weight: the "
          "decode form = 2-bit bytes + alpha + c; all held adds `int8`/"
          "`auto`'s int8 codes for batched calls):", "",
          "| layout | strategy | embedding/head | alpha | ternary MiB | "
          "embedding/head MiB | total MiB | bits/weight (decode) | "
          "bits/weight (all held) |", "|---|---|---|---|---|---|---|---|---|"
          ] + [f"| {r['layout']} | {r['strategy']} | {r['embed']} | "
               f"{r['alpha']} | {r['ternary'] / 2**20:.0f} | "
               f"{r['embed_head'] / 2**20:.0f} | {r['total'] / 2**20:.0f} | "
               f"{r['bits_per_ternary_weight']:.3f} | "
               f"{r['bits_per_ternary_weight_all_held']:.3f} |"
               for r in memory]
