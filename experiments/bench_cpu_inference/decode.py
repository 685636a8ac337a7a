"""Part 2: greedy decode end to end, ternary against the same weights in
f32 and bf16, and the weights' memory."""

from __future__ import annotations

import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.bench_cpu_inference import models
from tequila_jax import model as model_lib
from tequila_jax import sampling
from tequila_jax.inference import (DenseLlama, InferenceSettings, PackedLlama,
                                   kernels)
from tequila_jax.io import tqj

TITLE = "part 2: end to end"


def _token_times(model, prompt, tokens: int, runs: int) -> list[float]:
  """Seconds per generated token (every step of `runs` generations)."""
  list(sampling.generate(model, prompt, max_new_tokens=2))  # compile
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    for i, _ in enumerate(sampling.generate(model, prompt,
                                            max_new_tokens=tokens)):
      t1 = time.perf_counter()
      if i:  # the first token's time includes the prefill
        times.append(t1 - t0)
      t0 = t1
  return times


def bench_decode(config: str, tokens: int, runs: int) -> list[dict]:
  """Greedy decode of a random-init model of `config`'s architecture: the
  ternary export (PackedLlama, `lut` kernels) vs the same float weights W in
  f32 and bf16 through the same decode loop (DenseLlama)."""
  cfg = models.model_config(config, max_seq_len=256)
  qat = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(qat, nnx.Param)
  with tempfile.TemporaryDirectory() as tmp:
    report = tqj.write_export(qat, f"{tmp}/m.tqj")
    base3 = tqj.size_report(tqj.export_tensors(qat, "base3"), cfg)
    del qat
    packed = PackedLlama.load(f"{tmp}/m.tqj", InferenceSettings("lut"))
    packed_i8 = PackedLlama.load(f"{tmp}/m.tqj",
                                 InferenceSettings("lut", embed="int8"))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  sizes = dict(decode_config=config, params=n_params,
               **{k: v for k, v in report.items() if v},
               base3_ternary_bits_per_weight=base3["ternary_bits_per_weight"],
               base3_tensor_bytes=base3["tensor_bytes"])
  print(json.dumps(sizes), flush=True)
  rows = []

  def record(name, model, weight_bytes, n_tokens, n_runs, read_bytes=None):
    times = _token_times(model, list(range(1, 9)), n_tokens, n_runs)
    rows.append(dict(model=name, tokens_per_s=1 / statistics.median(times),
                     ms_per_token=1e3 * statistics.median(times),
                     samples=len(times), weight_mib=weight_bytes / 2**20,
                     read_mib_per_token=(read_bytes or weight_bytes) / 2**20))
    print(json.dumps(rows[-1]), flush=True)

  record("ternary (lut)", packed, packed.memory()["total"], tokens, runs)
  head_t = packed.params["head_t"]
  hidden = jax.random.normal(jax.random.key(0), (1, head_t.shape[1]))
  want = hidden @ head_t.T
  got = kernels.int8_dense(hidden, packed_i8.params["head_t"]["w_t"],
                           packed_i8.params["head_t"]["scale"])
  head_error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  del packed
  record("ternary (lut) + int8 embedding/head", packed_i8,
         packed_i8.memory()["total"], tokens, runs)
  rows[-1]["head_logits_rel_error"] = head_error  # on a random hidden state
  del packed_i8
  float_model = model_lib.abstract_model(
      cfg.replace(quant=cfg.quant.__class__("none")))
  nnx.update(float_model, params)
  del params
  for dtype, size in (("float32", 4), ("bfloat16", 2)):
    dense = DenseLlama(float_model, dtype)
    record(dtype, dense, n_params * size, tokens, runs)
    del dense
  # For reference: the training model's own decode (stacked weights under
  # lax.scan, which XLA:CPU copies out layer by layer).
  record("float32 (tequila_jax.model.Llama)", float_model, n_params * 4,
         tokens, 1)
  # Floor: the ternary model's bytes read per token at the bandwidth that the
  # f32 model's decode reaches (its weights / its time per token).
  f32_row = next(r for r in rows if r["model"] == "float32")
  bandwidth = n_params * 4 / (f32_row["ms_per_token"] * 1e-3)
  for r in rows:
    if r["model"].startswith("ternary"):
      r["floor_ms"] = r["read_mib_per_token"] * 2**20 / bandwidth * 1e3
      r["vs_floor"] = r["ms_per_token"] / r["floor_ms"]
  rows[0]["sizes"] = sizes
  return rows


def add_flags(group) -> None:
  group.add_argument("--skip_decode", action="store_true")
  group.add_argument("--tokens", type=int, default=33,
                     help="tokens per generation; per-token times are "
                     "medianed")
  group.add_argument("--runs", type=int, default=2,
                     help="generations per model")


def wanted(args) -> bool:
  return not args.skip_decode


def run(args) -> list[dict]:
  return bench_decode(args.decode_config, args.tokens, args.runs)


def render(results: dict, decode_config: str) -> list[str]:
  decode = results.get("decode", [])
  if not decode:
    return []
  tern = decode[0]["tokens_per_s"]
  best = {r["model"]: r["tokens_per_s"] for r in decode}
  tern_i8 = best["ternary (lut) + int8 embedding/head"]
  lines = [f"End to end, {pathlib.Path(decode_config).name} "
           "architecture (random init), greedy decode, median per token:", "",
           "| model | tokens/s | ms/token | samples | weights MiB | "
           "ternary (f32 head) speed-up |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['tokens_per_s']:.2f} | "
            f"{r['ms_per_token']:.1f} | {r['samples']} | "
            f"{r['weight_mib']:.0f} | {tern / r['tokens_per_s']:.2f}x |"
            for r in decode]
  sizes = decode[0]["sizes"]
  lines += ["", f"Linear-layer weights: {sizes['ternary_bits_per_weight']:.2f} "
            f"bits each in the 2bit export, "
            f"{sizes['base3_ternary_bits_per_weight']:.2f} in base3 (codes, "
            "fp32 alpha per group and c). Floor (the weights a token reads, "
            "at the bandwidth the f32 decode reaches): "
            + "; ".join(f"{r['model']} {r['floor_ms']:.1f} ms, measured "
                        f"{r['vs_floor']:.1f}x it" for r in decode
                        if "floor_ms" in r) + "."]
  lines += ["", f"Ternary vs f32: {tern / best['float32']:.2f}x; "
            f"vs bf16: {tern / best['bfloat16']:.2f}x. With the int8 "
            "embedding/head (int8 dot, hidden state as value + residual; "
            f"head logits rel. error {decode[1]['head_logits_rel_error']:.1e}"
            " on a random hidden state, nan: not recorded): "
            f"{tern_i8 / best['float32']:.2f}x f32, "
            f"{tern_i8 / best['bfloat16']:.2f}x bf16."]
  return lines
