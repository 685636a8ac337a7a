"""Corpus preparation and the grain pipeline: packing, splits, sharding, resume."""

import json

import numpy as np
import pytest

from tequila_jax import data
from tequila_jax.io import tokenizers

TOK = tokenizers.from_file("bytes")
BOS, EOS = TOK.bos_id, TOK.eos_id


def _prepare(tmp_path, sources, eval_fraction=0.1, name="c", split="tail"):
  return data.prepare(sources, TOK, tmp_path / name, tokenizer_name="bytes",
                      eval_fraction=eval_fraction, split=split, progress=False)


def _stream(corpus, split):
  return np.fromfile(corpus / f"{split}.bin", np.dtype(
      data.read_meta(corpus)["dtype"]))


def test_text_files_packed_with_separators_and_held_out_tails(tmp_path):
  (tmp_path / "a.txt").write_text("a" * 50)
  (tmp_path / "b.txt").write_text("b" * 30)
  corpus = _prepare(tmp_path, str(tmp_path / "*.txt"))
  meta = data.read_meta(corpus)
  # 52 and 32 tokens with BOS/EOS; int(52 * .1) = 5 and 3 held out.
  assert (meta["train_tokens"], meta["eval_tokens"], meta["documents"]) == (
      76, 8, 2)
  assert meta["dtype"] == "uint16"
  train = _stream(corpus, "train")
  np.testing.assert_array_equal(train, [BOS] + [97] * 46 + [BOS] + [98] * 28)
  np.testing.assert_array_equal(_stream(corpus, "eval"),
                                [97] * 4 + [EOS] + [98] * 2 + [EOS])


def test_documents_split_holds_out_whole_documents_per_source(tmp_path):
  (tmp_path / "p").mkdir()
  (tmp_path / "q").mkdir()
  prose = {f"p/{i}.txt": f"prose document {i} " * (i + 1) for i in range(20)}
  tech = {f"q/{i}.txt": f"tech {i}" for i in range(4)}
  for name, text in {**prose, **tech, "q/dup.txt": " tech 0 "}.items():
    (tmp_path / name).write_text(text)
  spec = f"{tmp_path}/p/*.txt,{tmp_path}/q/*.txt"
  corpus = _prepare(tmp_path, spec, eval_fraction=0.1, split="documents")
  meta = data.read_meta(corpus)
  p, q = meta["per_source"]
  # The whitespace-only variant of "tech 0" is a duplicate.
  assert (q["documents"], q["duplicates"], meta["duplicates"]) == (4, 1, 1)
  wrap = lambda t: [BOS, *t.encode(), EOS]  # noqa: E731
  held = [t for t in prose.values() if wrap(t) in _split_docs(
      _stream(corpus, "eval")[:p["eval_tokens"]])]
  assert len(held) == p["eval_documents"] >= 1  # whole documents, in range
  train = _split_docs(_stream(corpus, "train"))
  assert not any(wrap(t) in train for t in held)  # no part of them trains
  assert len(train) == 24 - p["eval_documents"] - q["eval_documents"]
  # Held out in hash order until 10% of the characters: the last one taken
  # crossed the line.
  chars = sum(map(len, prose.values()))
  assert sum(map(len, held)) >= 0.1 * chars
  assert min(sum(map(len, held)) - len(t) for t in held) < 0.1 * chars
  assert q["eval_documents"] == 1  # "tech 0".."tech 3": one is over 10%
  assert data.eval_sources(corpus) == [p["name"], q["name"]]
  windows = data.PackedWindows(corpus, "eval", 4, source=q["name"])
  np.testing.assert_array_equal(
      windows[0], _stream(corpus, "eval")[q["eval_offset"]:][:5])
  # In-training eval batches spread over the whole held-out stream: the
  # first window and the last (in the last source) are both scored.
  every = data.PackedWindows(corpus, "eval", 4)
  rows = np.concatenate(data.eval_batches(corpus, seq_len=4, batch_size=2,
                                          max_batches=2))
  np.testing.assert_array_equal(rows[0], every[0])
  np.testing.assert_array_equal(rows[-1], every[len(every) - 1])
  # The choice depends on the documents' content, not on the source order.
  again = _prepare(tmp_path, f"{tmp_path}/q/*.txt,{tmp_path}/p/*.txt",
                   eval_fraction=0.1, split="documents", name="d")
  q2, p2 = data.read_meta(again)["per_source"]
  assert (p2["eval_tokens"], q2["eval_tokens"]) == (p["eval_tokens"],
                                                    q["eval_tokens"])
  with pytest.raises(data.DataError, match="single document"):
    _prepare(tmp_path, f"{tmp_path}/p/1.txt", split="documents", name="e")
  with pytest.raises(data.DataError, match="no held-out source"):
    data.PackedWindows(corpus, "eval", 4, source="nope")


