"""Deadzone diagnostics (DESIGN.md §1.7), computed inside the jitted step.

Per ternary layer type (q_proj ... down_proj; each a `[blocks, in, out]`
stack) and as parameter-weighted global figures (`/all`):

- `dead_fraction`: share of weights in the deadzone D (`|W| < delta`).
- `boundary_fraction`: share with `0.9 <= |W| / delta < 1.1`.
- `flip_rate`: share whose ternary code changed in the last optimizer step.
- `trapped_fraction`: on a fixed random sample of `sample_size` weights per
  layer type (to bound memory), the share that were in D at each of the last
  `history_k` steps *and* reached the boundary band (`|W|/delta >= 0.9`) and
  moved back from it at least once: stuck near, not comfortably inside, D.
- `gsnr_dead` / `gsnr_active`: per-weight gradient signal-to-noise ratio
  `mean(g)^2 / var(g)` across the step's micro-batches (unbiased variance),
  averaged over dead resp. active weights; needs `micro_batches >= 2`. The
  per-weight ratio is heavy-tailed (with 2 micro-batches it is Cauchy-like),
  so `gsnr_pooled_dead` / `_active` (mean of mean(g)^2 over mean of var(g))
  are reported too as a robust companion.
- `ratio_hist`: a histogram of `|W| / delta` over `[0, hist_max)`.

The first three are cheap and computed every step; the trapped fraction,
GSNR and histograms only in the logging variant of the step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax import quant
from tequila_jax.quant import QuantConfig

LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")
BOUNDARY_BAND = (0.9, 1.1)


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
  history_k: int = 8
  sample_size: int = 4096
  hist_bins: int = 60
  hist_max: float = 3.0
  seed: int = 0

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


def _per_block(fn, kernels, cfg):
  return {k: jax.vmap(lambda w: fn(w, cfg))(w) for k, w in kernels.items()}


def _weighted(values: dict, sizes: dict) -> jax.Array:
  total = sum(sizes.values())
  return sum(values[k] * sizes[k] for k in values) / total


def sample_indices(kernels: dict, cfg: DiagnosticsConfig) -> dict[str, np.ndarray]:
  """Fixed random flat indices per layer type (drawn with replacement)."""
  rng = np.random.default_rng(cfg.seed)
  return {k: rng.integers(0, w.size, cfg.sample_size) for k, w in
          sorted(kernels.items())}


def init_state(params: dict, cfg: DiagnosticsConfig) -> dict:
  """History ring buffer `[history_k, sample_size]` of `|W|/delta` per type."""
  kernels = ternary_kernels(params)
  return dict(
      history={k: jnp.zeros((cfg.history_k, cfg.sample_size), jnp.float32)
               for k in kernels},
      count=jnp.zeros((), jnp.int32))


def step_metrics(old_params: dict, new_params: dict, qcfg: QuantConfig
                 ) -> tuple[dict, dict, dict]:
  """Cheap per-step figures, the new `|W|/delta` per type (for the history)
  and the codes before the update (whose deadzone the gradients saw)."""
  old, new = ternary_kernels(old_params), ternary_kernels(new_params)
  sizes = {k: w.size for k, w in new.items()}
  ratios = _per_block(quant.threshold_ratio, new, qcfg)
  old_codes = _per_block(lambda w, c: quant.ternarize(w, c)[0], old, qcfg)
  new_codes = _per_block(lambda w, c: quant.ternarize(w, c)[0], new, qcfg)
  out = {}
  per_type = {
      "dead_fraction": {k: jnp.mean(new_codes[k] == 0) for k in new},
      "boundary_fraction": {k: jnp.mean((ratios[k] >= BOUNDARY_BAND[0])
                                        & (ratios[k] < BOUNDARY_BAND[1]))
                            for k in new},
      "flip_rate": {k: jnp.mean(old_codes[k] != new_codes[k]) for k in new},
  }
  for metric, values in per_type.items():
    for k, v in values.items():
      out[f"{metric}/{k}"] = v
    out[f"{metric}/all"] = _weighted(values, sizes)
  return out, ratios, old_codes


def update_history(state: dict, ratios: dict, cfg: DiagnosticsConfig) -> dict:
  idx = sample_indices(ratios, cfg)
  slot = state["count"] % cfg.history_k
  history = {k: h.at[slot].set(jnp.take(ratios[k].reshape(-1), idx[k]))
             for k, h in state["history"].items()}
  return dict(history=history, count=state["count"] + 1)


def trapped_mask(history: jax.Array, count: jax.Array) -> jax.Array:
  """`[K, S]` ring buffer (slot = step % K) -> trapped flag per sampled weight.

  In D at all K steps, reached the boundary band, and the maximum is not the
  latest value (it moved back). False until K steps have been recorded.
  """
  k = history.shape[0]
  order = (count + jnp.arange(k)) % k  # oldest ... newest
  h = history[order]
  dead_all = jnp.all(h < 1.0, axis=0)
  reached = jnp.max(h, axis=0) >= BOUNDARY_BAND[0]
  moved_back = h[-1] < jnp.max(h, axis=0)
  return dead_all & reached & moved_back & (count >= k)


def full_metrics(state: dict, ratios: dict, cfg: DiagnosticsConfig,
                 old_codes: dict | None = None, grad_mean: dict | None = None,
                 grad_var: dict | None = None) -> dict:
  """Logging-step figures: trapped fraction, histograms and (given the
  per-weight gradient mean/variance over micro-batches) GSNR."""
  out = {}
  trapped = {k: jnp.mean(trapped_mask(h, state["count"]))
             for k, h in state["history"].items()}
  for k, v in trapped.items():
    out[f"trapped_fraction/{k}"] = v
  sizes = {k: r.size for k, r in ratios.items()}
  out["trapped_fraction/all"] = _weighted(trapped, sizes)
  out["trapped_sample_size"] = jnp.asarray(cfg.sample_size)
  for k, r in ratios.items():
    out[f"ratio_hist/{k}"] = jnp.histogram(
        r, bins=cfg.hist_bins, range=(0.0, cfg.hist_max))[0]
  if grad_mean is not None:
    gm, gv = ternary_kernels(grad_mean), ternary_kernels(grad_var)
    sums = {n: {} for n in ("snr_d", "snr_a", "sig_d", "sig_a", "var_d",
                            "var_a", "n_d", "n_a")}
    for k, codes in old_codes.items():
      dead = codes == 0
      sig, var = gm[k] ** 2, gv[k]
      snr = sig / jnp.maximum(var, 1e-30)
      for suffix, mask in (("d", dead), ("a", ~dead)):
        sums[f"snr_{suffix}"][k] = jnp.sum(jnp.where(mask, snr, 0))
        sums[f"sig_{suffix}"][k] = jnp.sum(jnp.where(mask, sig, 0))
        sums[f"var_{suffix}"][k] = jnp.sum(jnp.where(mask, var, 0))
        sums[f"n_{suffix}"][k] = jnp.sum(mask)
    for suffix, name in (("d", "dead"), ("a", "active")):
      for k in list(old_codes) + ["all"]:
        pick = (lambda n: sum(sums[n].values())) if k == "all" else (
            lambda n: sums[n][k])  # pylint: disable=cell-var-from-loop
        n = jnp.maximum(pick(f"n_{suffix}"), 1)
        out[f"gsnr_{name}/{k}"] = pick(f"snr_{suffix}") / n
        out[f"gsnr_pooled_{name}/{k}"] = pick(f"sig_{suffix}") / jnp.maximum(
            pick(f"var_{suffix}"), 1e-30)
  return out
