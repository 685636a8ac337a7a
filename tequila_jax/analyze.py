"""`python -m tequila_jax.analyze --workdir DIR [--compare DIR2 ...]`

Plots the deadzone diagnostics that training wrote to `DIR/metrics.jsonl`
(see `tequila_jax.diagnostics`) and writes a markdown summary, several runs
side by side (e.g. AbsMean vs Tequila):

  fractions.png   dead / boundary / flip / trapped fraction over steps,
                  one line per layer type, one column per run
  histograms.png  |W|/delta per layer type at chosen steps (the pile-up at
                  the boundary 1.0, or its absence)
  gsnr.png        gradient SNR of dead vs active weights over steps
  loss.png        train and held-out loss
  summary.md      final figures per run
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from tequila_jax import diagnostics, metrics  # pylint: disable=wrong-import-position

FRACTIONS = ("dead_fraction", "boundary_fraction", "flip_rate",
             "trapped_fraction")
TYPES = diagnostics.LAYER_TYPES + ("all",)


class Run:
  """One training run's metrics, as columns over steps."""

  def __init__(self, workdir):
    self.workdir = pathlib.Path(workdir)
    path = self.workdir / "metrics.jsonl"
    if not path.exists():
      raise FileNotFoundError(f"{path} not found: is {workdir} a tequila_jax "
                              "training workdir?")
    self.records = metrics.read_jsonl(path)
    config = self.workdir / "config.json"
    self.config = json.loads(config.read_text()) if config.exists() else {}
    quant = self.config.get("model", {}).get("quant", {})
    method = quant.get("method", "?")
    lam = f" λ={quant.get('lam')}" if method.startswith("tequila") else ""
    self.label = f"{self.workdir.name} ({method}{lam})"
    d = self.config.get("diagnostics", {})
    self.hist_edges = np.linspace(0, d.get("hist_max", 3.0),
                                  d.get("hist_bins", 60) + 1)

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in self.records
           if isinstance(r.get(key), (int, float))]
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


def plot_fractions(runs, out):
  fig, axes = plt.subplots(len(FRACTIONS), len(runs), squeeze=False,
                           figsize=(5 * len(runs), 2.6 * len(FRACTIONS)),
                           sharex="col", sharey="row")
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
  if any(r.last("train/trapped_sample_size") for r in runs):
    fig.text(0.01, 0.005, "trapped_fraction is measured on a fixed random "
             f"sample of {int(runs[0].last('train/trapped_sample_size') or 0)} "
             "weights per layer type.", fontsize=8)
  fig.tight_layout(rect=(0, 0.02, 1, 1))
  fig.savefig(out / "fractions.png", dpi=110)
  plt.close(fig)


def plot_histograms(runs, out, steps=None):
  fig, axes = plt.subplots(len(TYPES), len(runs), squeeze=False,
                           figsize=(5 * len(runs), 1.9 * len(TYPES)),
                           sharex=True)
  for col, run in enumerate(runs):
    available = run.hist_steps()
    chosen = [s for s in (steps or [available[0], available[-1]] if available
                          else []) if s in available]
    centers = (run.hist_edges[:-1] + run.hist_edges[1:]) / 2
    for row, t in enumerate(TYPES):
      ax = axes[row, col]
      ax.axvspan(*diagnostics.BOUNDARY_BAND, color="orange", alpha=0.2)
      ax.axvline(1.0, color="red", lw=0.8)
      for s in chosen:
        counts = run.histogram(s, t)
        ax.plot(centers, counts / max(counts.sum(), 1), label=f"step {s}")
      ax.set_ylabel(t, fontsize=8)
      if row == 0:
        ax.set_title(run.label)
        ax.legend(fontsize=7)
    axes[-1, col].set_xlabel("|W| / delta  (deadzone < 1, band shaded)")
  fig.tight_layout()
  fig.savefig(out / "histograms.png", dpi=110)
  plt.close(fig)


def plot_gsnr(runs, out):
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
  for run in runs:
    for ax, prefix in zip(axes, ("gsnr_pooled", "gsnr")):
      for kind, style in (("dead", "--"), ("active", "-")):
        steps, values = run.series(f"train/{prefix}_{kind}/all")
        if len(steps):
          ax.plot(steps, values, style, label=f"{run.label} {kind}")
  axes[0].set_title("pooled: mean(ḡ²) / mean(var g)")
  axes[1].set_title("per-weight ḡ²/var g, averaged")
  for ax in axes:
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "gsnr.png", dpi=110)
  plt.close(fig)


def plot_loss(runs, out):
  fig, ax = plt.subplots(figsize=(6, 3.5))
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
  plt.close(fig)


def summary_table(runs) -> str:
  cols = [("step", None), ("train loss", "train/loss"),
          ("held-out loss", "eval/loss"), ("held-out ppl", "eval/perplexity"),
          ("dead", "train/dead_fraction/all"),
          ("boundary", "train/boundary_fraction/all"),
          ("flip", "train/flip_rate/all"),
          ("trapped*", "train/trapped_fraction/all"),
          ("GSNR dead (pooled)", "train/gsnr_pooled_dead/all"),
          ("GSNR active (pooled)", "train/gsnr_pooled_active/all")]
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
  sample = runs[0].last("train/trapped_sample_size")
  if sample:
    lines.append(f"\n*trapped: on a fixed random sample of {int(sample)} "
                 "weights per layer type; in the deadzone at each of the last "
                 "K steps after reaching |W|/delta >= 0.9 and moving back.")
  return "\n".join(lines) + "\n"


def analyze(workdirs, out=None, hist_steps=None) -> pathlib.Path:
  runs = [Run(w) for w in workdirs]
  out = pathlib.Path(out or runs[0].workdir / "analysis")
  out.mkdir(parents=True, exist_ok=True)
  plot_fractions(runs, out)
  plot_histograms(runs, out, hist_steps)
  plot_gsnr(runs, out)
  plot_loss(runs, out)
  (out / "summary.md").write_text(summary_table(runs))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--compare", nargs="*", default=[])
  p.add_argument("--out", default=None, help="default: WORKDIR/analysis")
  p.add_argument("--hist_steps", type=int, nargs="*", default=None,
                 help="steps whose |W|/delta histograms to plot "
                 "(default: first and last logged)")
  args = p.parse_args(argv)
  out = analyze([args.workdir, *args.compare], args.out, args.hist_steps)
  print((out / "summary.md").read_text())
  print(f"plots in {out}")


if __name__ == "__main__":
  main()
