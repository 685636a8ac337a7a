"""Next-token losses, shared by training and evaluation."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Negative log-likelihood of every target `[..., T]`, in fp32."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token negative log-likelihood, in fp32."""
  return jnp.mean(token_nll(logits, targets))


def chunked_mean(fn: Callable, xs: tuple, chunk: int):
  """The mean over the `[B, T]` positions of `fn`'s values: every `x` of
  `xs` (`[B, T, ...]`) is cut into sequence chunks of `chunk` positions and
  `fn(*chunks)` returns a pytree of scalars, each the mean of a per-position
  value over its chunk. One scan, rematerialized, so that only one chunk of
  whatever `fn` builds (logits, relation rows) lives at once: the one owner
  of this chunking (the cross-entropy, the distillation losses)."""
  b, t = xs[0].shape[:2]
  k = t // chunk
  split = lambda x: x.reshape(b, k, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
  first = jax.eval_shape(fn, *(x[:, :chunk] for x in xs))

  @jax.checkpoint
  def body(total, chunk_xs):
    return jax.tree.map(lambda acc, v: acc + v * (b * chunk), total,
                        fn(*chunk_xs)), None

  zeros = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), first)
  total, _ = jax.lax.scan(body, zeros, tuple(map(split, xs)))
  return jax.tree.map(lambda v: v / (b * t), total)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array,
                          targets: jax.Array, chunk: int) -> jax.Array:
  """`cross_entropy(hidden @ head, targets)` over sequence chunks of `chunk`
  positions (`chunked_mean`), so that only one chunk of logits lives at once
  (a 128k vocabulary makes full fp32 logits several GB)."""
  return chunked_mean(
      lambda h, tgt: cross_entropy(jnp.matmul(h, head).astype(jnp.float32),
                                   tgt),
      (hidden, targets), chunk)


def next_token_loss(params, graphdef, tokens: jax.Array,
                    loss_chunk: int = 0, arenas_eps=0.0) -> jax.Array:
  """Mean next-token loss of the model `(graphdef, params)` on `[B, T + 1]`
  tokens (the training objective, with Sherry's Arenas ε `arenas_eps`, and
  the held-out loss, at ε = 0)."""
  model = nnx.merge(graphdef, params)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if loss_chunk and loss_chunk < inputs.shape[1]:
    return chunked_cross_entropy(
        model.hidden_states(inputs, arenas_eps=arenas_eps),
        model.head_matrix(), targets, loss_chunk)
  return cross_entropy(model(inputs, arenas_eps=arenas_eps), targets)


def _score(model, tokens):
  logits = model(tokens[:, :-1])
  return (-token_nll(logits, tokens[:, 1:]),
          logits.argmax(-1) == tokens[:, 1:])


_score_nnx = nnx.jit(_score)
_score_logits = jax.jit(lambda logits, targets: (
    -token_nll(logits, targets), logits.argmax(-1) == targets))


def score_tokens(model, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For every t: log p(tokens[:, t + 1] | tokens[:, :t + 1]) and whether that
  token is the argmax, `[B, T - 1]` each, from one forward pass. `model` is
  a `Llama` or any callable tokens -> logits (e.g. `PackedLlama`, which
  compiles itself)."""
  if isinstance(model, nnx.Module):
    return _score_nnx(model, tokens)
  return _score_logits(model(tokens[:, :-1]), tokens[:, 1:])
