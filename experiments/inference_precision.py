"""What each run-time precision choice of `PackedLlama` costs a trained model.

    python -m experiments.inference_precision --workdir runs/default \
        --out experiments/results/cpu_inference/precision

Exports the workdir's latest checkpoint (fp32 and bf16 float tensors) and
scores its held-out windows (the corpus its config names) with
`PackedLlama` variants: the fp32 `exact` reference; a bf16 embedding/head;
the int8 embedding/head (per-row scales; the head quantizes the last hidden
state); fp16 group scales; both; a bf16 KV cache; and the `auto` strategy
(int8 activations for batched calls). Per variant: held-out perplexity, the paired loss
difference vs the reference with a 95% bootstrap interval over windows
("inconclusive" when it contains 0), the logits' relative error on the
first batch, and the bytes held (`PackedLlama.memory`).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile

import jax.numpy as jnp
import numpy as np

from experiments import common, sweep
from tequila_jax import data, evaluate
from tequila_jax import workdir as workdir_lib
from tequila_jax.inference import InferenceSettings, PackedLlama
from tequila_jax.io import load, locations, tqj

VARIANTS = {  # export float dtype, strategy, embed, alpha dtype, KV cache dtype
    "fp32 (reference)": ("float32", "exact", "float", "float32", "float32"),
    "bf16 embedding/head": ("bfloat16", "exact", "float", "float32", "float32"),
    "int8 embedding/head": ("float32", "exact", "int8", "float32", "float32"),
    "fp16 alpha": ("float32", "exact", "float", "float16", "float32"),
    "int8 embedding/head + fp16 alpha": ("float32", "exact", "int8", "float16",
                                         "float32"),
    "bf16 KV cache": ("float32", "exact", "float", "float32", "bfloat16"),
    "auto (int8 activations)": ("float32", "auto", "float", "float32",
                                "float32"),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a training workdir")
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_windows", type=int, default=64,
                 help="held-out windows scored (0: all)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  workdir = locations.resolve(args.workdir)
  if not workdir_lib.is_workdir(workdir):
    raise ValueError(f"{workdir} is not a training workdir (no config.json "
                     "and checkpoints/); pass the --workdir of a train run.")
  config = workdir_lib.read_config(workdir)
  corpus = data.prepare_for_config(config, locations.load_tokenizer)
  model = load.load_model(str(workdir))
  rows, losses, reference_logits = [], {}, None
  first = np.stack([data.PackedWindows(corpus, "eval", args.seq_len)[i][:-1]
                    for i in range(args.batch_size)])
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in ("float32", "bfloat16"):
      tqj.write_export(model, f"{tmp}/{dtype}.tqj", float_dtype=dtype)
    del model
    for name, (dtype, strategy, embed, alpha_dtype, kv_dtype) in (
        VARIANTS.items()):
      packed = PackedLlama.load(f"{tmp}/{dtype}.tqj", InferenceSettings(
          strategy, embed, alpha_dtype, kv_dtype))
      losses[name] = evaluate.window_losses(
          packed, corpus, seq_len=args.seq_len, batch_size=args.batch_size,
          max_windows=args.max_windows)
      logits = np.asarray(packed(jnp.asarray(first)), np.float64)
      if reference_logits is None:
        reference_logits = logits
      memory = packed.memory()
      row = dict(variant=name, perplexity=math.exp(losses[name].mean()),
                 logits_rel_error=float(
                     np.linalg.norm(logits - reference_logits) /
                     np.linalg.norm(reference_logits)),
                 memory_mib=memory["total"] / 2**20,
                 bits_per_ternary_weight=memory["bits_per_ternary_weight"])
      if rows:
        d = losses[name] - losses[next(iter(VARIANTS))]
        lo, hi = sweep.bootstrap_ci(np.mean, [d])
        row.update(delta_loss=float(d.mean()), ci95=(lo, hi),
                   verdict=sweep.verdict(lo, hi, "better", "worse"))
      rows.append(row)
      print(json.dumps(row), flush=True)
  lines = [f"Held-out windows: {len(losses[next(iter(VARIANTS))])} of "
           f"{args.seq_len} tokens ({workdir}).", "",
           "| variant | perplexity | Δ loss vs fp32 (95% CI) | verdict | "
           "logits rel. error | MiB held | bits / ternary weight |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    delta = (f"{r['delta_loss']:+.5f} [{r['ci95'][0]:+.5f}, "
             f"{r['ci95'][1]:+.5f}]" if "delta_loss" in r else "-")
    lines.append(f"| {r['variant']} | {r['perplexity']:.2f} | {delta} | "
                 f"{r.get('verdict', '-')} | {r['logits_rel_error']:.1e} | "
                 f"{r['memory_mib']:.0f} | {r['bits_per_ternary_weight']:.3f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    common.write_results(args.out, rows, text)


if __name__ == "__main__":
  common.command(main)