def test_held_out_choice_rules():
  digests = [bytes([b]) for b in (5, 1, 4, 2, 3)]
  assert data.held_out_documents(digests, [10] * 5, 0.25) == {1, 3}
  assert data.held_out_documents(digests, [10] * 5, 0.01) == {1}
  assert data.held_out_documents(digests, [10] * 5, 0.01, first=False) == {1}
  assert data.held_out_documents(digests, [10] * 5, 0.99) == {1, 2, 3, 4}
  assert data.held_out_documents(digests[:1], [10], 0.5) == set()
  assert data.held_out_documents(digests, [10] * 5, 0.0) == set()


def _split_docs(stream) -> list[list[int]]:
  docs, current = [], []
  for t in stream.tolist():
    current.append(t)
    if t == EOS:
      docs.append(current)
      current = []
  return docs


def test_jsonl_parquet_and_arrayrecord_sources(tmp_path):
  docs = ["first document", "second one", "third"]
  (tmp_path / "d.jsonl").write_text(
      "\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  writer = array_record_module.ArrayRecordWriter(
      str(tmp_path / "d.array_record"), "group_size:1")
  for d in docs:
    writer.write(d.encode())
  writer.close()
  want = [t for d in docs for t in [BOS, *d.encode(), EOS]]
  for i, spec in enumerate([f"{tmp_path}/d.jsonl:body", f"{tmp_path}/d.parquet",
                            f"arrayrecord:{tmp_path}/d.array_record"]):
    corpus = _prepare(tmp_path, spec, eval_fraction=0.0, name=str(i))
    assert _stream(corpus, "train").tolist() == want, spec
  with pytest.raises(data.DataError, match="no field 'text'"):
    _prepare(tmp_path, f"{tmp_path}/d.jsonl", name="x")
  assert not (tmp_path / "x").exists()
  assert not list(tmp_path.glob(".x.*"))  # the failed attempt left nothing


def test_windows_overlap_by_one_token_and_cover_the_stream(tmp_path):
  (tmp_path / "a.txt").write_text("".join(chr(65 + i % 26) for i in range(300)))
  corpus = _prepare(tmp_path, str(tmp_path / "a.txt"), eval_fraction=0.0)
  stream = _stream(corpus, "train")
  windows = data.PackedWindows(corpus, "train", seq_len=16)
  assert len(windows) == (len(stream) - 1) // 16
  for i in range(len(windows)):
    np.testing.assert_array_equal(windows[i], stream[i * 16:i * 16 + 17])


def test_iterator_shuffles_shards_and_resumes(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "a.txt").write_text("".join(map(chr, rng.integers(65, 91, 4000))))
  corpus = _prepare(tmp_path, str(tmp_path / "a.txt"), eval_fraction=0.0)
  kw = dict(seq_len=16, batch_size=4, seed=3)
  n_windows = len(data.PackedWindows(corpus, "train", 16))

  def first_rows(it, n):
    return [tuple(row) for _ in range(n) for row in next(it)]

  epoch = n_windows // 4
  rows = first_rows(data.train_iterator(corpus, **kw), 2 * epoch)
  assert len(set(rows[:epoch * 4])) == epoch * 4  # an epoch has no repeats
  assert rows[:8] != first_rows(data.train_iterator(corpus, **{**kw, "seed": 4}), 2)
  assert rows[:epoch * 4] != rows[epoch * 4:]  # reshuffled next epoch
  # Two processes of 2 rows each: disjoint, and together, batch by batch,
  # the global batches of 4 rows that one process reads.
  shards = [first_rows(data.train_iterator(corpus, **{**kw, "batch_size": 2},
                                           process_index=p, process_count=2),
                       5) for p in (0, 1)]
  assert not set(shards[0]) & set(shards[1])
  assert [r for b in range(5) for s in shards for r in s[2 * b:2 * b + 2]
          ] == rows[:20]
  it = data.train_iterator(corpus, **kw)
  first_rows(it, 7)
  state = it.get_state()
  want = first_rows(it, 5)
  resumed = data.train_iterator(corpus, **kw)
  resumed.set_state(state)
  assert first_rows(resumed, 5) == want


