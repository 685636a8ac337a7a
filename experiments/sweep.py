"""Sweeps as data: one command runs a grid of training runs and tabulates them.

    python -m experiments.sweep --config configs/tiny.py --sweep lambda \
        --sweep seeds --set train.steps=300 --out runs/sweep_lambda
    python -m experiments.sweep ... --parallel 4     # 4 points at a time
                                                    # (one GPU each if present)

A sweep is a function returning config overrides (`SWEEPS`); several
`--sweep` flags take their cartesian product. Every point trains in
`OUT/<point name>/` and, when done, writes `summary.json` (overrides, held-out
loss, deadzone figures, config, git commit, hardware, wall time). A point is
finished only once its summary is written: a restarted sweep skips finished
points and resumes unfinished ones from their last checkpoint (one stopped
after training, during its evaluation, is evaluated again from its last
checkpoint, with its real train loss and its wall time over all tries).
Results: `OUT/results.csv`, `OUT/results.md`, `OUT/results.png`.

Settings are compared *paired*: every point also scores its held-out windows
one by one, and `results.md` reports each setting's held-out loss minus the
reference setting's (`--reference`, default the first; for the methods
sweep use `--reference method=absmean`) over the same seeds
(= the same data order) and windows, with a 95% bootstrap interval over the
windows; "inconclusive" when it contains 0.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from experiments import common
# Plain Python (no JAX): the sweep's parent process stays free of it.
from tequila_jax.errors import ExpectedError
from tequila_jax.quant.config import LAM_MODES, METHODS


# Sherry without Arenas: the 3:4 ternary quantizer alone (ε = 0).
SHERRY_NO_ARENAS = {"model.quant.method": "sherry",
                    "model.quant.arenas_max_eps": 0.0}
SWEEPS = {
    "lambda": lambda: [{"model.quant.method": "tequila", "model.quant.lam": v}
                       for v in (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)],
    # Compare with `--reference method=absmean` (the static baseline); Sherry
    # also without its Arenas residual (ε = 0: the paper's ablation).
    "methods": lambda: [{"model.quant.method": m} for m in METHODS] + [
        SHERRY_NO_ARENAS],
    # Sherry (3:4 sparse ternary) with and without Arenas beside AbsMean and
    # Tequila (compare with `--reference method=absmean`).
    "sherry": lambda: [{"model.quant.method": m}
                       for m in ("absmean", "tequila", "sherry")] + [
                           SHERRY_NO_ARENAS],
    # Tequila's λ fixed, learned per layer / per output unit, or the official
    # ultraquantv3 (compare with `--reference lam_mode=fixed`).
    "lam_mode": lambda: [{"model.quant.method": "tequila",
                          "model.quant.lam_mode": m} for m in LAM_MODES],
    # W1.58A8: int8 per-token activations in training (vs 16-bit).
    "act_bits": lambda: [{"model.quant.act_bits": b} for b in (0, 8)],
    "granularity": lambda: [{"model.quant.granularity": "per_channel"}] + [
        {"model.quant.granularity": "per_group", "model.quant.group_size": g}
        for g in (32, 64, 128)],
    "seeds": lambda: [{"seed": s} for s in (0, 1, 2)],
    # Distillation from the float teacher (init.checkpoint): off, forward
    # and reverse KL (the first, off, is the default reference).
    "distill": lambda: [{"distill.weight": 0.0}] + [
        {"distill.weight": 1.0, "distill.kind": k} for k in ("kl", "reverse_kl")],
}
SUMMARY_KEYS = ("dead_fraction/all", "crossing_rate/all",
                "trapped_fraction/all", "trapped_of_dead/all",
                "escape_rate/all", "pileup_ratio/all", "gsnr_pooled_dead/all",
                "gsnr_pooled_active/all")
MAX_EVAL_WINDOWS = 2048  # held-out windows scored per point for pairing
WALL = "wall_s.json"  # a point's wall time over its earlier tries (seconds)


def grid(names: list[str]) -> list[dict]:
  """The cartesian product of the named sweeps' overrides."""
  unknown = [n for n in names if n not in SWEEPS]
  if unknown:
    raise ValueError(f"unknown sweep(s) {unknown}; known: {sorted(SWEEPS)}")
  points = [{}]
  for name in names:
    points = [{**a, **b} for a, b in itertools.product(points, SWEEPS[name]())]
  return points


