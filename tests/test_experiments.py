"""Sweeps resume without redoing finished points; the reproduction runs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import sweep  # noqa: E402  pylint: disable=wrong-import-position


def _env():
  return {**os.environ, "XLA_FLAGS": ""}  # one device per subprocess


def test_grid_is_a_product_and_names_are_stable():
  points = sweep.grid(["lambda", "seeds"])
  assert len(points) == 18 and len({sweep.point_name(p) for p in points}) == 18
  assert sweep.point_name({"model.quant.lam": 1e-3, "seed": 2}) == \
      "lam=0.001,seed=2"
  with pytest.raises(SystemExit, match="unknown sweep"):
    sweep.grid(["lamda"])


def test_interrupted_sweep_resumes_without_redoing_points(tmp_path):
  out = tmp_path / "sweep"
  cmd = [sys.executable, str(ROOT / "experiments/sweep.py"), "--config",
         str(ROOT / "configs/tiny.py"), "--sweep", "seeds",
         "--set", "train.steps=4", "--set", "train.eval_every=100",
         "--set", f"data.cache_dir={tmp_path}/c", "--out", str(out)]
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


def test_reproduce_small_tiny_smoke(tmp_path):
  import reproduce_small  # pylint: disable=g-import-not-at-top
  out = tmp_path / "repro"
  reproduce_small.main(["--tiny", "--seeds", "1", "--out", str(out),
                        "--methods", "none,absmean,tequila,tequila_dynamic"])
  table = json.loads((out / "summary.json").read_text())
  assert set(table) == {"none", "absmean", "tequila", "tequila_dynamic"}
  text = (out / "summary.md").read_text()
  assert "Claim" in text and "Input-agnostic approximation" in text
