"""Held-out perplexity and zero-shot multiple-choice accuracy.

    python -m tequila_jax.evaluate --checkpoint runs/x \
        --text asset:shakespeare --tasks my_task.jsonl

`--checkpoint` is anything `tequila_jax.inference.load` opens (a training
workdir, a Hugging Face directory, a `.gguf` file, `asset:NAME`, or a packed
`.tqj` / ternary Hugging Face export, scored as a `PackedLlama`). A task
file holds one JSON object per line: `{"context": str, "choices": [str,
...], "label": int}` (and optionally `context_ids` / `choice_ids`, the same
tokenized, used as given). Each choice is scored by the summed
log-likelihood of its tokens after the context; `acc` picks the largest sum
and `acc_norm` the largest sum divided by the choice's length in
characters, as lm-eval defines them. For lm-eval's own tasks see
`tequila_jax.lm_eval_adapter`.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np
import tqdm

from tequila_jax import data, losses
from tequila_jax.io.tokenizers import Tokenizer
from tequila_jax.model import Llama

_BUCKET = 64  # pad lengths to multiples of this to bound recompilation


def loglikelihoods(model: Llama, requests: Sequence[tuple[list, list]], *,
                   batch_size: int = 8, max_len: int | None = None,
                   with_greedy: bool = False) -> list:
  """Summed log-probability of each continuation after its context.

  Requests are `(context_ids, continuation_ids)`; contexts are cut from the
  left to fit `max_len`. With `with_greedy`, returns `(logprob, is_greedy)`.
  """
  max_len = max_len or model.cfg.max_seq_len
  results = [None] * len(requests)
  order = sorted(range(len(requests)),
                 key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    seqs = []
    for i in idx:
      ctx, cont = requests[i]
      if not cont:
        raise ValueError(f"request {i} has an empty continuation.")
      seq = (list(ctx) + list(cont))[-(max_len + 1):]
      seqs.append((seq, len(cont)))
    width = max(len(s) for s, _ in seqs)
    width = -(-width // _BUCKET) * _BUCKET
    tokens = np.zeros((batch_size, width), np.int32)
    for r, (s, _) in enumerate(seqs):
      tokens[r, :len(s)] = s
    logp, greedy = (np.asarray(a) for a in losses.score_tokens(model, jnp.asarray(tokens)))
    for r, (i, (s, n)) in enumerate(zip(idx, seqs)):
      span = slice(len(s) - 1 - n, len(s) - 1)  # predictions of the last n
      value = float(logp[r, span].sum())
      results[i] = (value, bool(greedy[r, span].all())) if with_greedy else value
  return results


TASK_LINE = ('each line is {"context": str, "choices": [str, str, ...], '
             '"label": int}')


def read_tasks(path) -> list[dict]:
  """The examples of a task file, each line validated (a JSON object with a
  non-empty string context, at least two string choices and an integer
  label among them; `context_ids`/`choice_ids` lists of ints if given);
  a bad line is named by file:line, an empty file is refused."""
  examples = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        ex = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not JSON ({e.msg}); "
                         f"{TASK_LINE}.") from None
      problem = _task_problem(ex)
      if problem:
        raise ValueError(f"{path}:{n}: {problem}; {TASK_LINE}.")
      examples.append(ex)
  if not examples:
    raise ValueError(f"{path} holds no task; {TASK_LINE}.")
  return examples


def _task_problem(ex) -> str | None:
  """What is wrong with one task line, or None."""
  if not isinstance(ex, dict):
    return f"a JSON {type(ex).__name__}, not an object"
  missing = {"context", "choices", "label"} - set(ex)
  if missing:
    return f"lacks {sorted(missing)}"
  if not isinstance(ex["context"], str) or not ex["context"]:
    return "context is not a non-empty string"
  choices = ex["choices"]
  if (not isinstance(choices, list) or len(choices) < 2
      or not all(isinstance(c, str) and c for c in choices)):
    return "choices is not a list of at least two non-empty strings"
  label = ex["label"]
  if not isinstance(label, int) or isinstance(label, bool) or not (
      0 <= label < len(choices)):
    return f"label {label!r} is not an integer in [0, {len(choices)})"
  ids = lambda v: isinstance(v, list) and all(  # noqa: E731
      isinstance(i, int) and not isinstance(i, bool) for i in v)
  if "context_ids" in ex or "choice_ids" in ex:
    if not ids(ex.get("context_ids")) or not (
        isinstance(ex.get("choice_ids"), list)
        and len(ex["choice_ids"]) == len(choices)
        and all(ids(c) and c for c in ex["choice_ids"])):
      return ("context_ids / choice_ids are not token lists (one non-empty "
              "list per choice)")
  return None


def multiple_choice(model: Llama, tok: Tokenizer, examples: list[dict], *,
                    batch_size: int = 8) -> dict:
  """lm-eval's `acc` and `acc_norm` over `examples` (see module doc)."""
  requests, owners = [], []
  for e, ex in enumerate(examples):
    if "context_ids" in ex:  # tokenized ahead (no tokenizer needed here)
      pairs = [(ex["context_ids"], ids) for ids in ex["choice_ids"]]
    else:
      ctx = tok.encode(ex["context"], bos=tok.bos_id is not None)
      pairs = [(ctx, tok.encode(choice)) for choice in ex["choices"]]
    requests += pairs
    owners += [e] * len(pairs)
  scores = loglikelihoods(model, requests, batch_size=batch_size)
  acc = acc_norm = 0
  per_example = []
  for e, ex in enumerate(examples):
    ll = np.array([s for s, o in zip(scores, owners) if o == e])
    lengths = np.array([len(c) for c in ex["choices"]], float)
    acc += int(np.argmax(ll) == ex["label"])
    acc_norm += int(np.argmax(ll / lengths) == ex["label"])
    per_example.append(ll.tolist())
  n = len(examples)
  return dict(acc=acc / n, acc_norm=acc_norm / n, n=n, loglikelihoods=per_example)


