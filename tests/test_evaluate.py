"""Evaluation: log-likelihoods, multiple choice, perplexity, lm-eval adapter."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tequila_jax import data, evaluate, inference
from tequila_jax import workdir as workdir_lib
from tequila_jax.io import load, locations, tokenizers
from tequila_jax.model import Llama
from tests.cli import run_cli
from tests.conftest import tiny_model_config

TOK = tokenizers.from_file("bytes")


@pytest.fixture(scope="module")
def model():
  return Llama(tiny_model_config("none"), rngs=nnx.Rngs(3))


def _direct_loglik(model, ctx, cont):
  seq = jnp.asarray([ctx + cont])
  logp = jax.nn.log_softmax(model(seq[:, :-1]), -1)[0]
  return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_loglikelihoods_equal_unpadded_forward(model):
  reqs = [([256, 1, 2, 3], [4, 5]), ([256, 7], [8, 9, 10, 11]), ([256], [3])]
  got = evaluate.loglikelihoods(model, reqs, batch_size=2)
  for (ctx, cont), value in zip(reqs, got):
    np.testing.assert_allclose(value, _direct_loglik(model, ctx, cont),
                               rtol=1e-5)


def test_multiple_choice_by_hand(model):
  examples = [{"context": "The cat sat on the", "choices": [" mat", " elephant"],
               "label": 0},
              {"context": "1 2 3", "choices": [" 4", " four hundred"],
               "label": 1}]
  r = evaluate.multiple_choice(model, TOK, examples)
  acc = acc_norm = 0
  for ex, lls in zip(examples, r["loglikelihoods"]):
    ctx = TOK.encode(ex["context"], bos=True)
    want = [_direct_loglik(model, ctx, TOK.encode(c)) for c in ex["choices"]]
    np.testing.assert_allclose(lls, want, rtol=1e-5)
    acc += int(np.argmax(want) == ex["label"])
    norm = [w / len(c) for w, c in zip(want, ex["choices"])]
    acc_norm += int(np.argmax(norm) == ex["label"])
  assert (r["acc"], r["acc_norm"], r["n"]) == (acc / 2, acc_norm / 2, 2)


def test_perplexity_equals_direct_mean(model):
  texts = ["To be, or not to be, that is the question."] * 3
  r = evaluate.perplexity(model, TOK, texts, seq_len=16, batch_size=2)
  stream = [t for ids in TOK.encode_batch(texts, bos=True, eos=True)
            for t in ids]
  lls = [_direct_loglik(model, stream[w * 16:w * 16 + 1], stream[
      w * 16 + 1:w * 16 + 17]) for w in range((len(stream) - 1) // 16)]
  np.testing.assert_allclose(r["loss"], -sum(lls) / (16 * len(lls)), rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run):
  """The session's tiny run (as `run`) beside a tiny multiple-choice task."""
  tmp = tmp_path_factory.mktemp("eval")
  (tmp / "run").symlink_to(tiny_run, target_is_directory=True)
  tasks = tmp / "tiny_mc.jsonl"
  tasks.write_text("\n".join(json.dumps(e) for e in [
      {"context": "ROMEO. O Romeo, Romeo, wherefore art thou",
       "choices": ["Romeo?", "xq#zz"], "label": 0},
      {"context": "Enter the", "choices": ["KING.", "@@@@"], "label": 0},
      {"context": "What is", "choices": ["%%%", "the matter?"], "label": 1}]))
  return tmp


def test_cli_on_a_training_workdir(trained):
  run_cli("evaluate", "--checkpoint", trained / "run", "--tasks",
          trained / "tiny_mc.jsonl", "--text", "asset:shakespeare",
          "--max_documents", "1", "--seq_len", "64", "--out",
          trained / "r.json", "--heldout")
  out = json.loads((trained / "r.json").read_text())
  assert out["tiny_mc"]["n"] == 3
  assert 1 < out["perplexity"]["perplexity"] < 258
  assert out["quantization"] == "tequila per_group G=64 λ=0.001"
  # --heldout: every held-out window of the run's own corpus.
  config = workdir_lib.read_config(trained / "run")
  corpus = data.prepare_for_config(config, locations.load_tokenizer)
  want = evaluate.window_losses(load.load_model(str(trained / "run")), corpus,
                                seq_len=64)
  assert out["heldout"]["windows"] == len(want)
  np.testing.assert_allclose(out["heldout"]["loss"], want.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="lacks"):
    bad = trained / "bad.jsonl"
    bad.write_text('{"context": "x"}')
    evaluate.read_tasks(bad)


def test_lm_eval_adapter_runs_a_local_task(trained):
  lm_eval = pytest.importorskip("lm_eval")
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  import tequila_jax.lm_eval_adapter  # noqa: F401  (registers the model)
  task_dir = trained / "lm_eval_tasks"
  task_dir.mkdir(exist_ok=True)
  (task_dir / "tiny_mc.yaml").write_text(f"""
task: tequila_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {trained / 'tiny_mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
  results = lm_eval.simple_evaluate(
      model="tequila_jax", model_args=f"checkpoint={trained / 'run'}",
      tasks=["tequila_tiny_mc"],
      task_manager=TaskManager(include_path=str(task_dir)))
  got = results["results"]["tequila_tiny_mc"]
  # lm-eval puts a " " between context and choice; score the same way.
  model, tok = inference.load(str(trained / "run"))
  examples = evaluate.read_tasks(trained / "tiny_mc.jsonl")
  for ex in examples:
    ex["choices"] = [" " + c for c in ex["choices"]]
  ours = evaluate.multiple_choice(model, tok, examples)
  assert got["acc,none"] == pytest.approx(ours["acc"])
