"""`python -m tequila_jax.generate --model model.tqj --prompt "..."`

Streams a completion from a packed export on the CPU (pure XLA; kernel
strategy per `--strategy`, see `tequila_jax.inference.kernels`) and reports
prefill and decode tokens/s. `--strategy`, `--embed`, `--alpha_dtype` and
`--kv_dtype` are the fields of `tequila_jax.inference.InferenceSettings`.
`--model` may also be a training workdir, a Hugging Face directory or a GGUF
file (float/QAT model, for comparison; `--quant.*` applies a quantization to
the latter two); `tequila_jax.inference.load` opens it.
"""

import sys
import time

import jax
from absl import flags

from tequila_jax import cli, config_lib, inference, sampling
from tequila_jax.inference import InferenceSettings

flags.DEFINE_string("model", None, "A .tqj export, training workdir, Hugging "
                    "Face dir, .gguf or asset:NAME.", required=True)
flags.DEFINE_string("prompt", None, "Text to continue.", required=True)
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("strategy", InferenceSettings.strategy,
                  # kernels.STRATEGIES but q8k (llama.cpp's Q8_K
                  # emulation, for agreement studies only)
                  ["auto", "lean", "exact", "lut", "int8"],
                  "Ternary kernel of a .tqj model (lean: auto's kernels, "
                  "holding only the packed codes).")
flags.DEFINE_enum("embed", InferenceSettings.embed, inference.EMBEDS,
                  "int8: embedding and output head as int8 with per-row "
                  "scales (a quarter of fp32's memory; the head quantizes the "
                  "last hidden state: logits ~1e-2 relative error).")
flags.DEFINE_enum("alpha_dtype", InferenceSettings.alpha_dtype,
                  inference.ALPHA_DTYPES,
                  "How the group scales are held (float16: half the bytes).")
flags.DEFINE_enum("kv_dtype", InferenceSettings.kv_dtype, inference.KV_DTYPES,
                  "How the KV cache is held (bfloat16: half the bytes, decode "
                  "1.2x faster at 4,096 positions; logits ~3e-4 relative).")
config_lib.define_quant_flag()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  settings = InferenceSettings(FLAGS.strategy, FLAGS.embed, FLAGS.alpha_dtype,
                               FLAGS.kv_dtype)
  model, tok = inference.load(
      FLAGS.model, quant=config_lib.quant_from_flag(FLAGS.quant),
      settings=settings)
  prompt = tok.encode(FLAGS.prompt, bos=tok.bos_id is not None)
  sys.stdout.write(FLAGS.prompt)
  sys.stdout.flush()
  ids, shown = [], ""
  start = time.perf_counter()
  first = None
  for nxt in sampling.generate(model, prompt,
                               max_new_tokens=FLAGS.max_new_tokens,
                               temperature=FLAGS.temperature, seed=FLAGS.seed,
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
        f"decode {decode_rate:.1f} tokens/s on {jax.devices()[0].platform}; "
        f"quantization {model.cfg.quant.describe()}]",
        file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
