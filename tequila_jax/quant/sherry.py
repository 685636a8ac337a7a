"""Sherry (arXiv 2601.07892): 3:4 sparse ternary weights trained with the
Arenas residual, pure JAX.

Quantizer (the official `NMQuant`, AngelSlim branch `sherry`). For every
output unit j, the input axis is cut into blocks of 4 consecutive weights;
each block keeps its 3 largest |W| and prunes the smallest (among equal
smallest |W|, the one of highest index: the official CUDA top-k keeps the
lower index). Codes are sign(W) on the kept weights (sign(0) = 0, as the
official: an exactly-zero kept weight keeps code 0), and each group's scale
is Σ|kept| / (G·3/4), the mean |W| of its nominal 3G/4 kept weights:

    Q[i, j] = codes[i, j] · alpha[i // G, j]

Arenas (training only). `y = x · (Q + εW)`: one dot where the official runs
two (x·Q + ε·x·W), with the straight-through gradient of `NMQuant`:

    dx = g · (Q + εW)ᵀ,   dW = (1 + ε) · xᵀ g.

At ε = 0 (inference, every export) the layer is plain 3:4 ternary. ε follows
`arenas_eps`, a function of the optimizer step (the official counts forward
calls; see its docstring).

Diagnostics read a 3:4 block the way they read a threshold (`block_stats`):
the pruned weight is Sherry's deadzone (a quarter of all weights by
construction), its r = |W| / (the smallest kept |W| of its block), so that
0.8 <= r < 1 is a pruned weight within 20% of being kept (the trap band); a
kept weight's r = |W| / (the pruned |W|), its distance to being pruned.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tequila_jax.quant import ternary
from tequila_jax.quant.config import QuantConfig

BLOCK = 4  # M of N:M; N = 3 weights kept per block
KEPT = 3


def _blocks(a: jax.Array) -> jax.Array:
  """`[..., in, out]` -> `[..., in // 4, 4, out]`."""
  *lead, d_in, d_out = a.shape
  return a.reshape(*lead, d_in // BLOCK, BLOCK, d_out)


def _pruned(a: jax.Array) -> jax.Array:
  """Which entry of each block `[..., 4, out]` of |W| is pruned: the smallest,
  the highest index among equals (elementwise, no sort)."""
  lowest = jnp.min(a, axis=-2, keepdims=True)
  is_min = [a[..., k, :] == lowest[..., 0, :] for k in range(BLOCK)]
  later = jnp.zeros_like(is_min[0])
  out = [None] * BLOCK
  for k in reversed(range(BLOCK)):
    out[k] = is_min[k] & ~later
    later = later | is_min[k]
  return jnp.stack(out, axis=-2)


def keep_mask(w: jax.Array) -> jax.Array:
  """Boolean `[in, out]`: the 3 kept weights of every block of 4 inputs."""
  a = _blocks(jnp.abs(jax.lax.stop_gradient(w)))
  return ~_pruned(a).reshape(w.shape)


def ternarize(w: jax.Array, cfg: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """`(codes [in, out] int8, alpha)` of a `[in, out]` kernel under
  `NMQuant` (module doc); alpha has `ternary.ternarize`'s shapes. No
  gradient; statistics in fp32 (fp64 for fp64 weights)."""
  cfg.check_kernel_shape(w.shape)
  w = jax.lax.stop_gradient(w).astype(ternary.stat_dtype(w.dtype))
  kept = keep_mask(w)
  codes = jnp.where(kept, jnp.sign(w), 0).astype(jnp.int8)
  a = jnp.where(kept, jnp.abs(w), 0)
  if cfg.granularity == "per_tensor":
    total = jnp.sum(a).reshape(1, 1)
    return codes, total / (a.size * KEPT / BLOCK)
  ag = a.reshape(cfg.num_groups(w.shape[0]), -1, w.shape[1])
  return codes, ternary.group_sum(ag)[:, 0, :] / (ag.shape[1] * KEPT / BLOCK)


def block_stats(wg: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(codes, r)` of weights `[..., in, out]` (in a multiple of 4), block by
  block: the 3:4 codes and each weight's distance to its block's threshold,
  r = |W| / (the |W| it would have to pass to change side): for the pruned
  weight the smallest kept |W| (r <= 1), for a kept weight the pruned |W|
  (r >= 1; it is pruned once it falls below it). Close contenders thus sit
  just below and just above 1, as around the absmean threshold; r = 0 for a
  pruned weight whose block keeps a 0, and a kept weight of a block that
  prunes a 0 has the largest finite r. Depends on the block alone, so any
  slice of whole blocks gives the same values as the kernel."""
  w = jax.lax.stop_gradient(wg).astype(ternary.stat_dtype(wg.dtype))
  a = _blocks(jnp.abs(w))
  pruned = _pruned(a)
  low_kept = jnp.min(jnp.where(pruned, jnp.inf, a), axis=-2, keepdims=True)
  low = jnp.max(jnp.where(pruned, a, -jnp.inf), axis=-2, keepdims=True)
  across = jnp.where(pruned, low_kept, low)
  r = a / jnp.where(across > 0, across, 1)
  # XLA may divide as a · (1 / across): keep its rounding on the side of 1
  # the block decided (a tie is pruned at exactly 1).
  big = jnp.finfo(r.dtype).max
  r = jnp.where(pruned, jnp.minimum(r, 1), jnp.maximum(r, 1))
  r = jnp.where(across > 0, r, jnp.where(pruned, 0, big))
  codes = jnp.where(pruned, 0, jnp.sign(_blocks(w))).astype(jnp.int8)
  return codes.reshape(w.shape), r.reshape(w.shape)


