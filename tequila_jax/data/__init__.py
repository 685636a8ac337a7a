"""Text corpora -> tokenized shards -> packed, shuffled, sharded grain batches.

`prepare` tokenizes a corpus once (with a progress bar) into a directory:

    meta.json            sources, tokenizer, vocab size, token counts
    train.bin, eval.bin  flat token streams (uint16 if the vocabulary fits)

Every document becomes `[BOS] tokens [EOS]`; the final `eval_fraction` of each
document's tokens goes to the held-out stream. Streams are packed into
fixed-length windows of `seq_len + 1` tokens (no padding), which grain
shuffles with a seed (anew each epoch), shards by process, batches and
prefetches. The grain iterator is checkpointable, so a resumed run sees
exactly the batches an unbroken run would.

Source specs (comma-separated in `config.data.sources`):
  asset:shakespeare               a demo corpus (tequila_jax.io.assets)
  path/*.txt                      each file one document
  path/*.jsonl[:field]            one JSON document per line (field "text")
  path/*.parquet[:field]          a text column (needs pyarrow)
  arrayrecord:path/*.array_record records of UTF-8 text
  hf:dataset[:config]:split[:field]  Hugging Face `datasets` streaming
                                  (needs network and `pip install datasets`)
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
from typing import Iterator

import grain
import numpy as np
import tqdm

from tequila_jax.io import assets, load
from tequila_jax.io.atomic import atomic_path
from tequila_jax.io.tokenizers import Tokenizer

META = "meta.json"


class DataError(ValueError):
  pass


# --------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------

def _split_field(spec: str, default: str = "text") -> tuple[str, str]:
  path, sep, field = spec.rpartition(":")
  if sep and not os.sep in field and "." not in field:
    return path, field
  return spec, default


def _expand(pattern: str) -> list[str]:
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise DataError(f"data source {pattern!r} matches no files.")
  return files


def iter_documents(spec: str) -> Iterator[str]:
  """Yields the documents of one source spec (module docstring)."""
  if spec.startswith("asset:"):
    for f in sorted(assets.fetch(spec[6:]).glob("*.txt")):
      yield f.read_text(encoding="utf-8", errors="replace")
  elif spec.startswith("arrayrecord:"):
    source = grain.sources.ArrayRecordDataSource(_expand(spec[12:]))
    for i in range(len(source)):
      yield bytes(source[i]).decode("utf-8", errors="replace")
  elif spec.startswith("hf:"):
    yield from _hf_documents(spec[3:])
  elif ".jsonl" in spec:
    pattern, field = _split_field(spec)
    for f in _expand(pattern):
      with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
          if line.strip():
            doc = json.loads(line)
            if field not in doc:
              raise DataError(f"{f}:{n + 1} has no field {field!r}; name it "
                              f"as {pattern}:FIELD.")
            yield doc[field]
  elif ".parquet" in spec:
    pattern, field = _split_field(spec)
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise DataError("parquet sources need pyarrow: pip install pyarrow") from e
    for f in _expand(pattern):
      yield from pq.read_table(f, columns=[field]).column(field).to_pylist()
  else:
    for f in _expand(spec):
      yield pathlib.Path(f).read_text(encoding="utf-8", errors="replace")


def _hf_documents(spec: str) -> Iterator[str]:
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError("hf: sources need `pip install datasets` and network.") from e
  parts = spec.split(":")
  if len(parts) < 2:
    raise DataError(f"hf:{spec}: expected hf:dataset[:config]:split[:field].")
  field = "text"
  if len(parts) == 4:
    name, config, split, field = parts
  elif len(parts) == 3:
    name, config, split = parts
  else:
    (name, split), config = parts, None
  for row in datasets.load_dataset(name, config, split=split, streaming=True):
    yield row[field]


# --------------------------------------------------------------------------
# Tokenized corpus
# --------------------------------------------------------------------------

def _token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def corpus_key(sources: str, tokenizer_name: str, eval_fraction: float) -> str:
  text = json.dumps([sources, tokenizer_name, eval_fraction])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(sources: str, tok: Tokenizer, out_dir, *, tokenizer_name: str,
            eval_fraction: float = 0.02, max_documents: int = 0,
            batch_docs: int = 64, progress: bool = True) -> pathlib.Path:
  """Tokenizes `sources` into `out_dir` (atomic; reused if already there)."""
  out_dir = pathlib.Path(out_dir)
  if (out_dir / META).exists():
    return out_dir
  if not 0 <= eval_fraction < 1:
    raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
  dtype = _token_dtype(tok.vocab_size)
  counts = {"train": 0, "eval": 0, "documents": 0}
  with atomic_path(out_dir, directory=True) as tmp:
    with open(tmp / "train.bin", "wb") as train, \
         open(tmp / "eval.bin", "wb") as held_out, \
         tqdm.tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:

      def flush(docs):
        for ids in tok.encode_batch(docs, bos=tok.bos_id is not None,
                                    eos=tok.eos_id is not None):
          ids = np.asarray(ids, dtype)
          n_eval = int(len(ids) * eval_fraction)
          train.write(ids[:len(ids) - n_eval].tobytes())
          held_out.write(ids[len(ids) - n_eval:].tobytes())
          counts["train"] += len(ids) - n_eval
          counts["eval"] += n_eval
        counts["documents"] += len(docs)
        bar.update(len(docs))
        bar.set_postfix(tokens=counts["train"] + counts["eval"])

      docs = []
      for spec in filter(None, (s.strip() for s in sources.split(","))):
        for doc in iter_documents(spec):
          docs.append(doc)
          if len(docs) == batch_docs:
            flush(docs)
            docs = []
          if max_documents and counts["documents"] + len(docs) >= max_documents:
            break
      if docs:
        flush(docs)
    if counts["train"] == 0:
      raise DataError(f"data sources {sources!r} produced no tokens.")
    meta = dict(sources=sources, tokenizer=tokenizer_name,
                vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name,
                eval_fraction=eval_fraction, train_tokens=counts["train"],
                eval_tokens=counts["eval"], documents=counts["documents"])
    (tmp / META).write_text(json.dumps(meta, indent=2))
  return out_dir


def prepare_for_config(config, progress: bool = True) -> pathlib.Path:
  """The prepared corpus for a training config (cached by a hash of sources,
  tokenizer and split under `data.cache_dir`)."""
  spec = config.data.tokenizer or config.init.checkpoint
  if not spec:
    raise DataError("no tokenizer: set data.tokenizer (a path or 'bytes') or "
                    "init.checkpoint.")
  tok = load.load_tokenizer(spec)
  cache = pathlib.Path(config.data.cache_dir or
                       (assets.cache_dir() / "corpora")).expanduser()
  key = corpus_key(config.data.sources, spec, config.data.eval_fraction)
  corpus = prepare(config.data.sources, tok, cache / key, tokenizer_name=spec,
                   eval_fraction=config.data.eval_fraction,
                   max_documents=config.data.max_documents, progress=progress)
  return corpus


def read_meta(corpus_dir) -> dict:
  path = pathlib.Path(corpus_dir) / META
  if not path.exists():
    raise DataError(f"{corpus_dir} is not a prepared corpus (no {META}); run "
                    "`python -m tequila_jax.data --config ...` or let the "
                    "trainer prepare it.")
  return json.loads(path.read_text())


class PackedWindows(grain.sources.RandomAccessDataSource):
  """Window i = tokens[i*seq_len : (i+1)*seq_len + 1] of a token stream."""

  def __init__(self, corpus_dir, split: str, seq_len: int):
    meta = read_meta(corpus_dir)
    self._path = str(pathlib.Path(corpus_dir) / f"{split}.bin")
    self._dtype = np.dtype(meta["dtype"])
    self._n = meta[f"{split}_tokens"]
    self._seq_len = seq_len
    self._tokens = None

  def __len__(self) -> int:
    return max(0, (self._n - 1) // self._seq_len)

  def __getitem__(self, i: int) -> np.ndarray:
    if self._tokens is None:  # opened lazily: the source is pickled by grain
      self._tokens = np.memmap(self._path, self._dtype, mode="r")
    start = int(i) * self._seq_len
    return np.asarray(self._tokens[start:start + self._seq_len + 1], np.int32)

  def __repr__(self):
    return f"PackedWindows({self._path}, seq_len={self._seq_len})"


def train_iterator(corpus_dir, *, seq_len: int, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   num_threads: int = 2, prefetch: int = 8):
  """A checkpointable iterator of `[batch_size, seq_len + 1]` int32 batches
  (this process's share of the global batch), looping over epochs."""
  source = PackedWindows(corpus_dir, "train", seq_len)
  if len(source) < batch_size * process_count:
    raise DataError(
        f"the training corpus has {len(source)} windows of {seq_len + 1} "
        f"tokens, fewer than one global batch of {batch_size * process_count}"
        "; use a larger corpus or a smaller batch_size/seq_len.")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch)))


def eval_batches(corpus_dir, *, seq_len: int, batch_size: int,
                 max_batches: int) -> list[np.ndarray]:
  """The first `max_batches` held-out batches, in order (deterministic)."""
  source = PackedWindows(corpus_dir, "eval", seq_len)
  n = min(max_batches, len(source) // batch_size)
  if n == 0:
    raise DataError(
        f"the held-out split has {len(source)} windows of {seq_len + 1} "
        f"tokens, fewer than one batch of {batch_size}; raise "
        "data.eval_fraction or lower eval batch size.")
  return [np.stack([source[b * batch_size + i] for i in range(batch_size)])
          for b in range(n)]
