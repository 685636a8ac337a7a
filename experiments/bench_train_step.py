"""Training-step time for `none` vs `absmean` vs `tequila` (or any config
overrides), side by side.

    python -m experiments.bench_train_step --config configs/tiny.py
    python -m experiments.bench_train_step --config configs/llama1b.py \
        --batch 16 --seq 1024 --measure_peak   # an H100: MFU vs 989 spec
    python -m experiments.bench_train_step --config configs/smollm2_135m.py \
        --methods "absmean,seq:model.quant.granularity=per_channel,\
tequila:model.quant.lam_mode=v3"
    python -m experiments.bench_train_step --config configs/smollm2_135m.py \
        --batch 2 --seq 128 --iters 20 --repeat 2 \
        --methods "tequila,tequila:distill.weight=1.0"   # + the teacher
    python -m experiments.bench_train_step --config configs/smollm2_135m.py \
        --batch 2 --seq 128 --iters 20 --repeat 2 --optimizer \
        --methods "tequila,tequila:model.quant.lam_mode=v3"   # v3 vs fixed λ

    python -m experiments.bench_train_step --config configs/smollm2_135m.py \
        --batch 2 --seq 128 --iters 20 --repeat 2 \
        --methods "absmean,sherry,sherry_twomatmul"   # Arenas: 1 dot vs 2

A candidate is `METHOD[+diag|+fulldiag][:KEY=VALUE[:KEY=VALUE...]]`:
the quant method, optionally with the per-step deadzone diagnostics
(`+diag`) or their logging-step variant (`+fulldiag`), then any config
overrides (`--config.KEY` spelling without the prefix; values parsed as
JSON when they parse). `sherry_twomatmul` is no library method: it is
`sherry` with its Arenas layer in the official code's form, two matmuls
`x·Q + ε·(x·W)` with the identity STE through Q, swapped in for this
benchmark only (`two_matmul_arenas`), to weigh the library's one dot
`x·(Q + εW)` against it. Every candidate runs the same jitted, donated
`train.train_step` (AdamW) on the same random token batch in one process
(a candidate that distills gets its teacher, `Train.teacher`, as the step's
extra argument),
one step of each in turn (round robin, so machine noise hits all alike);
reports
the median and range of `--iters` steps after warm-up, tokens/s, the ratio to
`none`, model FLOPs utilization (6·N·tokens + attention, PaLM appendix B) over
the device's bf16 dense **spec** peak (detected; H100 SXM 989 TFLOP/s;
`--peak_tflops` overrides, `--measure_peak` adds a labelled column against a
timed 8192³ matmul), and
`compiled.memory_analysis()`. `--optimizer` then times each candidate's
optimizer update alone (`Train.tx` on its own parameters as the gradient,
round robin too): the part of the step that the parameter count sets,
whatever the tokens. Results go to stdout (markdown) and `--out`.
"""

import argparse
import json
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from tequila_jax import config_lib, sharding, train


def model_flops_per_token(cfg, seq: int) -> float:
  """6 x non-embedding params + attention (12 L H d_head T), per token."""
  d, f, L = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
  attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  dense = L * (attn + 3 * d * f) + d * cfg.vocab_size  # + output head
  return 6 * dense + 12 * L * cfg.num_heads * cfg.head_dim * seq


DIAG_MODES = ("", "diag", "fulldiag")


def parse_candidate(spec: str) -> tuple[str, str, dict]:
  """`METHOD[+diag|+fulldiag][:KEY=VALUE...]` -> (method, diag mode,
  overrides)."""
  # ":" before KEY= separates overrides (a value may hold ":", asset:NAME).
  head, *pairs = re.split(r":(?=[\w.]+=)", spec)
  if ":" in head:
    raise ValueError(f"candidate {spec!r}: {head.split(':', 1)[1]!r} is not "
                     "KEY=VALUE.")
  method, _, diag_mode = head.partition("+")
  if diag_mode not in DIAG_MODES:
    raise ValueError(f"candidate {spec!r}: '+{diag_mode}' is not a diagnostics"
                     " mode; use METHOD+diag or METHOD+fulldiag.")
  overrides = {}
  for pair in pairs:
    key, _, value = pair.partition("=")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  return method, diag_mode, overrides