def arenas_eps(step, total_steps: int, warmup_fraction: float = 0.1,
               max_eps: float = 1.0) -> jax.Array:
  """Arenas' ε at 0-based optimizer step `step` (an int or traced int):
  linear from 0 to `max_eps` over the first `int(warmup_fraction ·
  total_steps)` steps, cosine back to 0 at the last step, 0 from the last
  step on (also with `warmup_fraction=1`). Equals the official schedule with
  its counter at `step + 1` and its total `total_steps`. The official
  counter counts forward calls (evaluation and gradient-accumulation
  forwards too), its total is hard-coded to 22111, and its last branch
  crashes (docs/methods.md); here ε is a function of the optimizer step,
  whatever the forwards."""
  warmup = int(warmup_fraction * total_steps)
  count = jnp.asarray(step, jnp.float32) + 1
  rise = count / max(warmup, 1)
  progress = (count - warmup) / max(total_steps - warmup, 1)
  fall = 0.5 * (1 + jnp.cos(math.pi * progress))
  eps = jnp.where(count >= total_steps, 0.0,
                  jnp.where(count <= warmup, rise, fall))
  return (max_eps * eps).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def arenas_kernel(w: jax.Array, eps, cfg: QuantConfig, dtype) -> jax.Array:
  """`Q(W) + ε·W` in `dtype`: the one kernel of Arenas' `x·Q + ε·x·W`, with
  the gradient `dW = (1 + ε)·dK` (identity STE through Q); ε gets none."""
  return _ak_fwd(w, eps, cfg, dtype)[0]


def _ak_fwd(w, eps, cfg, dtype):
  codes, alpha = ternarize(w, cfg)
  stat = ternary.stat_dtype(w.dtype)
  q = ternary.dequantize(codes, alpha, stat)
  if not (isinstance(eps, (int, float)) and eps == 0):  # ε = 0: Q alone
    q = q + eps * w.astype(stat)
  kernel = q.astype(dtype)
  return kernel, (jnp.asarray(eps), jnp.zeros((), w.dtype))


def _ak_bwd(cfg, dtype, res, dk):
  del cfg, dtype
  eps, w_proto = res
  stat = ternary.stat_dtype(w_proto.dtype)
  # ε may come back as a Python scalar (the default 0.0 under remat/scan).
  dw = (1 + jnp.asarray(eps, stat)) * dk.astype(stat)
  return dw.astype(w_proto.dtype), jnp.zeros_like(eps)


arenas_kernel.defvjp(_ak_fwd, _ak_bwd)


def sherry_kernel(w: jax.Array, cfg: QuantConfig, dtype) -> jax.Array:
  """`Q(W)` in `dtype` with the identity STE (Arenas at ε = 0)."""
  return arenas_kernel(w, 0.0, cfg, dtype)
