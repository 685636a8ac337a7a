"""Ternary codes and scales of a `[in, out]` kernel (absmean, Tequila arXiv 2509.23809), pure JAX.

Scales `alpha` have shape `[num_groups, out]` for `per_group`, `[1, out]` for
`per_channel` and `[1, 1]` for `per_tensor`; for every weight
`Q[i, j] = codes[i, j] * alpha[i // (in // num_groups), j]`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tequila_jax.quant.config import QuantConfig


class TernaryState(NamedTuple):
  """A ternarized kernel: `Q = dequantize(codes, alpha) (+ gamma)`, bias `c`
  per output.

  codes: int8 `[in, out]` in {-1, 0, 1}; alpha: fp32 scales (module doc);
  c: fp32 `[out]`, `λ Σ_{i∈D} W[i, :]` (zero unless `tequila`); gamma: DLT's
  per-group offset (alpha's shape, added to every weight of its group), or
  None for every other method.
  """
  codes: jax.Array
  alpha: jax.Array
  c: jax.Array
  gamma: jax.Array | None = None


def _grouped(w: jax.Array, cfg: QuantConfig) -> jax.Array:
  """`[in, out]` -> `[groups, in // groups, out]`."""
  d_in, d_out = w.shape
  groups = cfg.num_groups(d_in)
  return w.reshape(groups, d_in // groups, d_out)


def stat_dtype(dtype) -> jnp.dtype:
  """Quantizer statistics run in fp32 (or fp64 when the weights are fp64)."""
  return jnp.promote_types(dtype, jnp.float32)


def _reduce_axes(cfg: QuantConfig) -> tuple[int, ...]:
  return (1, 2) if cfg.granularity == "per_tensor" else (1,)


def _codes(wg: jax.Array, delta: jax.Array) -> jax.Array:
  """Ternary code with ties at exactly ±delta going to ±1."""
  return jnp.where(wg >= delta, 1, jnp.where(wg <= -delta, -1, 0)).astype(
      jnp.int8)


def group_sum(a: jax.Array) -> jax.Array:
  """Sum over the middle (in-group) axis of `[groups, G, out]`, keepdims,
  written as pairwise halvings, which XLA:CPU fuses into one loop (a reduce
  over this middle axis runs ~3x slower there)."""
  while a.shape[1] > 1 and a.shape[1] % 2 == 0:
    half = a.shape[1] // 2
    a = a[:, :half] + a[:, half:]
  return jnp.sum(a, axis=1, keepdims=True)


def _mean_abs(wg: jax.Array, cfg: QuantConfig) -> jax.Array:
  """mean |W| per group of the grouped view, keepdims (`group_sum`)."""
  a = jnp.abs(wg)
  if cfg.granularity == "per_tensor":
    return jnp.mean(a, axis=(1, 2), keepdims=True)
  return group_sum(a) / a.shape[1]


def _threshold(w: jax.Array, cfg: QuantConfig):
  """(grouped |W|-statistics view `wg`, per-group delta, mean|W|)."""
  cfg.check_kernel_shape(w.shape)
  return _group_threshold(jax.lax.stop_gradient(_grouped(w, cfg)), cfg)


def _group_threshold(wg: jax.Array, cfg: QuantConfig):
  """`_threshold` of weights already laid out as `[groups, G, out]`."""
  wg = wg.astype(stat_dtype(wg.dtype))
  scale = 0.75 if cfg.method == "twn" else 0.5
  if cfg.stat_dtype == "bfloat16":  # the official code on bf16 weights
    to_bf16 = lambda a: a.astype(jnp.bfloat16).astype(wg.dtype)  # noqa: E731
    wg = to_bf16(wg)
    mean_abs = to_bf16(_mean_abs(wg, cfg))
    return wg, to_bf16(scale * mean_abs), mean_abs
  mean_abs = _mean_abs(wg, cfg)
  return wg, scale * mean_abs, mean_abs


def _static_only(cfg: QuantConfig) -> None:
  if cfg.method == "sherry":
    raise ValueError("method 'sherry' prunes 1 of every 4 weights before its "
                     "scale: use quant.ternary_state / quant.threshold_stats "
                     "(or quant.sherry).")
  if cfg.learned_scale:
    raise ValueError(
        f"method {cfg.method!r} learns its scale α: its codes and threshold "
        "need α; use quant.ternary_state / quant.threshold_stats with the "
        "layer's learned parameters.")


def ternarize(w: jax.Array, cfg: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """Returns `(codes [in, out] int8, alpha in stat_dtype)`; no gradient.
  Static scales only (absmean, twn and the Tequila family)."""
  _static_only(cfg)
  wg, delta, mean_abs = _threshold(w, cfg)
  codes = _codes(wg, delta)
  if cfg.method == "twn":  # alpha = mean |W| over the non-dead weights
    axes = _reduce_axes(cfg)
    active = codes != 0
    total = jnp.sum(jnp.where(active, jnp.abs(wg), 0), axis=axes, keepdims=True)
    count = jnp.sum(active, axis=axes, keepdims=True)
    alpha = total / jnp.maximum(count, 1)
  else:  # absmean and every Tequila variant (§1.1)
    alpha = mean_abs
  return codes.reshape(w.shape), alpha[:, 0, :]


def group_threshold_stats(wg: jax.Array, cfg: QuantConfig
                          ) -> tuple[jax.Array, jax.Array]:
  """`(codes, |W| / delta)` of weights laid out as groups `[groups, G, out]`
  (G = the group size, or `in` for `per_channel`; not for `per_tensor`),
  bit-identical to `threshold_stats` of the whole kernel when G is a power
  of two: the in-group sums are pairwise halvings, whose order does not
  depend on the layout. Lets a caller evaluate a few sampled groups."""
  _static_only(cfg)
  wg, delta, _ = _group_threshold(jax.lax.stop_gradient(wg), cfg)
  ratio = jnp.abs(wg) / jnp.where(delta > 0, delta, 1)
  return _codes(wg, delta), jnp.where(delta > 0, ratio, 0)


def threshold_stats(w: jax.Array, cfg: QuantConfig
                    ) -> tuple[jax.Array, jax.Array]:
  """`(codes, |W| / delta)`, both `[in, out]`, from one set of statistics.
  r < 1 is the deadzone up to the rounding of the division (the codes are
  exact); an all-zero group (delta = 0) gives r = 0."""
  cfg.check_kernel_shape(w.shape)
  codes, ratio = group_threshold_stats(_grouped(w, cfg), cfg)
  return codes.reshape(w.shape), ratio.reshape(w.shape)


def dequantize(codes: jax.Array, alpha: jax.Array,
               dtype=jnp.float32) -> jax.Array:
  """`Q = codes * alpha` broadcast over each group, as `[in, out]` in dtype."""
  d_in, d_out = codes.shape
  groups = alpha.shape[0]
  q = codes.reshape(groups, d_in // groups, d_out).astype(dtype) * alpha[
      :, None, :].astype(dtype)
  return q.reshape(d_in, d_out)


def dead_column_sum(w: jax.Array, codes: jax.Array) -> jax.Array:
  """`sum_{i in D} W[i, j]` per output unit: a masked reduction, not a matmul."""
  return jnp.sum(jnp.where(codes == 0, w, 0), axis=0)
