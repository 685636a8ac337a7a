"""`python -m tequila_jax.analyze` on runs with known metrics."""

import json

from tequila_jax import analyze, diagnostics
from tests.cli import run_cli


def _write_run(path, method, dead):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(
      {"model": {"quant": {"method": method, "lam": 1e-3}},
       "diagnostics": {"hist_bins": 4, "hist_max": 2.0, "trap_steps": 100}}))
  records = []
  for step in (5, 10):
    r = {"step": step, "train/loss": 3.0 - step / 10,
         "train/trapped_sample_size": 4096.0}
    names = analyze.FRACTIONS + tuple(n for n, _ in analyze.TRAPPING) + (
        "trapped_of_dead", "gsnr_pooled_dead", "gsnr_pooled_active",
        "gsnr_dead", "gsnr_active") + tuple(
            diagnostics.gsnr_bin_name(*b) for b in analyze.GSNR_BINS)
    for name in names:
      for t in analyze.TYPES:
        r[f"train/{name}/{t}"] = dead if name == "dead_fraction" else 0.5
    r["train/escape_rate/all"] = None if step == 5 else 0.25
    for t in diagnostics.LAYER_TYPES:
      r[f"train/ratio_hist/{t}"] = [1, 2, 3, 4]
    records.append(r)
  records.append({"step": 10, "eval/loss": 2.5, "eval/perplexity": 12.18})
  (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))


def test_analyze_compares_runs(tmp_path):
  _write_run(tmp_path / "a", "absmean", 0.31)
  _write_run(tmp_path / "t", "tequila", 0.27)
  printed = run_cli("analyze", "--workdir", tmp_path / "a", "--compare",
                    tmp_path / "t").stdout
  out = tmp_path / "a" / "analysis"
  for name in ("fractions", "trapping", "histograms", "gsnr", "loss"):
    assert (out / f"{name}.png").stat().st_size > 10_000
  table = (out / "summary.md").read_text()
  assert ("| a (absmean) | 10 | 2 | 2.5 | 12.18 | 0.31 | 0.5 | 0.5 | 0.5 | "
          "0.25 | 0.5 |") in table
  assert "| t (tequila λ=0.001) | 10 | 2 | 2.5 | 12.18 | 0.27 |" in table
  assert "sample of 4096 weights" in table and "S = 100" in table
  assert "plots in" in printed
  run = analyze.Run(tmp_path / "a")
  assert run.histogram(10, "all").tolist() == [7, 14, 21, 28]
