"""Part 1: the ternary kernels per layer against the dense matmul, at
Llama-3.2-1B's projection shapes."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from tequila_jax.inference import kernels
from tequila_jax.io import tqj

TITLE = "part 1: per layer"


def bench_layers(iters: int, group: int = 128) -> list[dict]:
  """Llama-3.2-1B projection shapes; the kernels as PackedLlama runs them."""
  rng = np.random.default_rng(0)
  rows = []
  kernel_jit = functools.partial(  # as the inference decoders compile
      jax.jit, compiler_options=(kernels.CPU_COMPILER_OPTIONS
                                 if jax.default_backend() == "cpu" else None))
  layer = kernel_jit(lambda x, held, strategy: kernels.ternary_linear(
      x, held["packed"], held["alpha"], held["c"], strategy,
      held.get("codes"), held.get("lut")), static_argnames="strategy")
  for d_in, d_out in ((2048, 8192), (8192, 2048)):
    codes = rng.integers(-1, 2, (d_in, d_out)).astype(np.int8)
    held = dict(packed=jnp.asarray(tqj.pack_2bit(codes)),
                alpha=jnp.asarray(rng.uniform(0.5, 1.5, (d_in // group, d_out))
                                  .astype(np.float32)),
                c=jnp.asarray(rng.normal(size=d_out).astype(np.float32)))
    held["lut"] = kernels.lut_layout(held["packed"], d_in // group)
    held["codes"] = kernels.int8_layout(jnp.asarray(codes), d_in // group)
    w32 = jnp.asarray(rng.normal(size=(d_in, d_out)).astype(np.float32))
    w16 = w32.astype(jnp.bfloat16)
    for m in (1, 8, 128):
      x = jnp.asarray(rng.normal(size=(m, d_in)).astype(np.float32))
      # The dense matmul DenseLlama runs (one-row bf16 calls padded to two).
      fns = {"f32": (kernel_jit(kernels.dense), (x, w32)),
             "bf16": (kernel_jit(kernels.dense), (x, w16))}
      for s in ("exact", "lut", "int8"):
        if s == "lut" and m > 8:
          continue  # the table costs M x in/4 x 256: a decode kernel
        fns[s] = (functools.partial(layer, strategy=s), (x, held))
      ms = {k: v * 1e3
            for k, v in common.time_side_by_side(fns, iters).items()}
      best = min((v, k) for k, v in ms.items() if k not in ("f32", "bf16"))
      row = dict(shape=f"{d_in}x{d_out}", m=m,
                 **{f"{k}_ms": v for k, v in ms.items()}, best=best[1],
                 vs_f32=ms["f32"] / best[0], vs_bf16=ms["bf16"] / best[0])
      # Memory-bandwidth floor: the ternary bytes (2-bit codes, alpha, c)
      # read at the bandwidth that the f32 matvec itself reaches.
      ternary_bytes = d_in * d_out / 4 + 4 * (d_in // group + 1) * d_out
      bandwidth = 4 * d_in * d_out / (ms["f32"] * 1e-3)
      row.update(f32_read_gbs=bandwidth / 1e9,
                 floor_ms=ternary_bytes / bandwidth * 1e3)
      row["best_vs_floor"] = best[0] / row["floor_ms"]
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def add_flags(group) -> None:
  group.add_argument("--iters", type=int, default=20)
  group.add_argument("--skip_layers", action="store_true")


def wanted(args) -> bool:
  return not args.skip_layers


def run(args) -> list[dict]:
  return bench_layers(args.iters)


def render(results: dict, decode_config: str) -> list[str]:
  del decode_config  # the shapes are Llama-3.2-1B's whatever the model
  layers = results.get("layers", [])
  if not layers:
    return []
  lines = ["| layer | M | f32 ms | bf16 ms | exact ms | lut ms | int8 ms | "
           "best vs f32 | best vs bf16 | floor ms (f32 GB/s) | best / floor |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in layers:
    get = lambda k, r=r: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    lines.append(f"| {r['shape']} | {r['m']} | {get('f32_ms')} | "
                 f"{get('bf16_ms')} | {get('exact_ms')} | {get('lut_ms')} | "
                 f"{get('int8_ms')} | {r['vs_f32']:.2f}x ({r['best']}) | "
                 f"{r['vs_bf16']:.2f}x | {r['floor_ms']:.3f} "
                 f"({r['f32_read_gbs']:.0f}) | {r['best_vs_floor']:.1f}x |")
  return lines
