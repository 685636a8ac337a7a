"""8-bit activations (W1.58A8): per-token absmax int8, the one expression
the QAT forward (`fake_quantize_int8`) and the CPU `int8` kernel
(`inference.kernels`) share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def quantize_int8(x: jax.Array, axis: int = -1):
  """Symmetric int8 along `axis` (absmax / 127): `(q, scale)`, x ~ q * scale;
  an all-zero row gets scale 1 (and stays zero)."""
  scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def fake_quantize_int8(x: jax.Array) -> jax.Array:
  """x̂ = q · scale per token (last axis), computed in fp32 and returned in
  x's dtype, with an identity (straight-through) gradient."""
  x32 = x.astype(jnp.float32)
  q, scale = quantize_int8(jax.lax.stop_gradient(x32))
  xhat = jax.lax.stop_gradient(q.astype(jnp.float32) * scale)
  # x̂ exactly in the forward (x - x is exactly 0), dx̂/dx = 1 backward.
  return (xhat + (x32 - jax.lax.stop_gradient(x32))).astype(x.dtype)
