"""Training-step time for `none` vs `absmean` vs `tequila`, side by side.

    python -m experiments.bench_train_step --config configs/tiny.py
    python -m experiments.bench_train_step --config configs/llama1b.py \
        --batch 16 --seq 1024 --peak_tflops 989   # an H100, bf16 dense

Every method runs the same jitted, donated `train.train_step` (AdamW) on the
same random token batch in one process, one step of each in turn (round
robin, so machine noise hits all alike; `tequila+diag` adds the per-step
deadzone diagnostics, `tequila+fulldiag` the logging-step variant); reports
the median and range of `--iters` steps after warm-up, tokens/s, the ratio to `none`, model FLOPs utilization
when `--peak_tflops` is given (6·N·tokens + attention, PaLM appendix B), and
`compiled.memory_analysis()`. Results go to stdout (markdown) and `--out`.
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax import config_lib, sharding, train


def model_flops_per_token(cfg, seq: int) -> float:
  """6 x non-embedding params + attention (12 L H d_head T), per token."""
  d, f, L = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
  attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  dense = L * (attn + 3 * d * f) + d * cfg.vocab_size  # + output head
  return 6 * dense + 12 * L * cfg.num_heads * cfg.head_dim * seq


def build(config, spec: str, batch: int, seq: int):
  """One candidate: its compiled step, state and batch (not yet timed)."""
  method, _, diag_mode = spec.partition("+")
  config = config_lib.load_config_file(config) if isinstance(config, str) else config
  config.model.quant.method = method
  config.diagnostics.enabled = bool(diag_mode)
  config.train.batch_size, config.data.seq_len = batch, seq
  tr = train.build_train(config)
  cfg = tr.model_cfg
  state = tr.init_state()
  step = tr.step_fn(full_diagnostics=diag_mode == "fulldiag")
  tokens = np.random.default_rng(0).integers(
      0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  tokens = jax.device_put(tokens, sharding.batch_sharding(tr.mesh))
  t0 = time.perf_counter()
  compiled = step.lower(state, tokens).compile()
  mem = compiled.memory_analysis()
  return dict(method=spec, compiled=compiled, state=state, tokens=tokens,
              compile_s=time.perf_counter() - t0, times=[],
              flops_per_step=model_flops_per_token(cfg, seq) * batch * seq,
              temp_bytes=getattr(mem, "temp_size_in_bytes", None),
              arg_bytes=getattr(mem, "argument_size_in_bytes", None))


def time_round_robin(candidates: list[dict], iters: int, warmup: int) -> None:
  """One step of each candidate in turn, `warmup + iters` rounds, so that
  every candidate sees the same machine state (noise, thermals)."""
  for i in range(warmup + iters):
    for c in candidates:
      t0 = time.perf_counter()
      c["state"], m = c["compiled"](c["state"], c["tokens"])
      jax.block_until_ready((c["state"], m))
      if i >= warmup:
        c["times"].append(time.perf_counter() - t0)
      c["loss"] = float(m["loss"])


def result(c: dict, batch: int, seq: int) -> dict:
  med = statistics.median(c["times"])
  return dict(method=c["method"], step_s=med, tokens_per_s=batch * seq / med,
              compile_s=c["compile_s"], loss=c["loss"],
              flops_per_step=c["flops_per_step"], temp_bytes=c["temp_bytes"],
              arg_bytes=c["arg_bytes"],
              spread=(min(c["times"]), max(c["times"])))


def measured_peak_tflops(n: int = 8192, iters: int = 20) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times) / 1e12


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--methods", default="none,absmean,tequila",
                 help="comma-separated; METHOD+diag / METHOD+fulldiag time "
                 "the step with deadzone diagnostics")
  p.add_argument("--remat", default="", help="override model.remat")
  p.add_argument("--loss_chunk", type=int, default=-1,
                 help="override train.loss_chunk (0 = full logits)")
  p.add_argument("--micro_batches", type=int, default=0,
                 help="override train.micro_batches (GSNR needs >= 2)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak for MFU; 0 with --measure_peak measures it")
  p.add_argument("--measure_peak", action="store_true",
                 help="time an 8192^3 bf16 matmul as the peak (GPU)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.measure_peak and not args.peak_tflops:
    args.peak_tflops = measured_peak_tflops()
    print(f"measured bf16 matmul peak: {args.peak_tflops:.0f} TFLOP/s")
  def config():
    c = config_lib.load_config_file(args.config)
    if args.micro_batches:
      c.train.micro_batches = args.micro_batches
    if args.remat:
      c.model.remat = args.remat
    if args.loss_chunk >= 0:
      c.train.loss_chunk = args.loss_chunk
    return c

  candidates = [build(config(), m, args.batch, args.seq)
                for m in args.methods.split(",")]
  time_round_robin(candidates, args.iters, args.warmup)
  rows = [result(c, args.batch, args.seq) for c in candidates]
  stats = jax.devices()[0].memory_stats() or {}
  base = rows[0]["step_s"]
  print(f"\n{args.config} batch={args.batch} seq={args.seq} "
        f"devices={jax.devices()} jax={jax.__version__} "
        f"host={platform.processor() or platform.machine()}")
  print("| method | step ms (median) | min–max ms | tokens/s | vs "
        f"{rows[0]['method']} | MFU | temp MiB | peak GiB (process, all) |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    mfu = (f"{r['flops_per_step'] / r['step_s'] / (args.peak_tflops * 1e12):.1%}"
           if args.peak_tflops else "-")
    r["mfu"] = mfu
    temp = f"{r['temp_bytes'] / 2**20:.0f}" if r["temp_bytes"] is not None else "-"
    print(f"| {r['method']} | {r['step_s'] * 1e3:.1f} | "
          f"{r['spread'][0] * 1e3:.1f}–{r['spread'][1] * 1e3:.1f} | "
          f"{r['tokens_per_s']:.0f} | {r['step_s'] / base:.3f}x | {mfu} | {temp} | "
          + (f"{stats['peak_bytes_in_use'] / 2**30:.1f} |"
             if stats.get("peak_bytes_in_use") else "- |"))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(args=vars(args), jax=jax.__version__,
                     devices=[str(d) for d in jax.devices()], rows=rows), f,
                indent=2)


if __name__ == "__main__":
  main()
