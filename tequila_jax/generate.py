"""`python -m tequila_jax.generate --model model.tqj --prompt "..."`

Streams a completion from a packed export on the CPU (pure XLA; kernel
strategy per `--strategy`, see `tequila_jax.inference.kernels`) and reports
prefill and decode tokens/s. `--model` may also be a training workdir, a
Hugging Face directory or a GGUF file (float/QAT model, for comparison).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax


def load(location: str, strategy: str, head: str = "float"):
  from tequila_jax import pretrained  # pylint: disable=g-import-not-at-top
  if location.endswith(".tqj"):
    from tequila_jax import export  # pylint: disable=g-import-not-at-top
    from tequila_jax.inference import PackedLlama  # pylint: disable=g-import-not-at-top
    ex = export.read_export(location)
    return PackedLlama(ex, strategy, head), ex.load_tokenizer()
  return pretrained.load_model(location), pretrained.load_tokenizer(location)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--prompt", required=True)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--strategy", default="auto",
                 choices=("auto", "exact", "lut", "int8"))
  p.add_argument("--head", default="float", choices=("float", "int8"),
                 help="int8: int8 output projection, quantizes the last "
                 "hidden state (faster; logits ~1e-2 relative error)")
  args = p.parse_args(argv)
  from tequila_jax import sampling  # pylint: disable=g-import-not-at-top
  model, tok = load(args.model, args.strategy, args.head)
  prompt = tok.encode(args.prompt, bos=tok.bos_id is not None)
  sys.stdout.write(args.prompt)
  sys.stdout.flush()
  ids, shown = [], ""
  start = time.perf_counter()
  first = None
  for nxt in sampling.generate(model, prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed,
                               eos_id=tok.eos_id):
    if first is None:
      first = time.perf_counter()
    ids.append(nxt)
    text = tok.decode(ids)
    sys.stdout.write(text[len(shown):])
    sys.stdout.flush()
    shown = text
  end = time.perf_counter()
  n = len(ids)
  decode_rate = (n - 1) / (end - first) if n > 1 else float("nan")
  print(f"\n\n[{len(prompt)} prompt tokens, first token after "
        f"{(first or end) - start:.2f} s (includes compilation); {n} tokens, "
        f"decode {decode_rate:.1f} tokens/s on {jax.devices()[0].platform}]",
        file=sys.stderr)
  return ids


if __name__ == "__main__":
  main()