def test_errors(tmp_path):
  (tmp_path / "a.txt").write_text("tiny")
  corpus = _prepare(tmp_path, str(tmp_path / "a.txt"))
  with pytest.raises(data.DataError, match="fewer than one global batch"):
    data.train_iterator(corpus, seq_len=64, batch_size=4, seed=0)
  with pytest.raises(data.DataError, match="fewer than one batch"):
    data.eval_batches(corpus, seq_len=64, batch_size=4, max_batches=2)
  with pytest.raises(data.DataError, match="not a prepared corpus"):
    data.read_meta(tmp_path)
  with pytest.raises(data.DataError, match="matches no files"):
    _prepare(tmp_path, str(tmp_path / "none*.txt"), name="n")


def test_corpora_are_keyed_by_content_and_options(tmp_path):
  """Changing max_documents or editing a source prepares a new corpus
  (the key hashes both); the manifest records what the key hashes."""
  from tequila_jax import config_lib
  for i in range(4):
    (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 50)
  config = config_lib.tiny()
  config.data.update(sources=str(tmp_path / "d*.txt"),
                     cache_dir=str(tmp_path / "cache"), max_documents=3)
  asked = []  # the spec the key hashes is the one the tokenizer comes from
  load = lambda spec: asked.append(spec) or TOK  # noqa: E731
  three = data.prepare_for_config(config, load, progress=False)
  assert asked == ["bytes"]
  assert data.read_meta(three)["documents"] == 3
  config.data.max_documents = 0
  everything = data.prepare_for_config(config, load, progress=False)
  assert everything != three and data.read_meta(everything)["documents"] == 4
  assert data.prepare_for_config(config, load, progress=False) == everything
  (tmp_path / "d1.txt").write_text("edited " * 80)
  edited = data.prepare_for_config(config, load, progress=False)
  assert edited != everything
  meta = data.read_meta(edited)
  assert meta["train_tokens"] + meta["eval_tokens"] != (
      data.read_meta(everything)["train_tokens"] +
      data.read_meta(everything)["eval_tokens"])
  files = [f for f, *_ in meta["key_inputs"]["sources"][0][1:]]
  assert files == [str(tmp_path / f"d{i}.txt") for i in range(4)]


def test_bad_bytes_are_named_not_replaced(tmp_path):
  (tmp_path / "ok.txt").write_text("fine text\n")
  (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
  (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b",\n')
  with pytest.raises(data.DataError, match=r"latin1.txt is not UTF-8 text: "
                     r"byte 3 .*data.errors=replace"):
    _prepare(tmp_path, str(tmp_path / "*.txt"))
  with pytest.raises(data.DataError, match=r"blob.bin .*(not UTF-8|NUL)"):
    _prepare(tmp_path, str(tmp_path / "blob.bin"), name="b")
  with pytest.raises(data.DataError, match=r"bad.jsonl:2 is not valid JSON"):
    _prepare(tmp_path, str(tmp_path / "bad.jsonl"), name="j")
  assert not (tmp_path / "c").exists()  # nothing half-written
  corpus = data.prepare(str(tmp_path / "*.txt"), TOK, tmp_path / "r",
                        tokenizer_name="bytes", eval_fraction=0.0,
                        errors="replace", progress=False)
  assert "caf\ufffd au lait" in bytes(
      _stream(corpus, "train")[_stream(corpus, "train") < 256].astype(
          np.uint8)).decode()
