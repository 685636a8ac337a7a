"""Plots of a run's deadzone diagnostics:
`python -m tequila_jax.analyze --workdir DIR [--compare DIR2,DIR3]`.

Plots the deadzone diagnostics that training wrote to `DIR/metrics.jsonl`
(see `tequila_jax.diagnostics`) and writes a markdown summary, several runs
side by side (e.g. AbsMean vs Tequila):

  fractions.png   dead / boundary fraction, flip and crossing rate over
                  steps, one line per layer type, one column per run
  trapping.png    trapped fraction, escape rate and pile-up ratio over
                  steps, the runs overlaid
  histograms.png  |W|/delta over all ternary weights at chosen steps, and
                  around the threshold with the pile-up bins marked
  gsnr.png        gradient SNR of dead vs active weights over steps, and by
                  |W|/delta band (the 0.8-1 trap band shaded)
  loss.png        train and held-out loss
  summary.md      final figures per run
"""

from __future__ import annotations

import json
import pathlib

import matplotlib
import numpy as np
# Figures made directly (not through pyplot) need no backend: importing this
# module changes no global matplotlib state, in a notebook or anywhere.
from matplotlib.figure import Figure

from tequila_jax import diagnostics, metrics
from tequila_jax import workdir as workdir_lib

FRACTIONS = ("dead_fraction", "boundary_fraction", "flip_rate",
             "crossing_rate")
TRAPPING = (("trapped_fraction", "trapped fraction (of all weights)"),
            ("escape_rate", "escape rate (last window of S steps)"),
            ("pileup_ratio", "pile-up: density just below / above r = 1"))
TYPES = diagnostics.LAYER_TYPES + ("all",)
GSNR_BINS = list(zip(diagnostics.GSNR_BINS[:-1], diagnostics.GSNR_BINS[1:]))


class Run:
  """One training run's metrics, as columns over steps."""

  def __init__(self, workdir):
    self.workdir = pathlib.Path(workdir)
    path = self.workdir / workdir_lib.METRICS
    if not path.exists():
      raise FileNotFoundError(f"{path} not found: is {workdir} a tequila_jax "
                              "training workdir?")
    self.records = metrics.read_jsonl(path)
    config = self.workdir / workdir_lib.CONFIG
    self.config = json.loads(config.read_text()) if config.exists() else {}
    quant = self.config.get("model", {}).get("quant", {})
    method = quant.get("method", "?")
    lam = f" λ={quant.get('lam')}" if method.startswith("tequila") else ""
    frozen = " lr=0" if self.config.get("optim", {}).get("lr") == 0 else ""
    detail = f"{method}{lam}{frozen}"
    self.label = (self.workdir.name if detail == self.workdir.name
                  else f"{self.workdir.name} ({detail})")
    d = self.config.get("diagnostics", {})
    self.hist_edges = np.linspace(0, d.get("hist_max", 3.0),
                                  d.get("hist_bins", 60) + 1)
    self.trap_steps = d.get("trap_steps")

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    # The last value per step, in step order (metrics files written before
    # resumes truncated them may repeat steps).
    pts = sorted({r["step"]: r[key] for r in self.records
                  if isinstance(r.get(key), (int, float))}.items())
    if not pts:
      return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values, float)

  def hist_steps(self) -> list[int]:
    return [r["step"] for r in self.records if "train/ratio_hist/q_proj" in r]

  def histogram(self, step: int, layer: str) -> np.ndarray:
    for r in self.records:
      if r["step"] == step and "train/ratio_hist/q_proj" in r:
        if layer == "all":
          return np.sum([r[f"train/ratio_hist/{t}"]
                         for t in diagnostics.LAYER_TYPES], axis=0)
        return np.asarray(r[f"train/ratio_hist/{layer}"])
    raise KeyError(step)

  def last(self, key: str) -> float | None:
    _, values = self.series(key)
    return float(values[-1]) if len(values) else None


