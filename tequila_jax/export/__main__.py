"""`python -m tequila_jax.export --checkpoint LOCATION [--out model.tqj]
[--gguf model.gguf] [--hf_out DIR] [--quant.method=... --quant.group_size=...]`

Writes the packed ternary export of a training workdir (or of a Hugging Face
directory / GGUF file, given `--quant.*`, which such sources do not record)
and prints its size report: `--out` a `.tqj`, `--gguf` a llama.cpp file,
`--hf_out` a standard Hugging Face LLaMA directory (weights = dequantized
ternary Q, biases = C(W); loads in transformers and other runtimes at float
speed). A ternary Hugging Face directory converts back to `.tqj` / GGUF
exactly (an inference model: its latent weights are gone).
"""

import json
import pathlib

from absl import app, flags

from tequila_jax import cli, config_lib
from tequila_jax import workdir as workdir_lib
from tequila_jax.io import gguf, hf, load, locations, tqj
from tequila_jax.io.atomic import check_writable

flags.DEFINE_string("checkpoint", None, "Training workdir, Hugging Face dir, "
                    ".gguf or asset:NAME.", required=True)
flags.DEFINE_string("out", "", "The .tqj to write.")
flags.DEFINE_string("hf_out", "", "Also write a Hugging Face LLaMA directory "
                    "(Q as weights, C(W) as biases).")
flags.DEFINE_enum("hf_dtype", "float32", ["float32", "bfloat16", "float16"],
                  "Dtype of the Hugging Face directory's tensors.")
flags.DEFINE_enum("packing", "2bit", tqj.PACKINGS, "Code packing: 2 bits, "
                  "base 3 (1.6 bits) or, for 3:4 codes (sherry), sparse34 "
                  "(1.25 bits) per weight.")
flags.DEFINE_enum("float_dtype", "float32", list(tqj.FLOAT_DTYPES),
                  "Dtype of the float tensors (embeddings, norms, head).")
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir "
                     "(default: the latest).")
flags.DEFINE_string("gguf", "", "Also write a llama.cpp GGUF (ternary "
                    "tensors + bias tensors) to this path.")
flags.DEFINE_enum("gguf_type", "tq2_0", sorted(gguf.TYPES), "GGUF ternary "
                  "tensor type (2.06 or 1.69 bits/weight).")
flags.DEFINE_bool("refit_scales", False, "GGUF: force --gguf_type with "
                  "fitted per-256 block scales where scales change inside a "
                  "block (default: such tensors are written exactly as Q4_0).")
config_lib.define_quant_flag()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not (FLAGS.out or FLAGS.gguf or FLAGS.hf_out):
    raise app.UsageError("nothing to write: give --out, --gguf and/or --hf_out.")
  for path, replace in ((FLAGS.out, True), (FLAGS.gguf, True),
                        (FLAGS.hf_out, False)):  # all, before writing any
    if path:
      check_writable(path, replace=replace)
  quant = config_lib.quant_from_flag(FLAGS.quant)
  source = locations.resolve(FLAGS.checkpoint)
  tokenizer = None
  if source.suffix == ".tqj" or hf.is_ternary_hf(source):
    export = load.read_inference_export(FLAGS.checkpoint, quant)
  else:
    if quant is None and not workdir_lib.is_workdir(source):
      raise app.UsageError(
          "--quant.method is required for a Hugging Face or GGUF source (it "
          "records no quantization), e.g. --quant.method=tequila "
          "--quant.group_size=128 --quant.lam=1e-3 (add "
          "--quant.stat_dtype=bfloat16 for a checkpoint of the official code).")
    overrides = {"quant": quant} if quant is not None else {}
    model = load.load_model(FLAGS.checkpoint, FLAGS.step, **overrides)
    tokenizer = locations.load_tokenizer(FLAGS.checkpoint)
    export = tqj.build_export(model, tokenizer=tokenizer, packing=FLAGS.packing,
                              float_dtype=FLAGS.float_dtype)
  report = tqj.size_report(export.tensors, export.cfg)
  if FLAGS.out:
    report = tqj.save_export(export, FLAGS.out)
  print(json.dumps(report, indent=2))
  if FLAGS.out:
    print(f"wrote {FLAGS.out}: {report['file_bytes'] / 2**20:.1f} MiB, "
          f"{report['ternary_bits_per_weight']:.3f} bits per ternary weight "
          "(codes + scales + bias)")
  if FLAGS.gguf:
    errors = gguf.write_gguf(export, FLAGS.gguf,
                             refit_scales=FLAGS.refit_scales,
                             ternary_type=FLAGS.gguf_type)
    size = pathlib.Path(FLAGS.gguf).stat().st_size / 2**20
    print(f"wrote {FLAGS.gguf}: {size:.1f} MiB; scale refit error "
          f"{errors['refit_rel_error']:.2e}, fp16 scale rounding "
          f"{errors['fp16_scale_rel_error']:.2e} (relative); ternary "
          "weights per type: " + ", ".join(
              f"{k.upper()} {n:,} ({gguf.BITS[k]:.2f} bits/weight)"
              for k, n in errors["tensor_types"].items()))
  if FLAGS.hf_out:
    hf.save_ternary_hf(export, FLAGS.hf_out, dtype=FLAGS.hf_dtype)
    print(f"wrote {FLAGS.hf_out}: a Hugging Face LLaMA with biases "
          f"({FLAGS.hf_dtype}; float speed, for compatibility)")


if __name__ == "__main__":
  cli.run(main)