def point_name(overrides: dict) -> str:
  parts = [f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())]
  return ",".join(parts) or "base"


def parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def run_point(config_spec, overrides: dict, workdir: pathlib.Path, *,
              evaluate_fn=None, max_eval_windows: int = MAX_EVAL_WINDOWS
              ) -> dict:
  """Trains one point (resuming if interrupted) and writes its summary.json.

  `config_spec` is a config file spec or a function returning a ConfigDict;
  `evaluate_fn(model, config, corpus_dir) -> dict` adds figures of its own
  (computed on the trained model) to the summary.
  """
  # Imported here so that the sweep's parent process never loads jax.
  import jax  # pylint: disable=g-import-not-at-top
  from tequila_jax import (config_lib, data, evaluate, metrics,  # pylint: disable=g-import-not-at-top
                           train)
  from tequila_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from tequila_jax.io import load, locations  # pylint: disable=g-import-not-at-top
  from tequila_jax.io.atomic import atomic_path  # pylint: disable=g-import-not-at-top
  config = (config_spec() if callable(config_spec)
            else config_lib.load_config_file(config_spec))
  config.update_from_flattened_dict(overrides)
  # The point's wall time over all its invocations (a stopped point resumes).
  wall_file = workdir / WALL
  spent = json.loads(wall_file.read_text()) if wall_file.exists() else 0.0
  start = time.time()
  try:
    summary = train.run(config, workdir, devices=jax.devices()[:1])
  finally:
    if workdir.is_dir():
      with atomic_path(wall_file) as tmp:
        tmp.write_text(json.dumps(spent + time.time() - start))
  if summary["stopped_by"]:  # checkpointed, not finished: rerun resumes it
    raise SystemExit(train.exit_code(summary))
  last = {}
  for record in metrics.read_jsonl(workdir / workdir_lib.METRICS):
    for key in SUMMARY_KEYS:
      if record.get(f"train/{key}") is not None:
        last[key] = record[f"train/{key}"]
  model = load.load_model(str(workdir))
  corpus = (config.data.corpus_dir or
            data.prepare_for_config(
                config, locations.load_tokenizer, progress=False))
  losses = evaluate.window_losses(
      model, corpus, seq_len=config.data.seq_len,
      max_windows=max_eval_windows,
      batch_size=config.train.eval_batch_size or 8)
  extra = evaluate_fn(model, config, corpus) if evaluate_fn else {}
  result = dict(name=workdir.name, overrides=overrides,
                eval_loss=summary["eval_after"]["loss"],
                eval_perplexity=summary["eval_after"]["perplexity"],
                train_loss=summary["loss"], steps=summary["step"],
                wall_s=spent + time.time() - start, **last,
                heldout_window_loss=float(losses.mean()),
                heldout_window_losses=losses.tolist(),
                eval_float=summary.get("eval_float"),
                eval_before=summary.get("eval_before"), **extra,
                config=json.loads(config.to_json()), commit=common.git_commit(),
                hardware=common.machine())
  with atomic_path(workdir / "summary.json") as tmp:  # a finished point
    tmp.write_text(json.dumps(result, indent=2))
  return result


def run_sweep(config_spec, points: list[dict], out: pathlib.Path, *,
              fixed: dict | None = None, parallel: int = 1,
              reference: str | None = None, evaluate_fn=None,
              max_eval_windows: int = MAX_EVAL_WINDOWS) -> list[dict]:
  """Runs every point (named by its own overrides; `fixed` applies to all)."""
  out.mkdir(parents=True, exist_ok=True)
  fixed = fixed or {}
  todo = [p for p in points if not (out / point_name(p) / "summary.json").exists()]
  print(f"{len(points)} points, {len(points) - len(todo)} already done.",
        flush=True)
  if parallel <= 1:
    for i, p in enumerate(todo):
      print(f"[{i + 1}/{len(todo)}] {point_name(p)}", flush=True)
      run_point(config_spec, {**fixed, **p}, out / point_name(p),
                evaluate_fn=evaluate_fn, max_eval_windows=max_eval_windows)
  else:
    if evaluate_fn:
      raise ValueError("evaluate_fn runs in this process: use parallel=1.")
    _run_parallel(config_spec, todo, fixed, out, parallel)
  results = [json.loads((out / point_name(p) / "summary.json").read_text())
             for p in points]
  write_results(results, out, reference)
  return results


