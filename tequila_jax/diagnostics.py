"""Deadzone diagnostics (DESIGN.md §1.7), computed inside the jitted step.

Per ternary layer type (q_proj ... down_proj; each a `[blocks, in, out]`
stack) as `NAME/<type>`, and over the whole model as `NAME/all` (weighted by
the number of weights of each type). `r = |W| / delta` is a weight's distance
to the threshold: `r < 1` is the deadzone D.

Every step, over all weights (after the update):
- `dead_fraction`: |D| / n.
- `boundary_fraction`: share with `0.9 <= r < 1.1`.
- `flip_rate`: share whose ternary code changed in this step.
- `crossing_rate`: share that crossed the threshold (entered or left D) in
  this step: threshold crossings per weight per step.
- `pileup_ratio`: weights in D with `1 - w <= r < 1` over weights outside D
  with `1 <= r < 1 + w` (w = the histogram's bin width: the two bins beside
  the threshold); > 1 when weights pile up just inside the deadzone.

Every step, on a fixed random sample of `sample_size` weights per layer type
(drawn once, without replacement, from the seed), each with a counter of the
consecutive steps it has spent in D (carried in the train state and the
checkpoint):
- `trapped_fraction`: sampled weights in the trap band `0.8 <= r < 1` that
  have been in D for at least `trap_steps` (S) consecutive steps, as a share
  of all (sampled) weights; `trapped_of_dead`: the same count over the dead
  sampled weights.
- `escape_rate`: of the sampled weights in the trap band at the start of a
  window of S steps, the share that left D at least once within it. Each
  completed window's value is carried until the next completes (NaN before
  the first; written as null).

On logging steps only (a second compiled variant of the step):
- `gsnr_dead` / `gsnr_active`: per-weight gradient signal-to-noise ratio
  `mean(g)^2 / var(g)` across the step's micro-batches (unbiased variance),
  averaged over dead resp. active weights; needs `micro_batches >= 2`. The
  per-weight ratio is heavy-tailed (Cauchy-like with 2 micro-batches), so
  `gsnr_pooled_dead` / `_active` (mean of mean(g)^2 over mean of var(g)) are
  reported too, and `gsnr_ratio_LO_HI` the pooled figure over the weights
  with `LO <= r < HI` (`GSNR_BINS`; the 0.8-1 bin is the trap band). D, r
  and the bins are those of the weights the gradients were taken at. GSNR
  depends on the micro-batch size: compare runs at equal micro-batch size.
- `ratio_hist`: a histogram of r over `[0, hist_max)` in `hist_bins` bins.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax import quant
from tequila_jax.quant import QuantConfig

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")
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
  layers = params["layers"]
  out = {}
  for group in ("attn", "mlp"):
    for name, sub in layers[group].items():
      out[name] = sub["kernel"]
  return {k: out[k] for k in LAYER_TYPES}


def _weighted(values: dict, sizes: dict) -> jax.Array:
  total = sum(sizes.values())
  return sum(values[k] * sizes[k] for k in values) / total


def _ratio_of_sums(num: dict, den: dict, sizes: dict | None = None):
  """Σ num / Σ den over types (each scaled by `sizes[k]` if given), NaN if
  the denominator is 0."""
  scale = sizes or {k: 1 for k in num}
  n = sum(num[k] * scale[k] for k in num)
  d = sum(den[k] * scale[k] for k in den)
  return jnp.where(d > 0, n / jnp.where(d > 0, d, 1), jnp.nan)


def _threshold(kernel: jax.Array, qcfg: QuantConfig):
  """`(codes, r)` of a `[blocks, in, out]` stack."""
  return jax.vmap(lambda w: quant.threshold_stats(w, qcfg))(kernel)


def sample_indices(kernels: dict, cfg: DiagnosticsConfig) -> dict[str, np.ndarray]:
  """Fixed random flat indices per layer type: `sample_size` distinct
  weights (all of them for a smaller type), sorted."""
  rng = np.random.default_rng(cfg.seed)
  out = {}
  for k, w in sorted(kernels.items()):
    n = int(np.prod(w.shape))
    out[k] = (np.arange(n) if n <= cfg.sample_size else
              np.sort(rng.choice(n, cfg.sample_size, replace=False)))
  return out


def _sampled(codes: jax.Array, r: jax.Array, idx: np.ndarray):
  """`(dead, in trap band)` of the sampled weights of one layer type."""
  dead = codes.reshape(-1)[idx] == 0
  return dead, dead & (r.reshape(-1)[idx] >= TRAP_BAND[0])


def init_state(params: dict, cfg: DiagnosticsConfig) -> dict:
  """The trap counters at the start: per sampled weight, the consecutive
  states spent in D (`dead_run`, 1 if dead now), the trap-band membership
  at the window's start and whether it has left D since; the last completed
  window's escape rates (NaN: none yet) and the number of updates seen."""
  kernels = ternary_kernels(params)
  idx = sample_indices(kernels, cfg)
  sampled = {k: _sampled(*_threshold(w, cfg.quant), idx[k])
             for k, w in kernels.items()}
  nan = jnp.full((), jnp.nan, jnp.float32)
  return dict(
      dead_run={k: d.astype(jnp.int32) for k, (d, _) in sampled.items()},
      window_band={k: b for k, (_, b) in sampled.items()},
      window_left={k: jnp.zeros_like(d) for k, (d, _) in sampled.items()},
      escape_rate={k: nan for k in (*LAYER_TYPES, "all")},
      count=jnp.zeros((), jnp.int32))


