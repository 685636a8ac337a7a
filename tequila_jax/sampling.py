"""Greedy / temperature sampling through a model's own KV cache (`Llama`'s
`model.KVCache`, or the inference decoders' `inference.PackedKVCache`)."""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tequila_jax.model import KVCache


@functools.lru_cache(maxsize=8)
def _jitted_decode(graphdef):
  """One compiled decode per model structure; params are a plain argument, so
  no NNX graph traversal happens per token."""

  @jax.jit
  def decode(state, tokens, cache: KVCache):
    logits, cache = nnx.merge(graphdef, state).decode(tokens, cache)
    return logits[:, -1], cache

  return decode


def _stepper(model):
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    decode = _jitted_decode(graphdef)
    return lambda tokens, cache: decode(state, tokens, cache)

  def step(tokens, cache):  # e.g. inference.PackedLlama (already jitted)
    logits, cache = model.decode(tokens, cache, logits="last")
    return logits[:, -1], cache

  return step


def generate(model, prompt: Sequence[int], *, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0,
             stop: Callable[[list[int]], bool] | None = None,
             eos_id: int | None = None) -> Iterator[int]:
  """Yields new token ids one by one (greedy when `temperature == 0`).

  `model` is a `Llama` or anything with `decode(tokens, cache, logits=)`,
  `init_cache` and `cfg` (`tequila_jax.inference.PackedLlama`).
  Stops after `max_new_tokens`, at `eos_id`, or when `stop(new_ids)` is true.
  The prompt is cut from the left to leave room in `model.cfg.max_seq_len`.
  """
  limit = model.cfg.max_seq_len
  if not 0 < max_new_tokens < limit:
    raise ValueError(
        f"max_new_tokens={max_new_tokens}: the model's context holds "
        f"{limit} tokens, prompt included; ask for 1 to {limit - 1}.")
  prompt = list(prompt)[-(limit - max_new_tokens):]
  cache = model.init_cache(1, min(limit, len(prompt) + max_new_tokens))
  step = _stepper(model)
  logits, cache = step(jnp.asarray([prompt], jnp.int32), cache)
  key = jax.random.key(seed)
  out: list[int] = []
  for _ in range(max_new_tokens):
    if temperature > 0:
      key, sub = jax.random.split(key)
      nxt = int(jax.random.categorical(sub, logits[0] / temperature))
    else:
      nxt = int(jnp.argmax(logits[0]))
    if nxt == eos_id:
      return
    out.append(nxt)
    yield nxt
    if stop is not None and stop(out):
      return
    if len(out) == max_new_tokens:
      return
    logits, cache = step(jnp.asarray([[nxt]], jnp.int32), cache)
