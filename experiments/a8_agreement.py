"""How a W1.58A8 model agrees with the runtimes that treat its activations
differently, measured on a briefly QAT-trained model.

    python -m experiments.a8_agreement --out experiments/results/a8_agreement

Trains a small LLaMA (hidden 256 so that llama.cpp's 256-wide Q8_K blocks
fit; per-channel scales, the TQ2_0 layout) on Shakespeare bytes twice, with
`act_bits=8` and with 16-bit activations (same seed and data order), exports
both and scores the held-out windows through `PackedLlama` as each runtime
computes:
- `A8 (ours)`: the trained forward, int8 per token (`exact` kernel);
- `16-bit activations`: what transformers computes on the Hugging Face
  export (the dense Q and C(W), activations unquantized; that export equals
  this to 1e-5, tests/test_hf_io.py);
- `llama.cpp (Q8_K)`: activations quantized per block of 256 as llama.cpp
  does before a TQ2_0 matmul (the `q8k` emulation, matched to llama.cpp to
  ~1e-7 per op in tests/test_llama_cpp.py).
For each: logits relative to the trained forward, next-token argmax
agreement, and the paired held-out loss difference with its 95% bootstrap
interval over windows. Results: OUT/results.md and results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile

import numpy as np

from experiments import common, sweep

VARIANTS = (("A8 (ours)", 8, "exact"), ("16-bit activations", 0, "exact"),
            ("llama.cpp (Q8_K)", 0, "q8k"))


def config(act_bits: int, steps: int, cache_dir: str):
  from tequila_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.tiny("tequila")
  c.model.update(hidden_size=256, ffn_size=512, num_heads=4, num_kv_heads=2,
                 head_dim=64)
  c.model.quant.update(granularity="per_channel", lam=1e-3,
                       act_bits=act_bits)
  c.train.update(steps=steps, eval_every=steps, checkpoint_every=steps,
                 log_every=max(1, steps // 10))
  c.data.cache_dir = cache_dir
  return c


def measure(workdir: pathlib.Path, corpus, seq_len: int, windows: int):
  """Per variant: held-out window losses and logits against the trained
  forward, on the export of `workdir`'s model."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tequila_jax import evaluate, data  # pylint: disable=g-import-not-at-top
  from tequila_jax.inference import InferenceSettings, PackedLlama  # pylint: disable=g-import-not-at-top
  from tequila_jax.io import load, tqj  # pylint: disable=g-import-not-at-top
  export = tqj.build_export(load.load_model(str(workdir)))
  trained_bits = export.cfg.quant.act_bits
  source = data.PackedWindows(corpus, "eval", seq_len)
  tokens = jnp.asarray(np.stack([np.asarray(source[i])[:-1]
                                 for i in range(8)]))
  out, logits = {}, {}
  for name, bits, strategy in VARIANTS:
    ex = tqj.Export(export.cfg.replace(quant=dataclasses.replace(
        export.cfg.quant, act_bits=bits)), export.packing, export.tensors,
                    export.tokenizer)
    model = PackedLlama(ex, InferenceSettings(strategy))
    logits[name] = np.asarray(model(tokens))
    out[name] = dict(losses=evaluate.window_losses(
        model, corpus, seq_len=seq_len, max_windows=windows))
  # The reference: the forward the model was trained with.
  reference = logits[next(n for n, bits, strategy in VARIANTS
                          if bits == trained_bits and strategy == "exact")]
  for name, v in out.items():
    v["logits_rel"] = float(np.linalg.norm(logits[name] - reference)
                            / np.linalg.norm(reference))
    v["argmax_agree"] = float(np.mean(logits[name].argmax(-1)
                                      == reference.argmax(-1)))
  return trained_bits, out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--windows", type=int, default=512)
  p.add_argument("--out", default="experiments/results/a8_agreement")
  p.add_argument("--workdir", default="", help="default: a temporary dir")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from tequila_jax import data, train  # pylint: disable=g-import-not-at-top
  from tequila_jax.io import locations  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="a8_"))
  rows, report = [], {}
  for label, bits in (("trained A8", 8), ("trained A16", 0)):
    c = config(bits, args.steps, str(root / "corpora"))
    train.run(c, root / label.replace(" ", "_"), devices=jax.devices()[:1])
    corpus = data.prepare_for_config(c, locations.load_tokenizer,
                                     progress=False)
    _, variants = measure(root / label.replace(" ", "_"), corpus,
                          c.data.seq_len, args.windows)
    base = variants[VARIANTS[0][0] if bits else VARIANTS[1][0]]
    for name, v in variants.items():
      d = v["losses"] - base["losses"]
      lo, hi = sweep.bootstrap_ci(np.mean, [d])
      verdict = (sweep.verdict(lo, hi, "lower", "higher") if d.any()
                 else "(reference)")
      report[f"{label} / {name}"] = dict(
          loss=float(v["losses"].mean()), delta=float(d.mean()),
          ci95=(lo, hi), logits_rel=v["logits_rel"],
          argmax_agree=v["argmax_agree"], windows=len(d))
      rows.append(f"| {label} | {name} | {v['losses'].mean():.4f} | "
                  f"{d.mean():+.5f} [{lo:+.5f}, {hi:+.5f}] {verdict} | "
                  f"{v['logits_rel']:.2e} | {v['argmax_agree']:.3f} |")
  text = "\n".join([
      f"Tiny LLaMA (hidden 256, per-channel Tequila λ 1e-3), {args.steps} "
      "steps on Shakespeare bytes, each model trained once; held-out "
      f"windows: {args.windows} of 64 tokens. Logits relative to the "
      "model's own trained forward (A8 model: A8; A16 model: 16-bit); Δ "
      "loss paired over windows against that forward (95% bootstrap "
      "interval).", "",
      "| model | runtime activations | held-out loss | Δ loss vs trained "
      "forward [95% CI] | logits rel. diff | argmax agreement |",
      "|---|---|---|---|---|---|", *rows]) + "\n"
  common.write_results(args.out, dict(steps=args.steps, windows=args.windows,
                                      rows=report), text)
  print(text)


if __name__ == "__main__":
  common.command(main)
