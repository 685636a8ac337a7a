"""Part 7: a decode step with a bf16 KV cache against fp32."""

from __future__ import annotations

import json
import statistics
import tempfile

import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.bench_cpu_inference import models
from tequila_jax.inference import InferenceSettings, PackedLlama
from tequila_jax.io import tqj
from tequila_jax.quant import QuantConfig

TITLE = "part 7: bf16 KV cache"


def bench_kv_cache(config: str, rounds: int, positions=(128, 1024, 4096)
                   ) -> list[dict]:
  """One decode step at each of `positions` with an fp32 and a bf16 KV cache
  (same per-channel model, SmolLM2 vocabulary, `auto`), round robin: the
  median time of each, the per-round ratio's median and range, and the
  logits' relative difference."""
  capacity = max(positions) + 8
  with tempfile.TemporaryDirectory() as tmp:
    models.random_export(config, f"{tmp}/m.tqj", vocab_size=49152,
                         max_seq_len=capacity, tie_embeddings=True,
                         quant=QuantConfig("tequila", "per_channel"))
    export = tqj.read_export(f"{tmp}/m.tqj")
  kv_models = {k: PackedLlama(export, InferenceSettings("auto", kv_dtype=k))
               for k in ("float32", "bfloat16")}
  del export
  ids = np.random.default_rng(0).integers(10, 40000, capacity)
  rows = []
  for n in positions:
    filled = {k: m.decode(jnp.asarray([ids[:n]]), m.init_cache(1, capacity))[1]
              for k, m in kv_models.items()}
    token = jnp.asarray([[ids[n]]])
    logits = {k: models.timed_step(m, token, filled[k])[1]
              for k, m in kv_models.items()}
    times = common.round_robin(
        {k: lambda m=m, filled=filled[k]: models.timed_step(m, token, filled)[0]
         for k, m in kv_models.items()}, rounds)
    ratios = sorted(a / b for a, b in zip(times["float32"], times["bfloat16"]))
    rows.append(dict(
        position=n, f32_ms=1e3 * statistics.median(times["float32"]),
        bf16_ms=1e3 * statistics.median(times["bfloat16"]),
        speedup_median=statistics.median(ratios),
        speedup_range=(ratios[0], ratios[-1]),
        logits_rel_error=float(jnp.linalg.norm(
            logits["bfloat16"] - logits["float32"]) / jnp.linalg.norm(
                logits["float32"]))))
    print(json.dumps(rows[-1]), flush=True)
    del filled
  return rows


def add_flags(group) -> None:
  group.add_argument("--kv_rounds", type=int, default=8,
                     help="rounds of the fp32 vs bf16 KV cache steps (0: skip)")


def wanted(args) -> bool:
  return bool(args.kv_rounds)


def run(args) -> list[dict]:
  return bench_kv_cache(args.decode_config, args.kv_rounds)


def render(results: dict, decode_config: str) -> list[str]:
  del decode_config  # the part's own per-channel SmolLM2-vocabulary model
  rows = results.get("kv_cache", [])
  if not rows:
    return []
  return ["One decode step with a bf16 KV cache against fp32 (`kv_dtype`"
          "; per-channel, SmolLM2 vocabulary; median ms, fp32 / bf16 per "
          "round: median and range; logits' relative difference):", "",
          "| position | fp32 ms | bf16 ms | speed-up | range | logits |",
          "|---|---|---|---|---|---|"] + [
              f"| {r['position']} | {r['f32_ms']:.1f} | {r['bf16_ms']:.1f} | "
              f"{r['speedup_median']:.2f}x | {r['speedup_range'][0]:.2f}–"
              f"{r['speedup_range'][1]:.2f}x | {r['logits_rel_error']:.1e} |"
              for r in rows]