# Benchmark-only candidate: `sherry` with the official two-matmul Arenas.
TWO_MATMUL = "sherry_twomatmul"


def two_matmul_arenas(original):
  """`quant.quantized_matmul` with Sherry's Arenas layer as the official
  AngelSlim code computes it, `x·Q + ε·(x·W)` (two matmuls; autodiff, the
  identity STE through Q: dW = xᵀg + ε·xᵀg, dx = g·Qᵀ + ε·g·Wᵀ); every other
  method goes to `original`. For `TWO_MATMUL` only: not a library method."""
  from jax.ad_checkpoint import checkpoint_name  # pylint: disable=g-import-not-at-top
  from tequila_jax.quant import matmul, sherry  # pylint: disable=g-import-not-at-top

  def quantized_matmul(x, w, cfg, qparams=None, *, arenas_eps=0.0):
    if cfg.method != "sherry":
      return original(x, w, cfg, qparams, arenas_eps=arenas_eps)
    if cfg.act_bits == 8:
      x = matmul.fake_quantize_int8(x)
    q = sherry.sherry_kernel(w, cfg, x.dtype)  # NMQuant: Q, identity STE
    y = jnp.matmul(x, checkpoint_name(q, matmul.QUANT_NAMES[0]))
    return y + arenas_eps * jnp.matmul(x, w.astype(x.dtype))
  return quantized_matmul


