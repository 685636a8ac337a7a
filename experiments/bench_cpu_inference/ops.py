"""Part 5: where a decode step's time goes, per op, beside each op's
bandwidth floor."""

from __future__ import annotations

import functools
import json
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.bench_cpu_inference import models
from tequila_jax.inference import InferenceSettings, PackedLlama, kernels
from tequila_jax.inference import model as inference_model
from tequila_jax.layers import attend_cache
from tequila_jax.quant import QuantConfig

TITLE = "part 5: per-op profile of a decode step"


def read_bandwidth(mib: int = 512, iters: int = 10) -> float:
  """Bytes/s that a jitted sum over a `mib` MiB fp32 array reads (median)."""
  a = jnp.ones((mib * 2**18,), jnp.float32)
  t = common.time_side_by_side({"sum": (jax.jit(jnp.sum), (a,))},
                               iters)["sum"]
  return a.nbytes / t


def bench_decode_ops(config: str, rounds: int, position: int = 128,
                     layouts=(("per_channel", None), ("per_group", 128))
                     ) -> list[dict]:
  """Where a decode step's time goes: one step at `position` (cache of
  1,024) and each op of it timed alone with the model's own arrays (layer
  fused projections through `ternary_linear` over every layer's arrays in
  one executable, attention over the attended prefix likewise, the head),
  all round robin; `rest` is the step minus
  the ops (norms, RoPE, cache writes, embedding, dispatch). Floor: the
  bytes an op reads at the best read rate seen (`read_bandwidth`'s sum, or
  the head's dot where faster). 1B-class shape with the SmolLM2
  vocabulary (tied fp32 embedding), `auto` (= `lut` at one token)."""
  bandwidth = read_bandwidth()
  kernel_jit = functools.partial(jax.jit,
                                 compiler_options=kernels.CPU_COMPILER_OPTIONS)
  rows = []
  for granularity, group in layouts:
    quant = QuantConfig("tequila", granularity, group_size=group or 128)
    with tempfile.TemporaryDirectory() as tmp:
      cfg = models.random_export(config, f"{tmp}/m.tqj", vocab_size=49152,
                                 max_seq_len=1024, tie_embeddings=True,
                                 quant=quant)
      model = PackedLlama.load(f"{tmp}/m.tqj", InferenceSettings("auto"))
    layers = model.params["layers"]
    rng = np.random.default_rng(0)
    vec = lambda n: jnp.asarray(rng.normal(size=(1, n)), jnp.float32)  # noqa: E731
    # Each op over all layers' own arrays in one executable, as in the step
    # (no per-call dispatch; each layer's weights read from memory).
    every_layer = lambda op: kernel_jit(  # noqa: E731
        lambda x, per_layer: sum(op(x, a) for a in per_layer))
    fns, reads = {}, {}
    for name, entry in layers[0].items():
      d_in = entry["lut"].shape[0] * entry["lut"].shape[2] * 4
      fns[name] = (every_layer(model.linear),
                   (vec(d_in), [layer[name] for layer in layers]))
      reads[name] = cfg.num_layers * sum(entry[k].nbytes
                                         for k in ("lut", "alpha", "c"))
    attend = max(inference_model.ATTEND_MIN, 1 << position.bit_length())
    # The decoders' own attention over their heads-major cache's prefix.
    kv = [jnp.asarray(rng.normal(size=(2, 1, cfg.num_kv_heads, attend,
                                       cfg.head_dim)), jnp.float32)
          for _ in range(cfg.num_layers)]
    q = jnp.asarray(rng.normal(size=(1, 1, cfg.num_heads, cfg.head_dim)),
                    jnp.float32)
    fns["attention"] = (every_layer(lambda q, kv: attend_cache(
        q, kv[0], kv[1], jnp.full((1, 1), position), layout="bksd")), (q, kv))
    reads["attention"] = sum(a.nbytes for a in kv)
    head = model.params["head_t"]
    fns["head"] = (kernel_jit(functools.partial(kernels.dense,
                                                transposed=True)),
                   (vec(cfg.hidden_size), head))
    reads["head"] = head.nbytes
    filled = model.decode(jnp.ones((1, position), jnp.int32),
                          model.init_cache(1, 1024))[1]
    token = jnp.ones((1, 1), jnp.int32)

    def step(filled=filled, model=model):  # a copy: the step donates it
      cache = jax.tree.map(jnp.copy, filled)
      return model.decode(token, cache)[0]
    fns["step"] = (step, ())
    times = common.time_side_by_side(fns, rounds, keep_all=True)
    step_ms = 1e3 * statistics.median(times.pop("step"))
    # The head is a pure streaming read: where it beats the sum, its rate is
    # the better estimate of what the memory gives.
    rate = max(bandwidth, reads["head"] / statistics.median(times["head"]))
    parts = {}
    for name, t in times.items():
      parts[name] = dict(op=name, ms=1e3 * statistics.median(t),
                         min_ms=1e3 * min(t), max_ms=1e3 * max(t),
                         floor_ms=reads[name] / rate * 1e3)
    rest = step_ms - sum(r["ms"] for r in parts.values())
    label = granularity if not group else f"G={group}"
    for r in [*parts.values(), dict(op="rest", ms=rest),
              dict(op="step", ms=step_ms,
                   floor_ms=sum(r["floor_ms"] for r in parts.values()))]:
      r.update(layout=label, share=r["ms"] / step_ms,
               read_gbs=rate / 1e9, sum_read_gbs=bandwidth / 1e9,
               position=position)
      rows.append(r)
      print(json.dumps(r), flush=True)
  return rows


def add_flags(group) -> None:
  group.add_argument("--skip_ops", action="store_true",
                     help="skip the per-op profile of a decode step")
  group.add_argument("--ops_rounds", type=int, default=20)


def wanted(args) -> bool:
  return not args.skip_ops


def run(args) -> list[dict]:
  return bench_decode_ops(args.decode_config, args.ops_rounds)


def render(results: dict, decode_config: str) -> list[str]:
  del decode_config  # the part's own SmolLM2-vocabulary model
  ops = results.get("ops", [])
  if not ops:
    return []
  lines = [f"Where a decode step's time goes (position "
           f"{ops[0]['position']}, SmolLM2 vocabulary, fp32 tied head; "
           "each op over every layer in one executable, median (range) "
           "of rounds; floor: the bytes it reads at "
           f"{ops[0]['read_gbs']:.1f} GB/s, the best of a jitted sum's and "
           "the head's read rates):", "",
           "| layout | op | ms per token | range | share | floor ms | "
           "x floor |", "|---|---|---|---|---|---|---|"]
  for r in ops:
    spread = (f"{r['min_ms']:.1f}–{r['max_ms']:.1f}" if "min_ms" in r
              else "-")
    floor = r.get("floor_ms")
    lines.append(f"| {r['layout']} | {r['op']} | {r['ms']:.1f} | {spread} | "
                 f"{r['share']:.0%} | "
                 + (f"{floor:.1f} | {r['ms'] / floor:.1f}x |" if floor
                    else "- | - |"))
  return lines
