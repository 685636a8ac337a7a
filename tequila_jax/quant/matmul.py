"""Quantized matmuls `y = x @ kernel` for every method of `QuantConfig`.

`absmean`, `twn` and `tequila` share one `jax.custom_vjp` on the kernel,
`quantize_kernel`, which makes `Q(W)` and the Tequila bias `c(W)` in one pass
over W and saves only the int8 codes:
  forward   y = x @ Q + c(W),  c_j = λ_j · Σ_{i∈D} W_ij  (a masked column sum)
  backward  dx = g @ Qᵀ,  dW = xᵀ g + [i∈D] · λ_j · Σ_tokens g_j   (§1.3)
            dλ_j = Σ_tokens g_j · Σ_{i∈D} W_ij   (learned λ only)
(`dx` and `xᵀ g` are the ordinary matmul gradients; `quantize_kernel` passes
dQ straight through and adds λ·dc on the deadzone.) λ = 0 (`absmean`, `twn`)
is the identity-STE baseline through the very same code. The learned-scale
methods (`lsq`, `seq`, `dlt`) and Tequila's `v3` λ have their own custom_vjp
in `learned.py`, Sherry's 3:4 kernel (with its Arenas residual) in
`sherry.py`, each followed by the same one matmul. `Q` and `c` carry
checkpoint names so that a remat policy can keep them (`QUANT_NAMES`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tequila_jax.quant import learned, sherry, ternary
from tequila_jax.quant.activations import fake_quantize_int8
from tequila_jax.quant.config import QuantConfig

QUANT_NAMES = ("quantized_kernel", "tequila_bias")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def quantize_kernel(w: jax.Array, lam, cfg: QuantConfig, dtype
                    ) -> tuple[jax.Array, jax.Array]:
  """`(Q(W) in dtype, c(W) in fp32)` with the Tequila gradient (arXiv
  2509.23809). λ is `cfg.bias_lam` (a constant; `lam` is None), or with a
  learned `cfg.lam_mode` the fp32 array `lam` (`[]` or `[out]`), which then
  gets its gradient too."""
  return _qk_fwd(w, lam, cfg, dtype)[0]


def _qk_fwd(w, lam, cfg, dtype):
  codes, alpha = ternary.ternarize(w, cfg)
  q = ternary.dequantize(codes, alpha, dtype)
  stat = ternary.stat_dtype(w.dtype)
  dead_sum = None
  if cfg.learned_lam:
    dead_sum = ternary.dead_column_sum(w.astype(stat), codes)
    c = lam * dead_sum
  elif cfg.bias_lam:
    c = cfg.bias_lam * ternary.dead_column_sum(w.astype(stat), codes)
  else:
    c = jnp.zeros(w.shape[1:], stat)
  # The zero-d `w_proto` only carries W's dtype to the backward pass; a
  # learned λ keeps itself and the dead column sums (one per output).
  return (q, c), (codes, jnp.zeros((), w.dtype), lam, dead_sum)


def _qk_bwd(cfg, dtype, res, cotangents):
  del dtype
  codes, w_proto, lam, dead_sum = res
  dq, dc = cotangents
  dw = dq.astype(ternary.stat_dtype(w_proto.dtype))
  if cfg.learned_lam:
    dw = dw + jnp.where(codes == 0, lam * dc.astype(dw.dtype), 0)
    dlam = dc.astype(dead_sum.dtype) * dead_sum
    dlam = (jnp.sum(dlam) if jnp.ndim(lam) == 0 else dlam).astype(lam.dtype)
    return dw.astype(w_proto.dtype), dlam
  if cfg.bias_lam:
    dw = dw + jnp.where(codes == 0, cfg.bias_lam * dc.astype(dw.dtype), 0)
  return dw.astype(w_proto.dtype), None


quantize_kernel.defvjp(_qk_fwd, _qk_bwd)


@jax.custom_vjp
def add_bias(y: jax.Array, c: jax.Array) -> jax.Array:
  """`y[..., out] + c[out]` in y's dtype; the bias cotangent `dc = Σ_tokens g`
  is accumulated in c's dtype (fp32), not in y's (bf16 sums lose ~1%)."""
  return y + c.astype(y.dtype)


def _add_bias_fwd(y, c):
  return add_bias(y, c), jnp.zeros((), c.dtype)


def _add_bias_bwd(c_proto, g):
  dc = jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=c_proto.dtype)
  return g, dc


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def ternary_matmul(x: jax.Array, w: jax.Array, cfg: QuantConfig,
                   lam=None) -> jax.Array:
  """`x[..., in] @ Q + c(W)` in `x.dtype`; `w` is the latent `[in, out]`
  kernel, `lam` a learned λ (None: `cfg.bias_lam`)."""
  q, c = quantize_kernel(w, lam, cfg, x.dtype)
  return _biased(x, q, c, has_bias=bool(cfg.learned_lam or cfg.bias_lam))


def _biased(x, q, c, has_bias: bool) -> jax.Array:
  y = jnp.matmul(x, checkpoint_name(q, QUANT_NAMES[0]))
  if has_bias:
    y = add_bias(y, checkpoint_name(c, QUANT_NAMES[1]))
  return y


def _token_mean(x: jax.Array) -> jax.Array:
  """The input's mean over every leading (token) axis, fp32, no gradient."""
  x = jax.lax.stop_gradient(x).astype(ternary.stat_dtype(x.dtype))
  return jnp.mean(x.reshape(-1, x.shape[-1]), axis=0)


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
    return jnp.matmul(x, kernel.astype(x.dtype))
  # minima (official `ultraquant`): x @ Q + sign(x) @ B with B = ±eps on D
  # (+eps where W >= 0, as the official mask does). Its backward adds
  # dB = sign(x)ᵀ g to W on D *unscaled*: B's forward value with an identity
  # gradient to W_D (the `w_dead - stop_gradient(w_dead)` term is exactly 0).
  # sign(x) passes no gradient back to x.
  signs = jnp.where(codes == 0, jnp.where(w >= 0, 1.0, -1.0), 0.0)
  b = cfg.eps * signs.astype(w.dtype) + (w_dead - jax.lax.stop_gradient(w_dead))
  y = jnp.matmul(x, _ste(w, q).astype(x.dtype))
  return y + jnp.matmul(jnp.sign(x), b.astype(x.dtype))


