"""CPU inference speed: packed ternary kernels vs f32 / bf16 dense XLA.

    python experiments/bench_cpu_inference.py --out experiments/results/cpu_inference

Part 1, per layer, Llama-3.2-1B shapes (2048->8192, 8192->2048) at M = 1, 8,
128: `exact`, `lut` and `int8` ternary kernels (`tequila_jax.inference`)
against `x @ W` in f32 and bf16. Part 2, end to end: greedy decode tokens/s
and weight memory of SmolLM2-135M's architecture exported as ternary vs the
same model in f32 and bf16. Medians of `--iters` (>= 20) after warm-up,
measured side by side in one process; ratios are dense time / ternary time.
Writes `results.json` and `results.md` to `--out`. Set GLIBC_TUNABLES as in
DESIGN.md §4 yourself if wanted; the value in effect is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tequila_jax import export  # noqa: E402  pylint: disable=wrong-import-position
from tequila_jax.inference import kernels  # noqa: E402  pylint: disable=wrong-import-position


def timeit(fn, *args, iters: int, warmup: int = 3) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_layers(iters: int, group: int = 128) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  for d_in, d_out in ((2048, 8192), (8192, 2048)):
    codes = rng.integers(-1, 2, (d_in, d_out)).astype(np.int8)
    alpha = rng.uniform(0.5, 1.5, (d_in // group, d_out)).astype(np.float32)
    c = rng.normal(size=d_out).astype(np.float32)
    packed = jnp.asarray(export.pack_2bit(codes))
    codes_j = jnp.asarray(codes)  # int8, as PackedLlama holds it for int8
    alpha_j, c_j = jnp.asarray(alpha), jnp.asarray(c)
    w32 = jnp.asarray(rng.normal(size=(d_in, d_out)).astype(np.float32))
    w16 = w32.astype(jnp.bfloat16)
    for m in (1, 8, 128):
      x = jnp.asarray(rng.normal(size=(m, d_in)).astype(np.float32))
      dense32 = timeit(jax.jit(lambda x, w: x @ w), x, w32, iters=iters)
      dense16 = timeit(jax.jit(lambda x, w: x.astype(jnp.bfloat16) @ w), x,
                       w16, iters=iters)
      row = dict(shape=f"{d_in}x{d_out}", m=m, f32_ms=dense32 * 1e3,
                 bf16_ms=dense16 * 1e3)
      for s in ("exact", "lut", "int8"):
        if s == "lut" and m > 8:
          continue  # the table costs M x in/4 x 256: a decode kernel
        f = jax.jit(lambda x, p, a, c, k, s=s: kernels.ternary_linear(
            x, p, a, c, s, k if s == "int8" else None))
        row[f"{s}_ms"] = timeit(f, x, packed, alpha_j, c_j, codes_j,
                                iters=iters) * 1e3
      best = min((v, k[:-3]) for k, v in row.items()
                 if k.endswith("_ms") and k[:-3] in ("exact", "lut", "int8"))
      row.update(best=best[1], vs_f32=dense32 * 1e3 / best[0],
                 vs_bf16=dense16 * 1e3 / best[0])
      # Memory-bandwidth floor at 2 bits/weight (DESIGN.md §4: 12-28 GB/s).
      row["floor_2bit_ms_at_20GBs"] = d_in * d_out / 4 / 20e9 * 1e3
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def bench_decode(iters: int, tokens: int = 32) -> list[dict]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tequila_jax import config_lib, model as model_lib, sampling  # pylint: disable=g-import-not-at-top
  from tequila_jax.inference import PackedLlama  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  base = config_lib.load_config_file(str(pathlib.Path(__file__).resolve()
                                         .parent.parent / "configs/smollm2_135m.py"))
  cfg = config_lib.to_model_config(base.model).replace(max_seq_len=256)
  qat = model_lib.Llama(cfg.replace(dtype="float32"), rngs=nnx.Rngs(0))
  params = nnx.state(qat, nnx.Param)
  with tempfile.TemporaryDirectory() as tmp:
    report = export.write_export(qat, f"{tmp}/m.tqj")
    packed = PackedLlama.load(f"{tmp}/m.tqj")
  rows = []
  prompt = list(range(1, 9))
  for name, model, wbytes in (
      ("ternary (auto)", packed, report["tensor_bytes"]),
      ("f32", None, None), ("bf16", None, None)):
    if model is None:
      dtype = "float32" if name == "f32" else "bfloat16"
      model = model_lib.Llama(cfg.replace(
          dtype=dtype, quant=cfg.quant.__class__("none")), rngs=nnx.Rngs(0))
      nnx.update(model, params)
      wbytes = sum(x.size for x in jax.tree.leaves(params)) * (
          4 if dtype == "float32" else 2)
    list(sampling.generate(model, prompt, max_new_tokens=4))  # compile
    times = []
    for _ in range(max(3, iters // 10)):
      t0 = time.perf_counter()
      n = len(list(sampling.generate(model, prompt, max_new_tokens=tokens)))
      times.append((time.perf_counter() - t0) / n)
    rows.append(dict(model=name, tokens_per_s=1 / statistics.median(times),
                     weight_mib=wbytes / 2**20))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--out", default="")
  p.add_argument("--skip_decode", action="store_true")
  p.add_argument("--skip_layers", action="store_true")
  args = p.parse_args()
  machine = dict(cpus=os.cpu_count(), processor=platform.processor(),
                 platform=platform.platform(), jax=jax.__version__,
                 xla_flags=os.environ.get("XLA_FLAGS", ""),
                 glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
  print(json.dumps(machine))
  layers = [] if args.skip_layers else bench_layers(args.iters)
  decode = [] if args.skip_decode else bench_decode(args.iters)
  lines = ["| layer | M | f32 ms | bf16 ms | exact ms | lut ms | int8 ms | "
           "best vs f32 | best vs bf16 | 2-bit floor ms |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in layers:
    get = lambda k, r=r: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    lines.append(f"| {r['shape']} | {r['m']} | {get('f32_ms')} | "
                 f"{get('bf16_ms')} | {get('exact_ms')} | {get('lut_ms')} | "
                 f"{get('int8_ms')} | {r['vs_f32']:.2f}x ({r['best']}) | "
                 f"{r['vs_bf16']:.2f}x | {r['floor_2bit_ms_at_20GBs']:.3f} |")
  if decode:
    lines += ["", "| model (SmolLM2-135M shape) | decode tokens/s | weights MiB |",
              "|---|---|---|"]
    lines += [f"| {r['model']} | {r['tokens_per_s']:.1f} | {r['weight_mib']:.0f} |"
              for r in decode]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        dict(machine=machine, layers=layers, decode=decode), indent=2))
    (out / "results.md").write_text(
        f"Machine: {json.dumps(machine)}\n\n" + text)


if __name__ == "__main__":
  main()
