"""Quantized matmuls `y = x @ kernel` for every method of DESIGN.md §1.4.

`ternary_matmul` is the `jax.custom_vjp` behind `absmean`, `twn` and `tequila`:
  forward   y = x @ Q + c(W),  c_j = λ · Σ_{i∈D} W_ij  (a masked column sum)
  backward  dx = g @ Qᵀ,  dW = xᵀ g + [i∈D] · λ · Σ_tokens g_j   (§1.3)
It saves only `x`, the int8 codes and the scales. λ = 0 (`absmean`, `twn`)
is the identity-STE baseline through the very same code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tequila_jax.quant import ternary
from tequila_jax.quant.config import QuantConfig


def _flat(a: jax.Array) -> jax.Array:
  return a.reshape(-1, a.shape[-1])


def _dot(a, b, out_dtype):
  """Matmul accumulating in fp32 (fp64 if inputs are fp64)."""
  acc = ternary.stat_dtype(a.dtype)
  return jnp.matmul(a, b, preferred_element_type=acc).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def ternary_matmul(x: jax.Array, w: jax.Array, cfg: QuantConfig) -> jax.Array:
  """`x[..., in] @ Q + c(W)` in `x.dtype`; `w` is the latent `[in, out]` kernel."""
  return _fwd(x, w, cfg)[0]


def _fwd(x, w, cfg):
  codes, alpha = ternary.ternarize(w, cfg)
  acc = ternary.stat_dtype(x.dtype)
  y = jnp.matmul(x, ternary.dequantize(codes, alpha, x.dtype),
                 preferred_element_type=acc)
  if cfg.bias_lam:
    c = cfg.bias_lam * ternary.dead_column_sum(
        w.astype(ternary.stat_dtype(w.dtype)), codes)
    y = y + c.astype(acc)
  # The zero-d `w_proto` only carries W's dtype to the backward pass.
  return y.astype(x.dtype), (x, codes, alpha, jnp.zeros((), w.dtype))


def _bwd(cfg, res, g):
  x, codes, alpha, w_proto = res
  acc = ternary.stat_dtype(w_proto.dtype)
  dx = _dot(g, ternary.dequantize(codes, alpha, g.dtype).T, x.dtype)
  g2 = _flat(g)
  dw = jnp.matmul(_flat(x).T, g2, preferred_element_type=acc)
  if cfg.bias_lam:
    g_sum = jnp.sum(g2.astype(acc), axis=0)
    dw = dw + jnp.where(codes == 0, cfg.bias_lam * g_sum, 0).astype(acc)
  return dx, dw.astype(w_proto.dtype)


ternary_matmul.defvjp(_fwd, _bwd)


def _ste(w: jax.Array, q: jax.Array) -> jax.Array:
  """Forward value `q`, identity gradient to `w`."""
  return w + jax.lax.stop_gradient(q - w)


def _dead_kernel(w: jax.Array, codes: jax.Array) -> jax.Array:
  """`W_D`: W on the deadzone, 0 elsewhere (mask carries no gradient)."""
  return jnp.where(codes == 0, w, jnp.zeros_like(w))


def _input_dependent(x, w, cfg):
  codes, alpha = ternary.ternarize(w, cfg)
  q = ternary.dequantize(codes, alpha, w.dtype)
  w_dead = _dead_kernel(w, codes)
  if cfg.method == "tequila_dynamic":
    # x @ Q + λ x @ W_D, fused into one matmul over (Q + λ W_D); autodiff
    # through the bias path, identity STE through Q.
    kernel = _ste(w, q) + cfg.lam * w_dead
    return _dot(x, kernel.astype(x.dtype), x.dtype)
  # minima: x @ Q + eps * sign(x) @ sign(W_D), sign(W_D) passes the gradient
  # straight through to W on D, sign(x) none back to x.
  sign_dead = _ste(w_dead, jnp.sign(w_dead))
  acc = ternary.stat_dtype(x.dtype)
  y = _dot(x, _ste(w, q).astype(x.dtype), acc)
  y = y + cfg.eps * _dot(jnp.sign(x), sign_dead.astype(x.dtype), acc)
  return y.astype(x.dtype)


def quantized_matmul(x: jax.Array, w: jax.Array, cfg: QuantConfig) -> jax.Array:
  """`x[..., in] @ w[in, out]` under `cfg.method`, computed in `x.dtype`."""
  cfg.check_kernel_shape(w.shape)
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"input has {x.shape[-1]} features but the kernel is "
                     f"[in={w.shape[0]}, out={w.shape[1]}].")
  if cfg.method == "none":
    return _dot(x, w.astype(x.dtype), x.dtype)
  if cfg.method in ("tequila_dynamic", "minima"):
    return _input_dependent(x, w, cfg)
  return ternary_matmul(x, w, cfg)
