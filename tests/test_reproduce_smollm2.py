"""The SmolLM2 reproduction's pipeline end to end at CPU scale (a tiny
random model on Shakespeare bytes), its cloze items and its statistics."""

import json

import numpy as np
import pytest

from experiments import reproduce_smollm2 as rep
from tequila_jax import data
from tequila_jax.io import tokenizers

TOK = tokenizers.from_file("bytes")


def test_smoke_pipeline_writes_the_report(tmp_path):
  rep.main(["smoke", "--out", str(tmp_path)])
  report = tmp_path / "report"
  got = json.loads((report / "results.json").read_text())
  assert set(got["runs"]) == {"absmean-s0", "tequila-s0", "float-s0"}
  for row in got["runs"].values():
    assert np.isfinite(row["loss"]) and 0 <= row["cloze_acc"] <= 1
    assert set(row["per_source"]) == {"shakespeare"}
    assert row["tokens"] == 4096 and row["tokens_per_s"] > 0
  t = got["paired"]["tequila"]
  assert t["ci95"][0] <= t["delta_loss"] <= t["ci95"][1]
  assert t["items"] == 40 and t["gap_share"]["windows"] == t["windows"]
  assert t["verdict"] in ("inconclusive", "tequila better", "absmean better")
  assert got["runs"]["tequila-s0"]["trapped"] is not None
  assert "## Verdict\n\n*Pipeline check only" in (report / "results.md").read_text()
  for png in ("results.png", "trapping.png", "gsnr.png", "loss.png"):
    assert (report / png).stat().st_size > 1000
  # A second `run` finds every run done; `report` alone rebuilds the same.
  rep.main(["run", "--smoke", "--out", str(tmp_path), "--runs", "tequila-s0"])
  rep.main(["report", "--out", str(tmp_path), "--results", str(tmp_path / "r2")])
  assert json.loads((tmp_path / "r2" / "results.json").read_text()) == got


def test_cloze_items_come_from_held_out_documents(tmp_path):
  sentences = [f"Sentence number {i} of document {d} says something here."
               for d in range(6) for i in range(12)]
  for d in range(6):
    (tmp_path / f"{d}.txt").write_text(" ".join(sentences[d * 12:(d + 1) * 12]))
  corpus = data.prepare(f"{tmp_path}/*.txt", TOK, tmp_path / "c",
                        tokenizer_name="bytes", eval_fraction=0.3,
                        progress=False)
  held = TOK.decode(np.fromfile(corpus / "eval.bin", np.uint16).tolist())
  held_docs = data.read_meta(corpus)["per_source"][0]["eval_documents"]
  assert len(rep.build_cloze(corpus, TOK, 500)) == 11 * held_docs  # all
  items = rep.build_cloze(corpus, TOK, 15)
  assert items == rep.build_cloze(corpus, TOK, 15)  # deterministic
  assert len(items) == 15
  for ex in items:
    answer = ex["choices"][ex["label"]].strip()
    assert len(set(ex["choices"])) == 4
    assert ex["context"].split(". ")[-1].rstrip(".") in held
    assert f"{ex['context']} {answer}" in held  # the true continuation
    assert all(c.strip() in held for c in ex["choices"])  # held out only
    assert ex["context_ids"] == TOK.encode(ex["context"], bos=True)


def test_gap_share_against_a_direct_computation():
  rng = np.random.default_rng(0)
  absmean = rng.normal(3.0, 0.1, 64)
  float_ = absmean - 0.2 + rng.normal(0, 0.01, 64)
  tequila = absmean - 0.05 + rng.normal(0, 0.01, 64)
  mk = lambda v: [dict(overrides={"seed": 0}, heldout_window_losses=v)]  # noqa: E731
  got = rep.gap_share({"absmean": mk(absmean), "float": mk(float_),
                       "tequila": mk(tequila)}, "tequila")
  want = (absmean - tequila).mean() / (absmean - float_).mean()
  assert got["share"] == pytest.approx(want, rel=1e-12)
  assert got["ci95"][0] < want < got["ci95"][1] and got["ci95"][1] < 0.5


def test_runs_end_with_the_reviewers_baselines():
  """The learned-scale baselines and v3 follow the runs that existed, in the
  references' layout; distillation and A8 come after them, then Sherry with
  and without Arenas."""
  from experiments import reproduce_smollm2  # pylint: disable=g-import-not-at-top
  names = list(reproduce_smollm2.RUNS)
  assert names.index("tequila_dynamic-s0") < names.index("seq-s0")
  assert names[names.index("seq-s0"):] == [
      "seq-s0", "lsq-s0", "dlt-s0", "tequila_lamv3-s0", "tequila_kd-s0",
      "absmean_kd-s0", "tequila_a8-s0", "sherry-s0", "sherry_noarenas-s0"]
  # The report groups runs by the name before "-sN": one group each.
  assert rep._group("sherry_noarenas-s0") == "sherry_noarenas"  # pylint: disable=protected-access
  assert reproduce_smollm2.RUNS["sherry-s0"] == {
      "model.quant.method": "sherry", "seed": 0}
  assert reproduce_smollm2.RUNS["sherry_noarenas-s0"] == {
      "model.quant.method": "sherry", "model.quant.arenas_max_eps": 0.0,
      "seed": 0}
  for name in ("seq-s0", "lsq-s0", "dlt-s0"):
    assert reproduce_smollm2.RUNS[name]["model.quant.granularity"] == (
        "per_channel")
  assert reproduce_smollm2.RUNS["tequila_lamv3-s0"]["model.quant.lam_mode"] == "v3"
  assert reproduce_smollm2.RUNS["tequila_a8-s0"]["model.quant.act_bits"] == 8


def test_pack_splits_the_gguf_into_parts_that_travel(tmp_path, monkeypatch):
  """`pack`: part 1 holds the corpus, cloze items and wheels (the wheel
  download is stubbed: no network here), the GGUF follows in pieces of at
  most `part_bytes` whose join matches the sha256 in the last part."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  from experiments import reproduce_smollm2_pack  # pylint: disable=g-import-not-at-top
  real_run, pips = subprocess.run, []

  def run(cmd, **kwargs):
    if cmd[1:4] == ["-m", "pip", "download"]:
      pips.append(cmd)
      return subprocess.CompletedProcess(cmd, 0)
    return real_run(cmd, **kwargs)
  monkeypatch.setattr(reproduce_smollm2_pack.subprocess, "run", run)
  out = tmp_path / "out"
  (out / "corpus").mkdir(parents=True)
  (out / "corpus" / "train.bin").write_bytes(b"\0" * 100)
  (out / "cloze.jsonl").write_text("{}\n")
  blob = np.random.default_rng(0).bytes(2500)
  (tmp_path / "m.gguf").write_bytes(blob)
  dest = tmp_path / "parts"
  reproduce_smollm2_pack.pack(out, dest, str(tmp_path / "m.gguf"),
                              part_bytes=1000)
  assert sorted(p.name for p in dest.iterdir()) == ["1", "2", "3", "4"]
  assert (dest / "1" / "corpus.tar.xz").stat().st_size > 0
  assert pips[0][-len(reproduce_smollm2_pack.DEVICE_WHEELS):] == list(
      reproduce_smollm2_pack.DEVICE_WHEELS)
  pieces = [(dest / str(i + 2) / f"gguf.part{i}").read_bytes()
            for i in range(3)]
  assert [len(p) for p in pieces] == [1000, 1000, 500]
  assert b"".join(pieces) == blob
  assert (dest / "4" / "gguf.sha256").read_text() == (
      hashlib.sha256(blob).hexdigest() + "\n")
