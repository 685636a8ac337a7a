"""Learned quantizer parameters: learned-scale ternary quantizers (LSQ,
ParetoQ's SEQ, TernaryLLM's DLT) and Tequila with a learned λ, pure JAX.

Each `[in, out]` kernel carries the parameters `init_qparams` makes (the
"qparams"): `alpha` (`[groups, out]`, `[1, out]` per channel, `[1, 1]` per
tensor) and DLT's `gamma` (same shape); `lam_log` θ (`[]` per layer, `[out]`
per channel, λ = lam · exp(θ)); or v3's per-weight `lam_weight` Λ `[in, out]`.

Learned-scale forward (W/α per group, α clamped to >= `ALPHA_MIN`; `round`
is half-to-even, as torch's, so a weight at exactly the threshold is dead,
unlike AbsMean's ties):
  lsq  Q = α · clip(round(W/α), -1, 1)                    Δ = α/2
  dlt  Q = α · clip(round(W/α), -1, 1) + γ                Δ = α/2
  seq  Q = α · round(1.5 · clip(W/α, -0.99, 0.99)) / 1.5  Δ = α/3, levels ±2α/3
Backward (ParetoQ `LsqBinaryTernaryExtension` / `StretchedElasticQuant`,
AngelSlim `DLTQuant`, at ternary): W gets dQ where W/α is inside the clip
range (|W/α| <= 1; seq 0.99), 0 outside; α gets
grad_scale · Σ_group coef · dQ with grad_scale = 1/sqrt(numel of the whole
kernel) and coef = Q/α - W/α inside, ±1 outside (also for seq, whose clipped
levels are ±2/3: the reference's Qp = Qn = 1); γ gets Σ_group dQ. The
gradient reaches α even while the clamp holds it at `ALPHA_MIN`.

v3 (official `ultraquantv3`): y = x @ Q_absmean + c, c_j = Σ_{i∈D} Λ_ij W_ij
with Λ detached in the forward; W's gradient is α · dQ on active weights and
Λ_ij · Σ_tokens g_j on D (the identity STE is replaced, not added, there);
Λ's gradient is not dL/dΛ but that of the official local regression
`Σ_t Σ_j (Σ_i x_ti B_ij - Σ_i Λ_ij B_ij)^2 / T` (B = W on D), which is
-2 B_ij (x̄ · B_:j - s_j) with x̄ the token mean of the layer's input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tequila_jax.quant import ternary
from tequila_jax.quant.config import QuantConfig

# Every learned quantizer parameter a kernel may carry (`init_qparams`).
QPARAM_NAMES = ("alpha", "gamma", "lam_log", "lam_weight")
ALPHA_MIN = 1e-5
SEQ_CLIP = 0.99  # ParetoQ's clip_val = 1 - 1e-2
SEQ_LEVELS = 1.5  # n_levels at num_bits = 0


def scale_shape(shape, cfg: QuantConfig) -> tuple[int, int]:
  """Shape of a `[in, out]` kernel's alpha: `[groups, out]`, or `[1, 1]`."""
  if cfg.granularity == "per_tensor":
    return (1, 1)
  return (cfg.num_groups(shape[0]), shape[1])


def init_qparams(w: jax.Array, cfg: QuantConfig, key=None) -> dict:
  """The learned parameters of one `[in, out]` kernel at the start of a run:
  alpha = max|W| per group (ParetoQ's init), gamma = 0, θ = 0, and v3's Λ ~
  N(0, lam_std²) from `key` (the official `randn * range_of_lambada`)."""
  cfg.check_kernel_shape(w.shape)
  w = jax.lax.stop_gradient(w).astype(ternary.stat_dtype(w.dtype))
  if cfg.learned_scale:
    a = jnp.abs(ternary._grouped(w, cfg))  # pylint: disable=protected-access
    axes = (1, 2) if cfg.granularity == "per_tensor" else (1,)
    alpha = jnp.max(a, axis=axes).reshape(scale_shape(w.shape, cfg))
    out = {"alpha": alpha}
    if cfg.method == "dlt":
      out["gamma"] = jnp.zeros_like(alpha)
    return out
  if cfg.lam_mode == "per_layer":
    return {"lam_log": jnp.zeros((), w.dtype)}
  if cfg.lam_mode == "per_channel":
    return {"lam_log": jnp.zeros(w.shape[1:], w.dtype)}
  if cfg.lam_mode == "v3":
    if key is None:
      raise ValueError("lam_mode='v3' draws Λ at random: pass a PRNG key.")
    return {"lam_weight": cfg.lam_std * jax.random.normal(key, w.shape,
                                                          w.dtype)}
  return {}


def qparam_axes(name: str, cfg: QuantConfig, kernel_axes: tuple) -> tuple:
  """Logical axis names of a learned parameter, from its kernel's
  `(in, out)` names: α and γ are `("groups", out)`, a per-channel θ
  `(out,)`, Λ the kernel's."""
  if name in ("alpha", "gamma"):
    return ("groups", kernel_axes[1])
  if name == "lam_log":
    return (kernel_axes[1],) if cfg.lam_mode == "per_channel" else ()
  return tuple(kernel_axes)