def update(state: dict, old_params: dict, new_params: dict,
           cfg: DiagnosticsConfig) -> tuple[dict, dict]:
  """One optimizer step's diagnostics: `(new state, per-step metrics)`."""
  qcfg = cfg.quant
  old, new = ternary_kernels(old_params), ternary_kernels(new_params)
  sizes = {k: w.size for k, w in new.items()}
  per_type = {n: {} for n in ("dead_fraction", "boundary_fraction",
                              "flip_rate", "crossing_rate")}
  below, above, sampled = {}, {}, {}
  idx = sample_indices(new, cfg)
  for k in LAYER_TYPES:
    old_codes = _threshold(old[k], qcfg)[0]
    codes, r = _threshold(new[k], qcfg)
    sampled[k] = _sampled(codes, r, idx[k])
    dead = codes == 0
    per_type["dead_fraction"][k] = jnp.mean(dead)
    per_type["boundary_fraction"][k] = jnp.mean(
        (r >= BOUNDARY_BAND[0]) & (r < BOUNDARY_BAND[1]))
    per_type["flip_rate"][k] = jnp.mean(old_codes != codes)
    per_type["crossing_rate"][k] = jnp.mean((old_codes == 0) != dead)
    below[k] = jnp.sum(dead & (r >= 1 - cfg.bin_width))
    above[k] = jnp.sum(~dead & (r < 1 + cfg.bin_width))
  out = {}
  for metric, values in per_type.items():
    for k, v in values.items():
      out[f"{metric}/{k}"] = v
    out[f"{metric}/all"] = _weighted(values, sizes)
  for k in LAYER_TYPES:
    out[f"pileup_ratio/{k}"] = _ratio_of_sums({k: below[k]}, {k: above[k]})
  out["pileup_ratio/all"] = _ratio_of_sums(below, above)
  new_state, trap = _update_traps(state, sampled, cfg, sizes)
  out.update(trap)
  return new_state, out


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
    out[f"trapped_of_dead/{k}"] = _ratio_of_sums({k: trapped[k]},
                                                 {k: n_dead[k]})
    left = state["window_left"][k] | ~dead
    escaped[k] = jnp.sum(state["window_band"][k] & left)
    n_band[k] = jnp.sum(state["window_band"][k])
    escape[k] = jnp.where(window_end,
                          _ratio_of_sums({k: escaped[k]}, {k: n_band[k]}),
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
  """Logging-step figures: |W|/delta histograms of the updated weights and
  (given the per-weight gradient mean/variance over micro-batches, taken at
  `old_params`) GSNR by deadzone membership and by r."""
  out = {}
  for k, w in ternary_kernels(new_params).items():
    r = _threshold(w, cfg.quant)[1]
    out[f"ratio_hist/{k}"] = jnp.histogram(
        r, bins=cfg.hist_bins, range=(0.0, cfg.hist_max))[0]
  if grad_mean is None:
    return out
  gm, gv = ternary_kernels(grad_mean), ternary_kernels(grad_var)
  sums: dict[str, dict] = {}

  def add(name, k, value):
    sums.setdefault(name, {})[k] = value

  for k, w in ternary_kernels(old_params).items():
    codes, r = _threshold(w, cfg.quant)
    sig, var = gm[k] ** 2, gv[k]
    snr = sig / jnp.maximum(var, 1e-30)
    masks = {"dead": codes == 0, "active": codes != 0}
    for lo, hi in zip(GSNR_BINS[:-1], GSNR_BINS[1:]):
      masks[gsnr_bin_name(lo, hi)] = (r >= lo) & (r < hi)
    for name, mask in masks.items():
      add(f"sig_{name}", k, jnp.sum(jnp.where(mask, sig, 0)))
      add(f"var_{name}", k, jnp.sum(jnp.where(mask, var, 0)))
      if name in ("dead", "active"):
        add(f"snr_{name}", k, jnp.sum(jnp.where(mask, snr, 0)))
        add(f"n_{name}", k, jnp.sum(mask))
  for k in (*LAYER_TYPES, "all"):
    pick = (lambda n: sum(sums[n].values())) if k == "all" else (
        lambda n: sums[n][k])  # pylint: disable=cell-var-from-loop
    for name in ("dead", "active"):
      out[f"gsnr_{name}/{k}"] = pick(f"snr_{name}") / jnp.maximum(
          pick(f"n_{name}"), 1)
      out[f"gsnr_pooled_{name}/{k}"] = pick(f"sig_{name}") / jnp.maximum(
          pick(f"var_{name}"), 1e-30)
    for lo, hi in zip(GSNR_BINS[:-1], GSNR_BINS[1:]):
      name = gsnr_bin_name(lo, hi)
      out[f"{name}/{k}"] = _ratio_of_sums({0: pick(f"sig_{name}")},
                                          {0: pick(f"var_{name}")})
  return out