def _sample_note(runs) -> str:
  sample = runs[0].last("train/trapped_sample_size")
  steps = runs[0].trap_steps
  if not sample:
    return ""
  return (f"Trapping is measured on a fixed random sample of {int(sample)} "
          f"weights per layer type; trapped = in the band 0.8 <= |W|/delta < 1"
          f" and in the deadzone for >= S = {steps} consecutive steps.")


def plot_fractions(runs, out):
  fig = Figure(figsize=(5 * len(runs), 2.6 * len(FRACTIONS)))
  axes = fig.subplots(len(FRACTIONS), len(runs), squeeze=False, sharex="col",
                      sharey="row")
  for col, run in enumerate(runs):
    for row, name in enumerate(FRACTIONS):
      ax = axes[row, col]
      for t in TYPES:
        steps, values = run.series(f"train/{name}/{t}")
        ax.plot(steps, values, label=t, lw=2.5 if t == "all" else 1,
                color="black" if t == "all" else None)
      ax.set_ylabel(name)
      ax.grid(alpha=0.3)
      if row == 0:
        ax.set_title(run.label)
    axes[-1, col].set_xlabel("step")
  axes[0, -1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(out / "fractions.png", dpi=110)


def plot_trapping(runs, out):
  """Trapped fraction, escape rate and pile-up over steps, runs overlaid."""
  fig = Figure(figsize=(5.2 * len(TRAPPING), 3.8))
  axes = fig.subplots(1, len(TRAPPING))
  for ax, (name, title) in zip(axes, TRAPPING):
    for run in runs:
      line, = ax.plot(*run.series(f"train/{name}/all"), lw=2, label=run.label)
      if name == "trapped_fraction":
        ax.plot(*run.series("train/trapped_of_dead/all"), "--", lw=1,
                color=line.get_color(), label=f"{run.label}, of dead weights")
    if name == "pileup_ratio":
      ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.text(0.01, 0.01, _sample_note(runs), fontsize=8)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  fig.savefig(out / "trapping.png", dpi=110)


def plot_histograms(runs, out, steps=None):
  """|W|/delta over all ternary weights, whole range and around r = 1 with
  the two pile-up bins marked, first and last logged step per run."""
  fig = Figure(figsize=(11, 3.2 * len(runs)))
  axes = fig.subplots(len(runs), 2, squeeze=False)
  for row, run in enumerate(runs):
    available = run.hist_steps()
    chosen = [s for s in (steps or ([available[0], available[-1]]
                                    if available else [])) if s in available]
    edges = run.hist_edges
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    for ax, zoom in zip(axes[row], (False, True)):
      ax.axvline(1.0, color="red", lw=1, label="threshold r = 1")
      ax.axvspan(*diagnostics.TRAP_BAND, color="orange", alpha=0.15,
                 label="trap band 0.8-1")
      for s in dict.fromkeys(chosen):
        density = run.histogram(s, "all") / max(run.histogram(s, "all").sum(),
                                                1) / width
        ax.step(centers, density, where="mid", label=f"step {s}")
      if zoom:
        ax.set_xlim(0.5, 1.5)
        ax.axvspan(1 - width, 1, color="red", alpha=0.12)
        ax.axvspan(1, 1 + width, color="blue", alpha=0.12)
        pile = run.last("train/pileup_ratio/all")
        if pile is not None:
          ax.text(0.02, 0.04, f"pile-up ratio (last step) {pile:.3f}\n"
                  "= red bin / blue bin", transform=ax.transAxes,
                  va="bottom", fontsize=8,
                  bbox=dict(facecolor="white", alpha=0.85, lw=0))
        ax.set_title(f"{run.label}: around the threshold", fontsize=10)
      else:
        ax.set_title(run.label, fontsize=10)
        ax.legend(fontsize=7)
      ax.set_ylabel("density")
      ax.set_xlabel("|W| / delta  (deadzone: < 1)")
  fig.tight_layout()
  fig.savefig(out / "histograms.png", dpi=110)


def plot_gsnr(runs, out):
  """Pooled GSNR of dead vs active weights over steps; GSNR by |W|/delta
  band (mean over logged steps)."""
  fig = Figure(figsize=(12, 3.8))
  axes = fig.subplots(1, 2)
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, run in enumerate(runs):
    for kind, style in (("dead", "--"), ("active", "-")):
      steps, values = run.series(f"train/gsnr_pooled_{kind}/all")
      if len(steps):
        axes[0].plot(steps, values, style, color=colors[i % len(colors)],
                     lw=1.2, label=f"{run.label} {kind}")
  axes[0].set_title("pooled GSNR: mean(ḡ²) / mean(var g)", fontsize=10)
  axes[0].set_xlabel("step")
  axes[0].set_yscale("log")
  width = 0.8 / max(len(runs), 1)
  labels = [f"{lo:g}-{hi:g}" for lo, hi in GSNR_BINS]
  for i, run in enumerate(runs):
    means = []
    for lo, hi in GSNR_BINS:
      _, values = run.series(f"train/{diagnostics.gsnr_bin_name(lo, hi)}/all")
      means.append(np.mean(values) if len(values) else np.nan)
    axes[1].bar(np.arange(len(labels)) + i * width, means, width,
                label=run.label)
  trap = labels.index("0.8-1")
  axes[1].axvspan(trap - 0.1, trap + 0.9, color="orange", alpha=0.15)
  axes[1].set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
  axes[1].set_xlabel("|W| / delta bin (shaded: the trap band)")
  axes[1].set_title("pooled GSNR by |W|/delta, mean over logged steps",
                    fontsize=10)
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "gsnr.png", dpi=110)


