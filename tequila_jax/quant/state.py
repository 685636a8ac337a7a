"""The ternary form of a kernel under any method: codes, scales, the Tequila
bias and the threshold distances that exports and diagnostics read, from
the latent kernel and its learned quantizer parameters (`qparams`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tequila_jax.quant import learned, sherry, ternary
from tequila_jax.quant.config import QuantConfig
from tequila_jax.quant.ternary import TernaryState


def ternary_state(w: jax.Array, cfg: QuantConfig,
                  qparams: dict | None = None) -> TernaryState:
  """Codes, scales, the bias `c` and DLT's `gamma` of a kernel (no
  gradient), bit-identical to what the training forward uses: Q = codes ·
  alpha (+ gamma); for `seq` alpha is the level 2α/3."""
  qparams = learned.check_qparams(qparams, w.shape, cfg)
  w = jax.lax.stop_gradient(w)
  stat = ternary.stat_dtype(w.dtype)
  if cfg.learned_scale:
    codes, step = learned.codes_and_alpha(w, qparams["alpha"], cfg)
    gamma = qparams.get("gamma")
    return TernaryState(codes, step, jnp.zeros(w.shape[1:], stat),
                        None if gamma is None else gamma.astype(stat))
  if cfg.method == "sherry":
    codes, alpha = sherry.ternarize(w, cfg)
    return TernaryState(codes, alpha, jnp.zeros(w.shape[1:], stat))
  codes, alpha = ternary.ternarize(w, cfg)
  if cfg.lam_mode == "v3":
    return TernaryState(codes, alpha,
                        learned.v3_bias(w, codes, qparams["lam_weight"]))
  lam = (learned.lam_value(qparams, cfg) if cfg.learned_lam
         else cfg.bias_lam)
  return TernaryState(
      codes, alpha, lam * ternary.dead_column_sum(w.astype(stat), codes))


def threshold_stats(w: jax.Array, cfg: QuantConfig,
                    qparams: dict | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """`(codes, r = |W| / Δ)`, both `[in, out]`: Δ is the method's deadzone
  threshold (mean|W|/2 absmean and Tequila, 0.75 mean|W| twn, α/2 lsq/dlt,
  α/3 seq with the learned α; for `sherry` the |W| across its block's
  boundary, `sherry.block_stats`: r < 1 is the pruned weight). r < 1 is the
  deadzone up to the rounding of the division and of ties (the codes are
  exact)."""
  if cfg.method == "sherry":
    cfg.check_kernel_shape(w.shape)
    return sherry.block_stats(w)
  if cfg.learned_scale:
    qparams = learned.check_qparams(qparams, w.shape, cfg)
    codes, _ = learned.codes_and_alpha(w, qparams["alpha"], cfg)
    return codes, learned.threshold_ratio(w, qparams["alpha"], cfg)
  return ternary.threshold_stats(w, cfg)


def group_threshold_stats(wg: jax.Array, cfg: QuantConfig,
                          alpha: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """`threshold_stats` of weights laid out as groups `[n, G, out]`; for a
  learned-scale method `alpha` holds each group's α (broadcast to
  `[n, 1, out]`); for `sherry` any slice of whole blocks of 4 will do (its
  statistics are the block's). Lets the diagnostics evaluate a few sampled
  groups."""
  if cfg.method == "sherry":
    return sherry.block_stats(wg)
  if cfg.learned_scale:
    if alpha is None:
      raise ValueError(f"method {cfg.method!r}: pass the groups' learned α.")
    return learned.group_stats(wg, alpha, cfg)
  return ternary.group_threshold_stats(wg, cfg)
