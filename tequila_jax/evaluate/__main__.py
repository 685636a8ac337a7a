"""`python -m tequila_jax.evaluate --checkpoint LOCATION [--heldout]
[--text SPEC] [--tasks a.jsonl,b.jsonl] [--quant.method=...]`: perplexity
(on a training workdir's held-out documents with `--heldout`, or on any
text) and multiple-choice accuracy (see `tequila_jax.evaluate`), printed as
JSON with the quantization that was applied."""

import json
import math
import pathlib

from absl import flags

from tequila_jax import cli, config_lib, data, evaluate, inference
from tequila_jax import workdir as workdir_lib
from tequila_jax.io import locations

flags.DEFINE_string("checkpoint", None, "Training workdir, Hugging Face dir, "
                    ".gguf, .tqj or asset:NAME.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir "
                     "(default: the latest).")
flags.DEFINE_list("text", [], "Data source spec(s) for perplexity (see "
                  "tequila_jax.data).")
flags.DEFINE_integer("max_documents", 0, "Use the first N documents (0: all).")
flags.DEFINE_bool("heldout", False, "Perplexity on the held-out documents of "
                  "the training workdir's corpus (text it never trained on), "
                  "overall and per source.")
flags.DEFINE_list("tasks", [], "Task .jsonl files, one "
                  '{"context", "choices", "label"} object per line.')
flags.DEFINE_integer("seq_len", 512, "Perplexity window length.")
flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
flags.DEFINE_string("out", None, "Also write the results as JSON here.")
config_lib.define_quant_flag()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  tasks = {task: evaluate.read_tasks(task) for task in FLAGS.tasks}  # first
  model, tok = inference.load(FLAGS.checkpoint, step=FLAGS.step,
                              quant=config_lib.quant_from_flag(FLAGS.quant))
  results = {"quantization": model.cfg.quant.describe()}
  if FLAGS.heldout:
    results["heldout"] = _heldout(model)
  if FLAGS.text:
    docs = [doc for spec in FLAGS.text for doc in data.iter_documents(spec)]
    docs = docs[:FLAGS.max_documents or None]
    results["perplexity"] = evaluate.perplexity(
        model, tok, docs, seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size)
  for task, examples in tasks.items():
    r = evaluate.multiple_choice(model, tok, examples,
                                 batch_size=FLAGS.batch_size)
    r.pop("loglikelihoods")
    results[pathlib.Path(task).stem] = r
  print(json.dumps(results, indent=2))
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps(results, indent=2))


def _heldout(model) -> dict:
  path = locations.resolve(FLAGS.checkpoint)
  if not workdir_lib.is_workdir(path):
    raise ValueError(f"--heldout needs a training workdir (its config names "
                     f"the corpus); {path} is not one. Pass --text with text "
                     "the model was not trained on instead.")
  config = workdir_lib.read_config(path)
  corpus = data.prepare_for_config(config, locations.load_tokenizer)

  def score(source=None):
    nll = evaluate.window_losses(model, corpus, seq_len=FLAGS.seq_len,
                                 batch_size=FLAGS.batch_size, source=source)
    loss = float(nll.mean())
    return dict(loss=loss, perplexity=math.exp(loss), windows=len(nll))

  result = score()
  sources = data.eval_sources(corpus)
  if len(sources) > 1:
    result["per_source"] = {s: score(s) for s in sources}
  return result


if __name__ == "__main__":
  cli.run(main)