def quantized_matmul(x: jax.Array, w: jax.Array, cfg: QuantConfig,
                     qparams: dict | None = None, *,
                     arenas_eps=0.0) -> jax.Array:
  """`x[..., in] @ w[in, out]` under `cfg.method`, computed in `x.dtype`;
  `qparams` holds the kernel's learned quantizer parameters, if its method
  has any (`learned.init_qparams`). With `cfg.act_bits == 8` the input is
  first fake-quantized to int8 per token (`activations`), bias paths
  included. `arenas_eps` is Sherry's Arenas ε (`x·(Q + εW)`, `sherry`
  only; 0 at inference), a float or a traced scalar."""
  cfg.check_kernel_shape(w.shape)
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"input has {x.shape[-1]} features but the kernel is "
                     f"[in={w.shape[0]}, out={w.shape[1]}].")
  qparams = learned.check_qparams(qparams, w.shape, cfg)
  if cfg.act_bits == 8:  # W1.58A8: every path below sees x̂
    x = fake_quantize_int8(x)
  if cfg.method == "none":  # the float baseline, as a bf16 nn.Dense computes
    return jnp.matmul(x, w.astype(x.dtype))
  if cfg.method == "sherry":
    q = sherry.arenas_kernel(w, arenas_eps, cfg, x.dtype)
    return jnp.matmul(x, checkpoint_name(q, QUANT_NAMES[0]))
  if cfg.method in ("tequila_dynamic", "minima"):
    return _input_dependent(x, w, cfg)
  if cfg.learned_scale:
    q = learned.scaled_kernel(w, qparams["alpha"], qparams.get("gamma"), cfg,
                              x.dtype)
    return jnp.matmul(x, checkpoint_name(q, QUANT_NAMES[0]))
  if cfg.lam_mode == "v3":
    q, c = learned.v3_kernel(w, qparams["lam_weight"], _token_mean(x), cfg,
                             x.dtype)
    return _biased(x, q, c, has_bias=True)
  if cfg.learned_lam:
    return ternary_matmul(x, w, cfg, learned.lam_value(qparams, cfg))
  return ternary_matmul(x, w, cfg)