def build(config, spec: str, batch: int, seq: int):
  """One candidate: its compiled step, state and batch (not yet timed)."""
  method, diag_mode, overrides = parse_candidate(spec)
  if method == TWO_MATMUL:  # traced and compiled with the official form
    from tequila_jax import quant  # pylint: disable=g-import-not-at-top
    original = quant.quantized_matmul
    quant.quantized_matmul = two_matmul_arenas(original)
    try:
      return {**build(config, "sherry" + spec[len(TWO_MATMUL):], batch, seq),
              "method": spec}
    finally:
      quant.quantized_matmul = original
  config = config_lib.load_config_file(config) if isinstance(config, str) else config
  config.model.quant.method = method
  config.diagnostics.enabled = bool(diag_mode)
  config.update_from_flattened_dict(overrides)
  config.train.batch_size, config.data.seq_len = batch, seq
  tr = train.build_train(config)
  cfg = tr.model_cfg
  state = tr.init_state()
  step = tr.step_fn(full_diagnostics=diag_mode == "fulldiag")
  tokens = np.random.default_rng(0).integers(
      0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  tokens = jax.device_put(tokens, sharding.batch_sharding(tr.mesh))
  t0 = time.perf_counter()
  args = tr.step_args()  # the teacher, when the overrides distill
  compiled = step.lower(state, tokens, *args).compile()
  mem = compiled.memory_analysis()
  return dict(method=spec, compiled=compiled, state=state, tokens=tokens,
              args=args, tx=tr.tx,
              compile_s=time.perf_counter() - t0,
              flops_per_step=model_flops_per_token(cfg, seq) * batch * seq,
              temp_bytes=getattr(mem, "temp_size_in_bytes", None),
              arg_bytes=getattr(mem, "argument_size_in_bytes", None))


def time_round_robin(candidates: list[dict], iters: int, warmup: int) -> None:
  """One step of each candidate in turn (`common.round_robin`), `warmup +
  iters` rounds, so that every candidate sees the same machine state
  (noise, thermals); sets each one's `times` and last `loss`."""
  def step(c):
    c["state"], c["metrics"] = c["compiled"](c["state"], c["tokens"],
                                             *c["args"])
    return c["state"], c["metrics"]
  times = common.round_robin({i: common.timed(step, c)
                              for i, c in enumerate(candidates)}, iters, warmup)
  for i, c in enumerate(candidates):
    c["times"], c["loss"] = times[i], float(c["metrics"]["loss"])


def time_optimizer(candidates: list[dict], iters: int, warmup: int) -> None:
  """Each candidate's optimizer update alone (clipping, AdamW, apply), its
  parameters standing in for the gradient, round robin; sets `opt_times`.
  Run after the steps: it moves the parameters."""
  calls = {}
  for i, c in enumerate(candidates):
    def update(params, opt_state, tx=c["tx"]):
      updates, opt_state = tx.update(params, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    s = c["state"]
    fn = jax.jit(update, donate_argnums=(0, 1)).lower(
        s["params"], s["opt_state"]).compile()
    def step(c=c, fn=fn):
      p, o = fn(c["state"]["params"], c["state"]["opt_state"])
      c["state"] = {**c["state"], "params": p, "opt_state": o}
      return p
    calls[i] = common.timed(step)
  times = common.round_robin(calls, iters, warmup)
  for i, c in enumerate(candidates):
    c["opt_times"] = times[i]


def _ratios(times: list[float], base: list[float]) -> tuple[float, tuple]:
  """Per-round ratio to the baseline's time: median and (min, max)."""
  r = [t / b for t, b in zip(times, base)]
  return statistics.median(r), (min(r), max(r))


def result(c: dict, batch: int, seq: int) -> dict:
  med = statistics.median(c["times"])
  return dict(method=c["method"], step_s=med, tokens_per_s=batch * seq / med,
              compile_s=c["compile_s"], loss=c["loss"],
              flops_per_step=c["flops_per_step"], temp_bytes=c["temp_bytes"],
              arg_bytes=c["arg_bytes"],
              spread=(min(c["times"]), max(c["times"])))


# Dense bf16 spec peaks (TFLOP/s, no sparsity) by device kind: MFU's
# denominator, as MaxText and PaLM report it. Order matters (PCIe first).
SPEC_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("B200", 2250.0))


def spec_peak_tflops(device_kind: str) -> float:
  """The bf16 dense spec peak of `device_kind` (e.g. "NVIDIA H100 80GB
  HBM3"), or 0 when unknown (CPUs: no MFU)."""
  return next((peak for name, peak in SPEC_PEAK_TFLOPS if name in device_kind),
              0.0)


def measured_peak_tflops(n: int = 8192, iters: int = 20) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  times = common.round_robin(
      {"matmul": common.timed(jax.jit(lambda x, y: x @ y), a, a)}, iters,
      warmup=1)["matmul"]
  return 2 * n**3 / statistics.median(times) / 1e12


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--methods", default="none,absmean,tequila",
                 help="comma-separated candidates, each METHOD[+diag|"
                 "+fulldiag][:KEY=VALUE...] (config overrides, e.g. "
                 "tequila:model.quant.lam_mode=v3)")
  p.add_argument("--repeat", type=int, default=1,
                 help="time the round robin this many times (a table each)")
  p.add_argument("--remat", default="", help="override model.remat")
  p.add_argument("--loss_chunk", type=int, default=-1,
                 help="override train.loss_chunk (0 = full logits)")
  p.add_argument("--micro_batches", type=int, default=0,
                 help="override train.micro_batches (GSNR needs >= 2)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="MFU denominator; 0 = the spec bf16 dense peak of the "
                 "detected device (H100 SXM: 989)")
  p.add_argument("--measure_peak", action="store_true",
                 help="also time an 8192^3 bf16 matmul and show MFU against "
                 "it in a second, labelled column")
  p.add_argument("--optimizer", action="store_true",
                 help="then time each candidate's optimizer update alone")
  p.add_argument("--out", default="")
  args = p.parse_args()
  kind = jax.devices()[0].device_kind
  source = "given" if args.peak_tflops else f"bf16 dense spec of {kind!r}"
  args.peak_tflops = args.peak_tflops or spec_peak_tflops(kind)
  measured = measured_peak_tflops() if args.measure_peak else 0.0
  line = (f"MFU against {args.peak_tflops:.0f} TFLOP/s ({source})"
          if args.peak_tflops else f"no spec peak known for {kind!r}: no MFU")
  if measured:
    line += f"; measured 8192^3 bf16 matmul: {measured:.0f} TFLOP/s"
  print(line)
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
  print(f"\n{args.config} batch={args.batch} seq={args.seq} "
        f"devices={jax.devices()} jax={jax.__version__} "
        f"host={platform.processor() or platform.machine()}")
  runs = []
  for rep in range(args.repeat):
    time_round_robin(candidates, args.iters, args.warmup if rep == 0 else 1)
    rows = [result(c, args.batch, args.seq) for c in candidates]
    base = candidates[0]["times"]
    for c, r in zip(candidates, rows):  # drift-robust: ratio within a round
      r["round_ratio"], r["round_ratio_range"] = _ratios(c["times"], base)
      r["round_extra_s"] = statistics.median(
          t - b for t, b in zip(c["times"], base))
    print(f"\nrepetition {rep + 1} of {args.repeat}, {args.iters} timed "
          "steps of each, round robin")
    _table(rows, args.peak_tflops, measured)
    runs.append(rows)
  if args.optimizer:
    time_optimizer(candidates, args.iters, args.warmup)
    base = candidates[0]["opt_times"]
    print(f"\noptimizer update alone, {args.iters} of each, round robin")
    print(f"| method | ms (median) | min–max ms | per-round ratio to "
          f"{candidates[0]['method']} | extra ms vs it (median of rounds) | "
          "the step's extra ms (last repetition) |")
    print("|---|---|---|---|---|---|")
    for c, r in zip(candidates, runs[-1]):
      t = c["opt_times"]
      r["optimizer_s"], r["optimizer_spread"] = statistics.median(t), (
          min(t), max(t))
      r["optimizer_ratio"], r["optimizer_ratio_range"] = _ratios(t, base)
      r["optimizer_extra_s"] = statistics.median(
          a - b for a, b in zip(t, base))
      lo, hi = r["optimizer_ratio_range"]
      print(f"| {r['method']} | {r['optimizer_s'] * 1e3:.0f} | "
            f"{min(t) * 1e3:.0f}–{max(t) * 1e3:.0f} | "
            f"{r['optimizer_ratio']:.3f}x ({lo:.2f}–{hi:.2f}) | "
            f"{r['optimizer_extra_s'] * 1e3:.0f} | "
            f"{r['round_extra_s'] * 1e3:.0f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(args=vars(args), measured_peak_tflops=measured or None,
                     device_kind=kind, jax=jax.__version__,
                     devices=[str(d) for d in jax.devices()], rows=runs[-1],
                     repetitions=runs), f, indent=2)