def plot_loss(runs, out):
  fig = Figure(figsize=(6, 3.5))
  ax = fig.subplots()
  for run in runs:
    line, = ax.plot(*run.series("train/loss"), label=f"{run.label} train")
    ax.plot(*run.series("eval/loss"), "o--", color=line.get_color(),
            label=f"{run.label} held-out")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "loss.png", dpi=110)


def summary_table(runs) -> str:
  cols = [("step", None), ("train loss", "train/loss"),
          ("held-out loss", "eval/loss"), ("held-out ppl", "eval/perplexity"),
          ("dead", "train/dead_fraction/all"),
          ("crossing", "train/crossing_rate/all"),
          ("trapped*", "train/trapped_fraction/all"),
          ("trapped of dead*", "train/trapped_of_dead/all"),
          ("escape*", "train/escape_rate/all"),
          ("pile-up", "train/pileup_ratio/all"),
          ("GSNR dead", "train/gsnr_pooled_dead/all"),
          ("GSNR active", "train/gsnr_pooled_active/all"),
          ("GSNR 0.8-1", f"train/{diagnostics.gsnr_bin_name(0.8, 1.0)}/all")]
  lines = ["| run | " + " | ".join(c for c, _ in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for run in runs:
    cells = []
    for name, key in cols:
      if key is None:
        cells.append(str(max(r["step"] for r in run.records)))
        continue
      v = run.last(key)
      cells.append("-" if v is None else f"{v:.4g}")
    lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
  note = _sample_note(runs)
  if note:
    lines.append(f"\n*{note} Escape: of the sampled band weights at a "
                 "window's start, the share that left the deadzone within "
                 "it. GSNR: pooled over micro-batches.")
  return "\n".join(lines) + "\n"


def analyze(workdirs, out=None, hist_steps=None) -> pathlib.Path:
  runs = [Run(w) for w in workdirs]
  out = pathlib.Path(out or runs[0].workdir / "analysis")
  out.mkdir(parents=True, exist_ok=True)
  plot_fractions(runs, out)
  plot_trapping(runs, out)
  plot_histograms(runs, out, hist_steps)
  plot_gsnr(runs, out)
  plot_loss(runs, out)
  (out / "summary.md").write_text(summary_table(runs))
  return out