def check_qparams(qparams, w_shape, cfg: QuantConfig, name="kernel") -> dict:
  """`qparams` if it holds what `cfg` learns, with the right shapes; a
  `ValueError` naming what is missing otherwise."""
  want = jax.eval_shape(functools.partial(init_qparams, cfg=cfg,
                                          key=jax.random.key(0)),
                        jax.ShapeDtypeStruct(w_shape, jnp.float32))
  got = qparams or {}
  if set(got) != set(want) or any(
      tuple(jnp.shape(got[k])) != want[k].shape for k in want):
    have = {k: tuple(jnp.shape(v)) for k, v in got.items()}
    need = {k: v.shape for k, v in want.items()}
    raise ValueError(
        f"{name}: quant method {cfg.method!r} (lam_mode {cfg.lam_mode!r}) "
        f"learns {need or 'no parameters'}, got {have or 'none'}. Build the "
        "layer with this QuantConfig (TernaryDense makes them), or start them "
        "with quant.init_qparams.")
  return got


def _clamped(alpha: jax.Array) -> jax.Array:
  return jnp.where(alpha > ALPHA_MIN, alpha, ALPHA_MIN)


def _grouped_ratio(w, alpha, cfg):
  """`(W/α as [groups, G, out], clamped α as [groups, 1, out])` in fp32+."""
  dt = ternary.stat_dtype(w.dtype)
  a = _clamped(alpha.astype(dt))[:, None, :]
  return ternary._grouped(w.astype(dt), cfg) / a, a  # pylint: disable=protected-access


def _levels(cfg: QuantConfig) -> float:
  return SEQ_LEVELS if cfg.method == "seq" else 1.0


def _codes_of_ratio(q: jax.Array, cfg: QuantConfig) -> jax.Array:
  if cfg.method == "seq":
    return jnp.round(jnp.clip(q, -SEQ_CLIP, SEQ_CLIP) * SEQ_LEVELS)
  return jnp.clip(jnp.round(q), -1, 1)


def codes_and_alpha(w: jax.Array, alpha: jax.Array, cfg: QuantConfig
                    ) -> tuple[jax.Array, jax.Array]:
  """`(codes [in, out] int8, step [groups, out])` with Q = codes · step
  (+ γ): step = clamped α, or 2α/3 for seq (no gradient)."""
  q, a = _grouped_ratio(jax.lax.stop_gradient(w), jax.lax.stop_gradient(alpha),
                        cfg)
  codes = _codes_of_ratio(q, cfg).astype(jnp.int8).reshape(w.shape)
  return codes, a[:, 0, :] / _levels(cfg)


def threshold_ratio(w, alpha, cfg: QuantConfig) -> jax.Array:
  """|W| / Δ as `[in, out]`: Δ = α/2 (lsq, dlt) or α/3 (seq)."""
  q, _ = _grouped_ratio(jax.lax.stop_gradient(w), jax.lax.stop_gradient(alpha),
                        cfg)
  return (jnp.abs(q) * (2.0 * _levels(cfg))).reshape(w.shape)


def group_stats(wg: jax.Array, alpha: jax.Array, cfg: QuantConfig):
  """`(codes, |W|/Δ)` of grouped weights `[n, G, out]` whose α is `alpha`
  (broadcast to `[n, 1, out]`); the sampled-groups path of the diagnostics."""
  dt = ternary.stat_dtype(wg.dtype)
  q = wg.astype(dt) / _clamped(alpha.astype(dt))
  return (_codes_of_ratio(q, cfg).astype(jnp.int8),
          jnp.abs(q) * (2.0 * _levels(cfg)))


# --------------------------------------------------------------------------
# Learned scales: one custom_vjp on the kernel, then one matmul
# --------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def scaled_kernel(w, alpha, gamma, cfg: QuantConfig, dtype) -> jax.Array:
  """Q(W; α[, γ]) as `[in, out]` in `dtype` with the references' gradients
  (module doc); `gamma` is None except for `dlt`."""
  return _sk_fwd(w, alpha, gamma, cfg, dtype)[0]


def _sk_fwd(w, alpha, gamma, cfg, dtype):
  codes, step = codes_and_alpha(w, alpha, cfg)
  q = ternary.dequantize(codes, step, ternary.stat_dtype(w.dtype))
  if gamma is not None:
    q = q + _per_weight(gamma.astype(q.dtype), w.shape)
  return q.astype(dtype), (w, alpha, gamma is not None)


def _per_weight(v: jax.Array, shape) -> jax.Array:
  """A `[groups, out]` (or `[1, 1]`) per-group value broadcast to `[in, out]`."""
  groups = v.shape[0]
  return jnp.broadcast_to(v[:, None, :], (groups, shape[0] // groups,
                                          shape[1])).reshape(shape)


