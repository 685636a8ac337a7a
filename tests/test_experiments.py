"""Sweeps resume without redoing finished points; the reproduction runs."""

import json
import signal
import subprocess
import sys
import time

import pytest

from experiments import reproduce_small, sweep
from tests.cli import ROOT, env as _env
from tests.conftest import CORPORA


def test_grid_is_a_product_and_names_are_stable():
  points = sweep.grid(["lambda", "seeds"])
  assert len(points) == 18 and len({sweep.point_name(p) for p in points}) == 18
  assert sweep.point_name({"model.quant.lam": 1e-3, "seed": 2}) == \
      "lam=0.001,seed=2"
  with pytest.raises(ValueError, match="unknown sweep"):
    sweep.grid(["lamda"])


def test_methods_and_sherry_sweeps_hold_sherry_without_arenas():
  """The methods sweep is every method plus Sherry without Arenas (ε = 0);
  the sherry sweep sets Sherry, with and without Arenas, beside AbsMean and
  Tequila, all four with distinct point names."""
  from tequila_jax import quant  # pylint: disable=g-import-not-at-top
  no_arenas = {"model.quant.method": "sherry",
               "model.quant.arenas_max_eps": 0.0}
  assert sweep.grid(["methods"]) == [
      {"model.quant.method": m} for m in quant.METHODS] + [no_arenas]
  points = sweep.grid(["sherry"])
  assert points == [{"model.quant.method": m}
                    for m in ("absmean", "tequila", "sherry")] + [no_arenas]
  assert [sweep.point_name(p) for p in points] == [
      "method=absmean", "method=tequila", "method=sherry",
      "arenas_max_eps=0.0,method=sherry"]
  # Grouped for the paired table, the ablation is its own setting.
  runs = [{"overrides": p} for p in points]
  assert list(sweep.groups_by_setting(runs)) == [
      "method=absmean", "method=tequila", "method=sherry",
      "arenas_max_eps=0.0,method=sherry"]


def test_an_experiment_s_expected_error_is_one_line_and_exit_2(tmp_path):
  """As every tequila_jax command: a misspelt --sweep prints one line and
  exits 2 (it exited 1 through SystemExit); nothing is written."""
  out = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", "--config",
       str(ROOT / "configs/tiny.py"), "--sweep", "lamda", "--out",
       str(tmp_path / "s")], capture_output=True, text=True, env=_env(),
      cwd=ROOT, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: unknown sweep(s) "
                                                 "['lamda']; known: "), lines
  assert not (tmp_path / "s").exists()


def test_interrupted_sweep_resumes_without_redoing_points(tmp_path):
  out = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "experiments.sweep", "--config",
         str(ROOT / "configs/tiny.py"), "--sweep", "seeds",
         "--set", "train.steps=4", "--set", "train.eval_every=100",
         "--set", f"data.cache_dir={CORPORA}", "--out", str(out)]
  proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = out / "seed=0" / "summary.json"
  deadline = time.time() + 300
  while not first.exists() and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert first.exists() and not (out / "seed=2" / "summary.json").exists()
  stamp = first.stat().st_mtime_ns
  done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "3 points, 1 already done." in done.stdout
  assert first.stat().st_mtime_ns == stamp
  rows = (out / "results.csv").read_text().splitlines()
  assert len(rows) == 4 and rows[0].startswith("name,seed,eval_loss")
  summary = json.loads((out / "seed=1" / "summary.json").read_text())
  assert summary["overrides"]["train.steps"] == 4 and summary["commit"]
  assert (out / "results.png").exists()


@pytest.mark.slow  # 75 s; the sweep machinery stays covered by default
def test_reproduce_small_tiny_smoke(tmp_path):
  out = tmp_path / "repro"
  reproduce_small.main(["--tiny", "--seeds", "1", "--out", str(out),
                        "--methods", "none,absmean,tequila,tequila_dynamic"])
  table = json.loads((out / "summary.json").read_text())
  assert set(table) == {"none", "absmean", "tequila", "tequila_dynamic",
                        "tequila_vs_absmean"}
  assert table["tequila_vs_absmean"]["windows"] > 100
  text = (out / "summary.md").read_text()
  assert "Claim" in text and "Input-agnostic approximation" in text
  assert "Paired held-out loss differences vs `absmean`" in text


def _runs(losses_by_seed):
  return [{"overrides": {"seed": s}, "heldout_window_losses": list(v)}
          for s, v in losses_by_seed.items()]


def test_paired_difference_resamples_windows_not_seeds():
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  base = {s: rng.normal(3.0, 0.5, 400) for s in (0, 1)}  # hard/easy windows
  # B is A plus 0.01 nats on every window: tiny next to the window spread,
  # but paired it is unmistakable.
  shifted = {s: v + 0.01 + rng.normal(0, 0.002, 400) for s, v in base.items()}
  p = sweep.paired_difference(_runs(base), _runs(shifted), names=("a", "b"))
  assert p["verdict"] == "a better" and p["seeds"] == 2 and p["windows"] == 400
  np.testing.assert_allclose(p["mean"], -0.01, atol=5e-4)
  assert p["ci95"][0] < p["mean"] < p["ci95"][1] < 0
  noise = {s: v + rng.normal(0, 0.01, 400) for s, v in base.items()}
  assert sweep.paired_difference(_runs(noise), _runs(base))["verdict"] == \
      "inconclusive"
  # Only shared seeds are paired.
  assert sweep.paired_difference(_runs({0: base[0]}),
                                 _runs(shifted))["seeds"] == 1
  with pytest.raises(ValueError, match="no seed is shared"):
    sweep.paired_difference(_runs({5: base[0]}), _runs(base))
  table = sweep.paired_table({"x": _runs(base), "y": _runs(shifted)}, "y")
  assert "| x | -0.0" in table and "x better" in table


@pytest.mark.slow  # 2 min (every method trained); see the distill sweep test
def test_methods_sweep_pairs_every_method_with_absmean(tmp_path):
  """The methods sweep covers every method, learned quantizers included,
  and tabulates each one paired against `--reference method=absmean`."""
  from tequila_jax import quant  # pylint: disable=g-import-not-at-top
  out = tmp_path / "methods"
  sweep.main(["--config", str(ROOT / "configs/tiny.py"), "--sweep", "methods",
              "--eval_windows", "64",
              "--set", "train.steps=1", "--set", "train.eval_every=100",
              "--set", "train.eval_batches=1", "--set", "train.log_every=1",
              "--set", f"data.cache_dir={tmp_path}/c",
              "--out", str(out), "--reference", "method=absmean"])
  table = (out / "results.md").read_text()
  assert "vs `method=absmean`" in table
  paired_part = table.split("Paired held-out loss differences")[1]
  rows = [line for line in paired_part.splitlines()
          if line.startswith(("| method=", "| arenas_max_eps="))]
  paired_rows = {r.split(" | ")[0][2:] for r in rows}
  assert paired_rows == {f"method={m}" for m in quant.METHODS
                         if m != "absmean"} | {
                             "arenas_max_eps=0.0,method=sherry"}, table
