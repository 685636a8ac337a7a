"""Deadzone diagnostics, computed inside the jitted step (a table of them,
with when each is computed: docs/diagnostics.md).

Per ternary layer type (q_proj ... down_proj; each a `[blocks, in, out]`
stack) as `NAME/<type>`, and over the whole model as `NAME/all` (weighted by
the number of weights of each type). `r = |W| / delta` is a weight's distance
to the threshold: `r < 1` is the deadzone D. delta is the method's own
threshold (`quant.threshold_stats`: mean|W|/2 for absmean and Tequila, α/2
for lsq/dlt and α/3 for seq with the learned α), so every figure means the
same thing for every method. For Sherry (3:4), D is the pruned weight of
each block of 4 (`dead_fraction` = 0.25 by construction) and r its |W| over
the smallest kept |W| of the block (a kept weight's r: its |W| over the
pruned one), so the trap band is a pruned weight within 20% of being kept.

Every step, on a fixed random sample of `sample_size` weights per layer type
(drawn once, without replacement, from the seed), each with a counter of the
consecutive steps it has spent in D (carried in the train state and the
checkpoint); only the sampled weights' quantizer groups are read, so this
costs next to nothing:
- `trapped_fraction`: sampled weights in the trap band `0.8 <= r < 1` that
  have been in D for at least `trap_steps` (S) consecutive steps, as a share
  of all (sampled) weights; `trapped_of_dead`: the same count over the dead
  sampled weights.
- `escape_rate`: of the sampled weights in the trap band at the start of a
  window of S steps, the share that left D at least once within it. Each
  completed window's value is carried until the next completes (NaN before
  the first, or for a window that started with an empty band; written as
  null).

On logging steps (a second compiled variant of the step; metrics are only
written on those), over all weights, for the step's update:
- `dead_fraction`: |D| / n after the update.
- `boundary_fraction`: share with `0.9 <= r < 1.1`.
- `flip_rate`: share whose ternary code changed in this step.
- `crossing_rate`: share that crossed the threshold (entered or left D) in
  this step: threshold crossings per weight per step.
- `pileup_ratio`: weights in D with `1 - w <= r < 1` over weights outside D
  with `1 <= r < 1 + w` (w = the histogram's bin width: the two bins beside
  the threshold); > 1 when weights pile up just inside the deadzone.
- `ratio_hist`: a histogram of r over `[0, hist_max)` in `hist_bins` bins.
- `gsnr_dead` / `gsnr_active`: per-weight gradient signal-to-noise ratio
  `mean(g)^2 / var(g)` across the step's micro-batches (unbiased variance),
  averaged over dead resp. active weights; needs `micro_batches >= 2`. The
  per-weight ratio is heavy-tailed (Cauchy-like with 2 micro-batches), so
  `gsnr_pooled_dead` / `_active` (mean of mean(g)^2 over mean of var(g)) are
  reported too, and `gsnr_ratio_LO_HI` the pooled figure over the weights
  with `LO <= r < HI` (`GSNR_BINS`; the 0.8-1 bin is the trap band). D, r
  and the bins are those of the weights the gradients were taken at. GSNR
  depends on the micro-batch size: compare runs at equal micro-batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax import quant
from tequila_jax.model import PROJECTIONS
from tequila_jax.quant import QuantConfig

LAYER_TYPES = tuple(PROJECTIONS)
BOUNDARY_BAND = (0.9, 1.1)
TRAP_BAND = (0.8, 1.0)
GSNR_BINS = (0.0, 0.4, 0.8, 1.0, 1.2, 2.0, math.inf)


def gsnr_bin_name(lo: float, hi: float) -> str:
  return f"gsnr_ratio_{lo:g}_{hi:g}"


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
  """What the diagnostics measure; `quant` is the layers' quantizer."""
  quant: QuantConfig = QuantConfig()
  trap_steps: int = 100
  sample_size: int = 4096
  hist_bins: int = 60
  hist_max: float = 3.0
  seed: int = 0

  def __post_init__(self):
    if self.trap_steps < 1:
      raise ValueError(f"diagnostics.trap_steps must be >= 1, got "
                       f"{self.trap_steps}.")
    if self.sample_size < 1:
      raise ValueError(f"diagnostics.sample_size must be >= 1, got "
                       f"{self.sample_size}.")
    below = self.hist_bins / self.hist_max  # bins per unit of r
    if self.hist_max <= 1 or abs(below - round(below)) > 1e-9:
      raise ValueError(
          f"diagnostics.hist_max={self.hist_max} / hist_bins={self.hist_bins}"
          " must put a bin edge at r = 1 (the threshold) below hist_max; e.g. "
          "hist_max=3.0, hist_bins=60.")

  @property
  def bin_width(self) -> float:
    return self.hist_max / self.hist_bins

  @property
  def hist_edges(self) -> np.ndarray:
    return np.linspace(0.0, self.hist_max, self.hist_bins + 1)