def _group_sum(a: jax.Array, alpha_shape) -> jax.Array:
  """Sums a grouped `[groups, G, out]` array to alpha's shape."""
  if alpha_shape == (1, 1):
    return jnp.sum(a).reshape(1, 1)
  return ternary.group_sum(a)[:, 0, :]


def _sk_bwd(cfg, dtype, res, dq):
  del dtype
  w, alpha, has_gamma = res
  q, a = _grouped_ratio(w, alpha, cfg)
  dq = ternary._grouped(dq.astype(q.dtype), cfg)  # pylint: disable=protected-access
  clip = SEQ_CLIP if cfg.method == "seq" else 1.0
  small, big = q < -clip, q > clip
  middle = ~(small | big)
  level = _codes_of_ratio(q, cfg) / _levels(cfg)
  coef = jnp.where(small, -1.0, jnp.where(big, 1.0, level - q))
  grad_scale = 1.0 / jnp.sqrt(float(w.size))
  dalpha = _group_sum(coef * dq * grad_scale, alpha.shape).astype(alpha.dtype)
  dw = jnp.where(middle, dq, 0).reshape(w.shape).astype(w.dtype)
  dgamma = (_group_sum(dq, alpha.shape).astype(alpha.dtype) if has_gamma
            else None)
  return dw, dalpha, dgamma


scaled_kernel.defvjp(_sk_fwd, _sk_bwd)


# --------------------------------------------------------------------------
# Tequila with a learned λ
# --------------------------------------------------------------------------

def lam_value(qparams: dict, cfg: QuantConfig) -> jax.Array:
  """λ = lam · exp(θ) (`[]` per layer, `[out]` per channel), fp32."""
  theta = qparams["lam_log"]
  return cfg.lam * jnp.exp(theta.astype(ternary.stat_dtype(theta.dtype)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def v3_kernel(w, lam_weight, x_mean, cfg: QuantConfig, dtype):
  """`(Q in dtype, c fp32)` of the official `ultraquantv3` (module doc);
  `x_mean` is the token mean of the layer's input (fp32 `[in]`), used only
  by Λ's regression gradient."""
  return _v3_fwd(w, lam_weight, x_mean, cfg, dtype)[0]


def _v3_fwd(w, lam_weight, x_mean, cfg, dtype):
  codes, alpha = ternary.ternarize(w, cfg)
  q = ternary.dequantize(codes, alpha, dtype)
  c, y_mean = _v3_sums(w, codes, lam_weight, x_mean)
  # The regression's residual x̄·B_:j - s_j (s_j = c_j), made here from the
  # B the forward builds anyway, is all that Λ's gradient needs besides W
  # and the codes: the backward is then elementwise over W (no B, no sum,
  # no matvec).
  return (q, c), (codes, alpha, w, lam_weight, y_mean - c, x_mean)


def _v3_sums(w, codes, lam_weight, x_mean=None):
  """`(c, x̄·B)`, both `[out]` fp32 (`x_mean` None: c alone), from one
  B = W on D: c_j = Σ_i Λ_ij B_ij, (x̄·B)_j = Σ_i x̄_i B_ij."""
  stat = ternary.stat_dtype(w.dtype)
  b = jnp.where(codes == 0, w.astype(stat), 0)
  c = jnp.sum(jax.lax.stop_gradient(lam_weight).astype(stat) * b, axis=0)
  if x_mean is None:
    return c, None
  return c, jnp.matmul(x_mean.astype(stat), b,
                       precision=jax.lax.Precision.HIGHEST)


def v3_bias(w, codes, lam_weight) -> jax.Array:
  """c_j = Σ_{i∈D} Λ_ij W_ij (fp32; no gradient to Λ)."""
  return _v3_sums(w, codes, lam_weight)[0]


def _v3_bwd(cfg, dtype, res, cotangents):
  del cfg, dtype
  codes, alpha, w, lam_weight, resid, x_mean = res
  dq, dc = cotangents
  stat = ternary.stat_dtype(w.dtype)
  dead = codes == 0
  # UltraQuantV3.backward: grad_A * scale on active weights, grad_B on D.
  active = dq.astype(stat) * _per_weight(alpha.astype(stat), w.shape)
  # (-Λ)·(-dc) = Λ·dc exactly; the negation keeps XLA:CPU from fusing the
  # token sum that makes dc, and its broadcast, into a YNNPACK call that
  # writes a W-sized copy of dc.
  dc = -dc.astype(stat)
  dw = jnp.where(dead, -lam_weight.astype(stat) * dc[None, :], active)
  # update_lambada_v3: d/dΛ of Σ_t Σ_j (x_t · B_:j - s_j)^2 / T.
  dlam = jnp.where(dead, -2.0 * w.astype(stat) * resid[None, :], 0)
  return (dw.astype(w.dtype), dlam.astype(lam_weight.dtype),
          jnp.zeros_like(x_mean))


v3_kernel.defvjp(_v3_fwd, _v3_bwd)