def _table(rows: list[dict], peak_tflops: float, measured: float) -> None:
  stats = jax.devices()[0].memory_stats() or {}
  base = rows[0]["step_s"]
  extra = f" MFU (measured {measured:.0f}) |" if measured else ""
  spec_label = f"MFU (spec {peak_tflops:.0f})" if peak_tflops else "MFU"
  print("| method | step ms (median) | min–max ms | tokens/s | vs "
        f"{rows[0]['method']} | per-round ratio (median, range) | "
        f"{spec_label} |{extra} temp MiB | peak GiB (process, all) |")
  print("|---|---|---|---|---|---|---|" + ("---|" if measured else "")
        + "---|---|")
  for r in rows:
    flops = r["flops_per_step"] / r["step_s"]
    r["mfu"] = flops / (peak_tflops * 1e12) if peak_tflops else None
    r["mfu_measured_peak"] = flops / (measured * 1e12) if measured else None
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    if measured:
      mfu += f" | {r['mfu_measured_peak']:.1%}"
    temp = f"{r['temp_bytes'] / 2**20:.0f}" if r["temp_bytes"] is not None else "-"
    lo, hi = r["round_ratio_range"]
    print(f"| {r['method']} | {r['step_s'] * 1e3:.1f} | "
          f"{r['spread'][0] * 1e3:.1f}–{r['spread'][1] * 1e3:.1f} | "
          f"{r['tokens_per_s']:.0f} | {r['step_s'] / base:.3f}x | "
          f"{r['round_ratio']:.3f}x ({lo:.2f}–{hi:.2f}) | {mfu} | {temp} | "
          + (f"{stats['peak_bytes_in_use'] / 2**30:.1f} |"
             if stats.get("peak_bytes_in_use") else "- |"))


if __name__ == "__main__":
  common.command(main)