def ternary_kernels(params: dict) -> dict[str, jax.Array]:
  """The stacked `[blocks, in, out]` kernels of every ternary layer type."""
  return {k: params["layers"][block][k]["kernel"]
          for k, block in PROJECTIONS.items()}


def ternary_qparams(params: dict) -> dict[str, dict]:
  """The stacked learned quantizer parameters of every ternary layer type
  (empty dicts for static methods)."""
  return {k: {n: v for n, v in params["layers"][block][k].items()
              if n in quant.QPARAM_NAMES}
          for k, block in PROJECTIONS.items()}


def lam_metrics(params: dict, qcfg: QuantConfig) -> dict:
  """`lam/<type>`: the mean λ of each layer type's Tequila bias (λ = lam ·
  exp(θ), or v3's per-weight Λ, whose mean magnitude is `lam_abs/<type>`:
  Λ starts symmetric around 0), for a learned `lam_mode`."""
  out = {}
  for k, qp in ternary_qparams(params).items():
    if "lam_weight" in qp:
      out[f"lam/{k}"] = jnp.mean(qp["lam_weight"])
      out[f"lam_abs/{k}"] = jnp.mean(jnp.abs(qp["lam_weight"]))
    else:
      out[f"lam/{k}"] = jnp.mean(quant.learned.lam_value(qp, qcfg))
  return out


def _weighted(values: dict, sizes: dict) -> jax.Array:
  total = sum(sizes.values())
  return sum(values[k] * sizes[k] for k in values) / total


def _nan_div(n, d) -> jax.Array:
  """n / d, NaN where d is 0."""
  return jnp.where(d > 0, n / jnp.where(d > 0, d, 1), jnp.nan)


def _ratio_of_sums(num: dict, den: dict, sizes: dict | None = None):
  """Σ num / Σ den over types (each scaled by `sizes[k]` if given), NaN if
  the denominator is 0."""
  scale = sizes or {k: 1 for k in num}
  return _nan_div(sum(num[k] * scale[k] for k in num),
                  sum(den[k] * scale[k] for k in den))


def _threshold(kernel: jax.Array, qcfg: QuantConfig, qparams: dict):
  """`(codes, r)` of a `[blocks, in, out]` stack and its stacked learned
  quantizer parameters."""
  return jax.vmap(lambda w, qp: quant.threshold_stats(w, qcfg, qp))(kernel,
                                                                    qparams)


def sample_indices(kernels: dict, cfg: DiagnosticsConfig) -> dict[str, np.ndarray]:
  """Fixed random flat indices per layer type: `sample_size` distinct
  weights (all of them for a smaller type), sorted."""
  shapes = tuple(sorted((k, tuple(w.shape)) for k, w in kernels.items()))
  return dict(_sample_indices(shapes, cfg.sample_size, cfg.seed))