def _window_nll(model: Llama, window, n: int, batch_size: int) -> np.ndarray:
  """Next-token negative log-likelihoods `[n, seq_len]` (float64) of the
  windows `window(0) ... window(n - 1)`, each `seq_len + 1` tokens, scored
  `batch_size` at a time (the last batch padded)."""
  out = []
  for start in tqdm.trange(0, n, batch_size, desc="scoring", unit="batch",
                           disable=None):  # a bar on a terminal only
    rows = [np.asarray(window(w), np.int32)
            for w in range(start, min(start + batch_size, n))]
    real = len(rows)
    rows += [rows[0]] * (batch_size - real)
    logp = np.asarray(losses.score_tokens(model, jnp.asarray(np.stack(rows)))[0])
    out.append(-logp[:real].astype(np.float64))
  return np.concatenate(out)


def perplexity(model: Llama, tok: Tokenizer, texts: Sequence[str], *,
               seq_len: int = 512, batch_size: int = 8) -> dict:
  """Token-level perplexity over `texts`, in non-overlapping windows."""
  stream = []
  for ids in tok.encode_batch(list(texts), bos=tok.bos_id is not None,
                              eos=tok.eos_id is not None):
    stream.extend(ids)
  n_windows = (len(stream) - 1) // seq_len
  if n_windows == 0:
    raise ValueError(f"{len(stream)} tokens are fewer than one window of "
                     f"{seq_len + 1}; lower seq_len.")
  nll = _window_nll(model, lambda w: stream[w * seq_len:(w + 1) * seq_len + 1],
                    n_windows, batch_size)
  loss = float(nll.mean())
  return dict(loss=loss, perplexity=math.exp(loss), tokens=nll.size)


def window_losses(model: Llama, corpus_dir, *, seq_len: int,
                  batch_size: int = 8, max_windows: int = 0,
                  source: str | None = None) -> np.ndarray:
  """Mean next-token loss of every held-out window of a prepared corpus
  (`data.PackedWindows`, in order; the first `max_windows` if > 0; one
  source's held-out stream only, given `source`): the per-window figures a
  paired comparison of two models resamples."""
  source = data.PackedWindows(corpus_dir, "eval", seq_len, source=source)
  n = min(len(source), max_windows) if max_windows else len(source)
  if n == 0:
    raise ValueError(f"{corpus_dir} holds no held-out window of {seq_len + 1} "
                     "tokens.")
  return _window_nll(model, source.__getitem__, n, batch_size).mean(axis=1)