def _run_parallel(config_spec, todo, fixed, out, parallel):
  """Points in subprocesses, at most `parallel` at once, one GPU each."""
  import jax  # pylint: disable=g-import-not-at-top
  from tequila_jax import train  # pylint: disable=g-import-not-at-top
  gpus = jax.device_count() if jax.default_backend() == "gpu" else 0
  running: dict[int, subprocess.Popen] = {}
  queue = list(todo)
  while queue or running:
    for slot in range(parallel):
      if slot not in running and queue:
        p = queue.pop(0)
        env = dict(os.environ)
        if gpus:
          env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        cmd = [sys.executable, "-m", "experiments.sweep", "--config", config_spec, "--point",
               json.dumps([point_name(p), {**fixed, **p}]), "--out", str(out)]
        running[slot] = subprocess.Popen(cmd, env=env, cwd=common.ROOT)
        print(f"started {point_name(p)} (slot {slot})", flush=True)
    for slot, proc in list(running.items()):
      if proc.poll() is not None:
        if proc.returncode in train.STOPPED_EXIT_CODES:
          raise ExpectedError(f"a sweep point was stopped by a signal (exit "
                              f"{proc.returncode}) after a checkpoint; rerun "
                              "the sweep to resume it.")
        if proc.returncode:
          raise ExpectedError(f"a sweep point failed (exit "
                              f"{proc.returncode}); rerun the sweep to retry "
                              "it.")
        del running[slot]
    time.sleep(1)


def paired(runs_a: list[dict], runs_b: list[dict], value
           ) -> tuple[np.ndarray, int]:
  """`(per-window or per-item value(A) − value(B), seeds)`: the difference
  averaged over the seeds both groups have (same seed = same data order);
  `value(run)` is the array to pair, e.g. its held-out window losses."""
  b_by_seed = {r["overrides"].get("seed", 0): r for r in runs_b}
  diffs = [np.asarray(value(r), float) - np.asarray(value(b_by_seed[s]), float)
           for r in runs_a if (s := r["overrides"].get("seed", 0)) in b_by_seed]
  if not diffs:
    raise ValueError("no seed is shared by the two groups: nothing to pair.")
  return np.mean(diffs, axis=0), len(diffs)