@functools.lru_cache(maxsize=16)
def _sample_indices(shapes: tuple, sample_size: int, seed: int) -> tuple:
  rng = np.random.default_rng(seed)
  out = []
  for k, shape in shapes:
    n = int(np.prod(shape))
    out.append((k, np.arange(n) if n <= sample_size else
                np.sort(rng.choice(n, sample_size, replace=False))))
  return tuple(out)


def _group_rows(shape: tuple, idx: np.ndarray, qcfg: QuantConfig):
  """For sampled flat indices into a `[blocks, in, out]` stack: the flat
  indices of each one's whole quantizer group `[n, G]`, its position in it
  and its group's index `(block, group, out)` into a `[blocks, groups, out]`
  scale; or None for `per_tensor` (one group per block). For `sherry` the
  "group" is the weight's block of 4 inputs (its statistics are the
  block's)."""
  if qcfg.granularity == "per_tensor" and qcfg.method != "sherry":
    return None
  _, d_in, d_out = shape
  b, rem = np.divmod(idx, d_in * d_out)
  i, j = np.divmod(rem, d_out)
  size = (quant.sherry.BLOCK if qcfg.method == "sherry"
          else d_in // qcfg.num_groups(d_in))
  first = i - i % size
  rows = ((b * d_in * d_out)[:, None]
          + (first[:, None] + np.arange(size)) * d_out + j[:, None])
  return rows, i % size, (b, i // size, j)


def _sampled(kernel: jax.Array, qparams: dict, idx: np.ndarray,
             cfg: DiagnosticsConfig):
  """`(dead, in trap band)` of the sampled weights of one layer type, from
  their groups alone (a few hundred thousand values, not the whole stack,
  unless that is smaller or `per_tensor`); a learned scale is read for the
  sampled groups only."""
  plan = _group_rows(tuple(kernel.shape), idx, cfg.quant)
  if plan is None or plan[0].size >= kernel.size:  # cheaper on the whole
    codes, r = _threshold(kernel, cfg.quant, qparams)
    codes, r = codes.reshape(-1)[idx], r.reshape(-1)[idx]
  else:
    rows, pos, group = plan
    groups = kernel.reshape(-1)[rows][:, :, None]  # [n, G, 1]
    alpha = (qparams["alpha"][group][:, None, None]
             if cfg.quant.learned_scale else None)
    codes, r = quant.group_threshold_stats(groups, cfg.quant, alpha)
    at = (np.arange(len(idx)), pos, 0)
    codes, r = codes[at], r[at]
  dead = codes == 0
  return dead, dead & (r >= TRAP_BAND[0])


def init_state(params: dict, cfg: DiagnosticsConfig) -> dict:
  """The trap counters at the start: per sampled weight, the consecutive
  states spent in D (`dead_run`, 1 if dead now), the trap-band membership
  at the window's start and whether it has left D since; the last completed
  window's escape rates (NaN: none yet) and the number of updates seen."""
  kernels, qparams = ternary_kernels(params), ternary_qparams(params)
  idx = sample_indices(kernels, cfg)
  sampled = {k: _sampled(w, qparams[k], idx[k], cfg)
             for k, w in kernels.items()}
  nan = jnp.full((), jnp.nan, jnp.float32)
  return dict(
      dead_run={k: d.astype(jnp.int32) for k, (d, _) in sampled.items()},
      window_band={k: b for k, (_, b) in sampled.items()},
      window_left={k: jnp.zeros_like(d) for k, (d, _) in sampled.items()},
      escape_rate={k: nan for k in (*LAYER_TYPES, "all")},
      count=jnp.zeros((), jnp.int32))


def update(state: dict, new_params: dict, cfg: DiagnosticsConfig
           ) -> tuple[dict, dict]:
  """Every step: the trap counters after an update and the trapping
  metrics, `(new state, metrics)`; reads only the sampled weights' groups."""
  kernels, qparams = ternary_kernels(new_params), ternary_qparams(new_params)
  idx = sample_indices(kernels, cfg)
  sampled = {k: _sampled(kernels[k], qparams[k], idx[k], cfg)
             for k in LAYER_TYPES}
  return _update_traps(state, sampled, cfg,
                       {k: w.size for k, w in kernels.items()})


def _update_traps(state, sampled: dict, cfg: DiagnosticsConfig, sizes):
  count = state["count"] + 1
  window_end = count % cfg.trap_steps == 0
  # Each sampled type stands for `sizes[k] / n` weights in the `/all` figures.
  scale = {k: sizes[k] / state["dead_run"][k].size for k in LAYER_TYPES}
  dead_run, window_band, window_left, escape = {}, {}, {}, {}
  trapped, n_dead, escaped, n_band = {}, {}, {}, {}
  out = {}
  for k, (dead, band) in sampled.items():
    dead_run[k] = jnp.where(dead, state["dead_run"][k] + 1, 0)
    # In D for >= S steps means in D at S + 1 consecutive states.
    is_trapped = band & (dead_run[k] > cfg.trap_steps)
    trapped[k], n_dead[k] = jnp.sum(is_trapped), jnp.sum(dead)
    out[f"trapped_fraction/{k}"] = jnp.mean(is_trapped)
    out[f"trapped_of_dead/{k}"] = _nan_div(trapped[k], n_dead[k])
    left = state["window_left"][k] | ~dead
    escaped[k] = jnp.sum(state["window_band"][k] & left)
    n_band[k] = jnp.sum(state["window_band"][k])
    escape[k] = jnp.where(window_end, _nan_div(escaped[k], n_band[k]),
                          state["escape_rate"][k])
    window_band[k] = jnp.where(window_end, band, state["window_band"][k])
    window_left[k] = jnp.where(window_end, jnp.zeros_like(left), left)
  escape["all"] = jnp.where(window_end,
                            _ratio_of_sums(escaped, n_band, scale),
                            state["escape_rate"]["all"])
  out["trapped_fraction/all"] = _weighted(
      {k: out[f"trapped_fraction/{k}"] for k in LAYER_TYPES}, sizes)
  out["trapped_of_dead/all"] = _ratio_of_sums(trapped, n_dead, scale)
  for k, v in escape.items():
    out[f"escape_rate/{k}"] = v
  out["trapped_sample_size"] = jnp.asarray(cfg.sample_size, jnp.float32)
  new_state = dict(dead_run=dead_run, window_band=window_band,
                   window_left=window_left, escape_rate=escape, count=count)
  return new_state, out


def full_metrics(old_params: dict, new_params: dict, cfg: DiagnosticsConfig,
                 grad_mean: dict | None = None,
                 grad_var: dict | None = None) -> dict:
  """Logging-step figures over all weights: fractions, flips, crossings and
  pile-up of the update `old_params -> new_params`, |W|/delta histograms of
  the updated weights and (given the per-weight gradient mean/variance over
  micro-batches, taken at `old_params`) GSNR by deadzone membership and r."""
  old, new = ternary_kernels(old_params), ternary_kernels(new_params)
  old_qp, new_qp = ternary_qparams(old_params), ternary_qparams(new_params)
  sizes = {k: w.size for k, w in new.items()}
  # Every weight falls in one category: its histogram bin of r (the last
  # bin collects r >= hist_max), whether it is dead, in the boundary band,
  # and how its code changed (0 kept, 1 crossed the threshold, 2 flipped
  # sign while active); one bincount per type gives every figure below.
  n_bins = cfg.hist_bins + 1
  per_type = {n: {} for n in ("dead_fraction", "boundary_fraction",
                              "flip_rate", "crossing_rate")}
  below, above, out = {}, {}, {}
  edge = int(round(1 / cfg.bin_width))  # the bin that starts at r = 1
  # The weights the gradients were taken at: their codes for flips and
  # crossings, and (with GSNR) their codes and r for the categories there.
  old_stats = {k: _threshold(w, cfg.quant, old_qp[k]) for k, w in old.items()}
  for k in LAYER_TYPES:
    old_codes = old_stats[k][0]
    codes, r = _threshold(new[k], cfg.quant, new_qp[k])
    dead = codes == 0
    moved = jnp.where(dead != (old_codes == 0), 1,
                      jnp.where(codes != old_codes, 2, 0))
    band = (r >= BOUNDARY_BAND[0]) & (r < BOUNDARY_BAND[1])
    cat = (jnp.clip(jnp.floor(r / cfg.bin_width), 0, n_bins - 1).astype(
        jnp.int32) + n_bins * (dead.astype(jnp.int32)
                               + 2 * band.astype(jnp.int32) + 4 * moved))
    # [moved, band, dead, bin]
    c = jnp.bincount(cat.reshape(-1), length=12 * n_bins).reshape(
        3, 2, 2, n_bins)
    per_type["dead_fraction"][k] = jnp.sum(c[:, :, 1]) / sizes[k]
    per_type["boundary_fraction"][k] = jnp.sum(c[:, 1]) / sizes[k]
    per_type["flip_rate"][k] = jnp.sum(c[1:]) / sizes[k]
    per_type["crossing_rate"][k] = jnp.sum(c[1]) / sizes[k]
    below[k] = jnp.sum(c[:, :, 1, edge - 1])
    above[k] = jnp.sum(c[:, :, 0, edge])
    out[f"ratio_hist/{k}"] = jnp.sum(c, axis=(0, 1, 2))[:cfg.hist_bins]
  for metric, values in per_type.items():
    for k, v in values.items():
      out[f"{metric}/{k}"] = v
    out[f"{metric}/all"] = _weighted(values, sizes)
  for k in LAYER_TYPES:
    out[f"pileup_ratio/{k}"] = _nan_div(below[k], above[k])
  out["pileup_ratio/all"] = _ratio_of_sums(below, above)
  if grad_mean is None:
    return out
  gm, gv = ternary_kernels(grad_mean), ternary_kernels(grad_var)
  # Every weight falls in one category, r's bin + len(bins) * dead; per
  # category, weighted bincounts give the sums of mean(g)^2, var(g), the
  # per-weight ratio and the count (four scatter passes instead of a masked
  # reduction per figure, ~2.5x faster on CPU).
  n_bins = len(GSNR_BINS) - 1
  sums = {}
  for k, (codes, r) in old_stats.items():
    sig, var = gm[k] ** 2, gv[k]
    cat = sum((r >= e).astype(jnp.int32) for e in GSNR_BINS[1:-1]) + (
        n_bins * (codes == 0)).astype(jnp.int32)
    cat = cat.reshape(-1)
    sums[k] = {name: jnp.bincount(cat, weights=None if v is None else
                                  v.reshape(-1), length=2 * n_bins)
               for name, v in (("sig", sig), ("var", var),
                               ("snr", sig / jnp.maximum(var, 1e-30)),
                               ("n", None))}
  for k in (*LAYER_TYPES, "all"):
    got = ({n: sum(sums[t][n] for t in LAYER_TYPES) for n in sums["q_proj"]}
           if k == "all" else sums[k])
    for name, part in (("dead", slice(n_bins, None)),
                       ("active", slice(0, n_bins))):
      total = {n: jnp.sum(v[part]) for n, v in got.items()}
      out[f"gsnr_{name}/{k}"] = total["snr"] / jnp.maximum(total["n"], 1)
      out[f"gsnr_pooled_{name}/{k}"] = total["sig"] / jnp.maximum(
          total["var"], 1e-30)
    for b, (lo, hi) in enumerate(zip(GSNR_BINS[:-1], GSNR_BINS[1:])):
      both = lambda v: v[b] + v[b + n_bins]  # pylint: disable=cell-var-from-loop
      out[f"{gsnr_bin_name(lo, hi)}/{k}"] = _nan_div(both(got["sig"]),
                                                     both(got["var"]))
  return out
