"""Next-token losses, shared by training and evaluation."""

from __future__ import annotations

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


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array,
                          targets: jax.Array, chunk: int) -> jax.Array:
  """`cross_entropy(hidden @ head, targets)` over sequence chunks of `chunk`
  positions, rematerialized, so that only one chunk of logits lives at once
  (a 128k vocabulary makes full fp32 logits several GB)."""
  b, t, d = hidden.shape
  k = t // chunk
  hs = hidden.reshape(b, k, chunk, d).swapaxes(0, 1)
  ts = targets.reshape(b, k, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def body(total, xs):
    h, tgt = xs
    logits = jnp.matmul(h, head).astype(jnp.float32)
    return total + cross_entropy(logits, tgt) * (b * chunk), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts))
  return total / (b * t)


def next_token_loss(params, graphdef, tokens: jax.Array,
                    loss_chunk: int = 0) -> jax.Array:
  """Mean next-token loss of the model `(graphdef, params)` on `[B, T + 1]`
  tokens (the training objective and the held-out loss)."""
  model = nnx.merge(graphdef, params)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if loss_chunk and loss_chunk < inputs.shape[1]:
    return chunked_cross_entropy(model.hidden_states(inputs),
                                 model.head_matrix(), targets, loss_chunk)
  return cross_entropy(model(inputs), targets)


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