def bootstrap_ci(stat, arrays: list[np.ndarray], resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile 95% interval of `stat(*arrays)`, resampling the index the
  paired arrays share (windows or items; not the few seeds)."""
  rng = np.random.default_rng(seed)
  n = len(arrays[0])
  values = [stat(*(a[idx] for a in arrays))
            for idx in rng.integers(0, n, (resamples, n))]
  lo, hi = np.nanpercentile(values, [2.5, 97.5])
  return float(lo), float(hi)


def verdict(lo: float, hi: float, better: str, worse: str) -> str:
  """"inconclusive" when the interval of A − B contains 0, else who wins."""
  return "inconclusive" if lo <= 0 <= hi else (better if hi < 0 else worse)


def paired_difference(results_a: list[dict], results_b: list[dict], *,
                      names: tuple[str, str] = ("A", "B"),
                      resamples: int = 10_000, seed: int = 0) -> dict:
  """Held-out loss of A minus B, paired: the same seed (= the same data
  order) and the same held-out windows, with a bootstrap 95% interval over
  the windows."""
  d, seeds = paired(results_a, results_b,
                    lambda r: r["heldout_window_losses"])
  lo, hi = bootstrap_ci(np.mean, [d], resamples, seed)
  return dict(mean=float(d.mean()), ci95=(lo, hi), seeds=seeds,
              windows=len(d), verdict=verdict(lo, hi, f"{names[0]} better",
                                              f"{names[1]} better"))


def paired_table(groups: dict[str, list[dict]], reference: str) -> str:
  """Markdown: every group's held-out loss minus the reference group's."""
  lines = [f"Paired held-out loss differences vs `{reference}` (nats; same "
           "seed and windows; 95% bootstrap interval over windows: it covers "
           "the held-out sample, while run-to-run variation enters only "
           "through the seeds averaged per window):", "",
           "| group | Δ loss | 95% CI | seeds | windows | verdict |",
           "|---|---|---|---|---|---|"]
  for name, runs in groups.items():
    if name == reference:
      continue
    p = paired_difference(runs, groups[reference], names=(name, reference))
    lines.append(f"| {name} | {p['mean']:+.4f} | [{p['ci95'][0]:+.4f}, "
                 f"{p['ci95'][1]:+.4f}] | {p['seeds']} | {p['windows']} | "
                 f"{p['verdict']} |")
  return "\n".join(lines) + "\n"


def groups_by_setting(results: list[dict]) -> dict[str, list[dict]]:
  """Results grouped by their overrides other than the seed, in order."""
  keys = sorted({k for r in results for k in r["overrides"] if k != "seed"
                 and len({json.dumps(x["overrides"].get(k))
                          for x in results}) > 1})
  groups: dict[str, list[dict]] = {}
  for r in results:
    label = point_name({k: r["overrides"][k] for k in keys
                        if k in r["overrides"]})
    groups.setdefault(label, []).append(r)
  return groups


def write_results(results: list[dict], out: pathlib.Path,
                  reference: str | None = None) -> None:
  keys = sorted({k for r in results for k in r["overrides"]
                 if len({json.dumps(x["overrides"].get(k)) for x in results}) > 1})
  cols = ["name", *keys, "eval_loss", "eval_perplexity", "train_loss",
          *SUMMARY_KEYS, "steps", "wall_s"]
  with open(out / "results.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(cols)
    for r in results:
      writer.writerow([r["overrides"].get(c, r.get(c, "")) for c in cols])
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in results:
    cells = []
    for c in cols:
      v = r["overrides"].get(c, r.get(c, ""))
      cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
    lines.append("| " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  groups = groups_by_setting(results)
  if len(groups) > 1 and all("heldout_window_losses" in r for r in results):
    reference = reference or next(iter(groups))
    if reference not in groups:
      raise ValueError(f"--reference {reference!r} is none of the swept "
                       f"settings {list(groups)}.")
    text += "\n" + paired_table(groups, reference)
  (out / "results.md").write_text(text)
  _plot(results, out)


def _plot(results, out):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = groups_by_setting(results)
  labels = list(groups)
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(labels)), 3.8))
  for ax, key, title in ((axes[0], "eval_perplexity", "held-out perplexity"),
                         (axes[1], "trapped_fraction/all", "trapped fraction")):
    vals = [np.array([np.nan if r.get(key) is None else r[key]
                      for r in groups[g]], float) for g in labels]
    some = [v[~np.isnan(v)] for v in vals]  # the float model has no trapping
    ax.bar(range(len(labels)), [v.mean() if v.size else np.nan for v in some],
           yerr=[v.std() if v.size else 0 for v in some], capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right",
                  fontsize=8)
    ax.set_title(f"{title} (mean ± std over seeds)")
  fig.tight_layout()
  fig.savefig(out / "results.png", dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="config file[:arg]")
  p.add_argument("--sweep", action="append", default=[],
                 help=f"one of {sorted(SWEEPS)}; repeat for a product")
  p.add_argument("--set", action="append", default=[],
                 help="fixed override for every point, key=value")
  p.add_argument("--out", required=True)
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--reference", default=None,
                 help="the setting (point name without the seed) every other "
                 "is compared with, paired; default: the first")
  p.add_argument("--eval_windows", type=int, default=MAX_EVAL_WINDOWS,
                 help="held-out windows each point scores for the pairing")
  p.add_argument("--point", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  if args.point is not None:  # a worker of --parallel
    name, overrides = json.loads(args.point)
    run_point(args.config, overrides, out / name)
    return None
  fixed = dict(kv.split("=", 1) for kv in args.set)
  fixed = {k: parse_value(v) for k, v in fixed.items()}
  results = run_sweep(args.config, grid(args.sweep), out, fixed=fixed,
                      parallel=args.parallel, reference=args.reference,
                      max_eval_windows=args.eval_windows)
  print((out / "results.md").read_text())
  return results


if __name__ == "__main__":
  common.command(main)
