"""Text corpora -> tokenized shards -> packed, shuffled, sharded grain batches.

`prepare` tokenizes a corpus once (with a progress bar) into a directory:

    meta.json            sources, tokenizer, split, token counts, and per
                         source: documents, duplicates, held-out offset,
                         package provenance and licence
    train.bin, eval.bin  flat token streams (uint16 if the vocabulary fits)

Every document becomes `[BOS] tokens [EOS]`. The held-out stream takes whole
documents (`data.split="documents"`, the default: a share `eval_fraction` of
every source's documents, chosen by content hash) or the final
`eval_fraction` of each document (`"tail"`); each source's held-out tokens
are contiguous, so its loss can be read on its own. Exact duplicate
documents are kept once. Streams are packed into
fixed-length windows of `seq_len + 1` tokens (no padding), which grain
shuffles with a seed (anew each epoch) and batches; each process reads only
its rows of every global batch. The grain iterator prefetches and is
checkpointable, so a resumed run sees
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

from tequila_jax.errors import ExpectedError
from tequila_jax.io import assets, locations
from tequila_jax.io.atomic import atomic_path
from tequila_jax.io.tokenizers import Tokenizer

META = "meta.json"


class DataError(ExpectedError, ValueError):
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


def _decode(data: bytes, where: str, errors: str) -> str:
  try:
    text = data.decode("utf-8", errors=errors)
  except UnicodeDecodeError as e:
    raise DataError(
        f"{where} is not UTF-8 text: byte {e.start} ({data[e.start:e.start + 4]!r}"
        ") cannot be decoded. Convert it, leave it out of data.sources, or set "
        "data.errors=replace to replace undecodable bytes.") from None
  if "\x00" in text and errors == "strict":
    raise DataError(f"{where} holds NUL bytes (at {text.index(chr(0))}): a "
                    "binary file? Leave it out of data.sources, or set "
                    "data.errors=replace to read it anyway.")
  return text


def _source_pattern(spec: str) -> str | None:
  """The file pattern of a file-based source spec (None: asset, hf)."""
  if spec.startswith(("asset:", "hf:")):
    return None
  if spec.startswith("arrayrecord:"):
    return spec[12:]
  if ".jsonl" in spec or ".parquet" in spec:
    return _split_field(spec)[0]
  return spec


def iter_documents(spec: str, errors: str = "strict") -> Iterator[str]:
  """Yields the documents of one source spec (module docstring); bytes that
  are not UTF-8 raise a `DataError` naming the file and offset unless
  `errors="replace"`."""
  if errors not in ERRORS:
    raise DataError(f"data.errors must be one of {ERRORS}, got {errors!r}.")
  if spec.startswith("asset:"):
    for f in sorted(assets.fetch(spec[6:]).glob("*.txt")):
      yield f.read_text(encoding="utf-8", errors="replace")  # pinned texts
  elif spec.startswith("arrayrecord:"):
    source = grain.sources.ArrayRecordDataSource(_expand(spec[12:]))
    for i in range(len(source)):
      yield _decode(bytes(source[i]), f"{spec} record {i}", errors)
  elif spec.startswith("hf:"):
    yield from _hf_documents(spec[3:])
  elif ".jsonl" in spec:
    pattern, field = _split_field(spec)
    for f in _expand(pattern):
      with open(f, "rb") as fh:
        for n, raw in enumerate(fh):
          line = _decode(raw, f"{f}:{n + 1}", errors)
          if not line.strip():
            continue
          try:
            doc = json.loads(line)
          except json.JSONDecodeError as e:
            raise DataError(f"{f}:{n + 1} is not valid JSON ({e.msg}, column "
                            f"{e.colno}); fix or remove the line.") from None
          if not isinstance(doc, dict) or field not in doc:
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
      yield _decode(pathlib.Path(f).read_bytes(), f, errors)


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


SPLITS = ("documents", "tail")
ERRORS = ("strict", "replace")  # data.errors: undecodable bytes refused/replaced
CORPUS_FORMAT = 2  # bumped when prepare's output changes for the same inputs
_SPLIT_BLOCK = 10_000  # documents ranked together for the held-out choice


def fingerprint(spec: str) -> list:
  """What identifies the bytes behind a source or tokenizer spec without
  reading them: each file's path, size and modification time (a demo asset
  is pinned by its name; an `hf:` dataset is known by its name only)."""
  pattern = _source_pattern(spec)
  if pattern is None:
    return [spec]
  path = pathlib.Path(os.path.expanduser(pattern))
  if path.is_dir():  # e.g. a tokenizer directory
    files = [str(p) for p in path.rglob("*") if p.is_file()]
  elif path.exists():
    files = [str(path)]
  else:  # a glob, or a name such as "bytes" (no files)
    files = glob.glob(str(path))
  return [spec] + [[f, st.st_size, st.st_mtime_ns]
                   for f in sorted(files) for st in [os.stat(f)]]


def corpus_key(sources: str, tokenizer_name: str, eval_fraction: float,
               split: str = "documents", max_documents: int = 0,
               errors: str = "strict") -> tuple[str, dict]:
  """The cache key of a prepared corpus and what it hashes: everything that
  changes its bytes, the sources' and tokenizer's files (`fingerprint`)
  included, so that an edited source is tokenized anew."""
  inputs = dict(
      sources=[fingerprint(s.strip()) for s in sources.split(",") if s.strip()],
      tokenizer=fingerprint(tokenizer_name), eval_fraction=eval_fraction,
      split=split, max_documents=max_documents, errors=errors,
      format=CORPUS_FORMAT)
  return content_hash(inputs), inputs


def content_hash(keys) -> str:
  """A short hash of content keys (JSON data such as `fingerprint`s): the
  corpus cache's key, and how a run records its distillation teacher."""
  text = json.dumps(keys, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_name(spec: str) -> str:
  """The name a source's figures go by: the asset's name, else the spec."""
  return spec.split(":", 1)[1] if spec.startswith("asset:") else spec


def held_out_documents(digests: list[bytes], sizes: list[int],
                       fraction: float, first: bool = True) -> set[int]:
  """Which documents of a block (up to 10,000 of one source, in reading
  order) are held out whole: in the order of their content hashes, until
  they hold `fraction` of the block's characters; at least one in a
  source's first block of two or more, never all. Deterministic, and
  independent of the order of the sources."""
  if fraction <= 0 or len(digests) < 2:
    return set()
  chosen, held, goal = set(), 0, fraction * sum(sizes)
  for i in sorted(range(len(digests)), key=digests.__getitem__):
    if held >= goal and (chosen or not first) or len(chosen) == len(digests) - 1:
      break
    chosen.add(i)
    held += sizes[i]
  return chosen


def _provenance(spec: str) -> dict:
  if spec.startswith("asset:") and spec[6:] in assets.ASSETS:
    return assets.provenance(spec[6:])
  return {}


def prepare(sources: str, tok: Tokenizer, out_dir, *, tokenizer_name: str,
            eval_fraction: float = 0.02, split: str = "documents",
            max_documents: int = 0, errors: str = "strict",
            batch_docs: int = 64, progress: bool = True,
            key_inputs: dict | None = None) -> pathlib.Path:
  """Tokenizes `sources` into `out_dir` (atomic; reused if already there).

  `split="documents"` holds out whole documents of every source
  (`held_out_documents`), so the held-out stream is text the model never
  saw any part of; `"tail"` holds out the last `eval_fraction` of each
  document's tokens. Either way the held-out tokens of each source are
  contiguous in eval.bin, at the offsets meta.json gives per source, and
  exact duplicate documents (after whitespace normalisation) are kept once.
  `key_inputs` (what the cache key hashes) is recorded in meta.json.
  """
  out_dir = pathlib.Path(out_dir)
  if (out_dir / META).exists():
    return out_dir
  if not 0 <= eval_fraction < 1:
    raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
  if split not in SPLITS:
    raise DataError(f"data.split must be one of {SPLITS}, got {split!r}.")
  dtype = _token_dtype(tok.vocab_size)
  specs = [s.strip() for s in sources.split(",") if s.strip()]
  seen: set[bytes] = set()
  table, total_docs = [], 0
  with atomic_path(out_dir, directory=True) as tmp:
    with open(tmp / "train.bin", "wb") as train, \
         open(tmp / "eval.bin", "wb") as held_out, \
         tqdm.tqdm(desc="tokenizing", unit="doc",
                   disable=None if progress else True) as bar:  # TTY only
      eval_offset = 0
      for spec in specs:
        row = dict(name=source_name(spec), spec=spec, documents=0,
                   duplicates=0, eval_documents=0, train_tokens=0,
                   eval_tokens=0, eval_offset=eval_offset, **_provenance(spec))

        def flush(docs, digests, first):
          if (split == "documents" and eval_fraction > 0 and first
              and len(docs) == 1):
            raise DataError(
                f"data source {spec!r} has a single document, so no whole "
                "document can be held out; give it as several files or set "
                "data.split=tail (the end of each document held out).")
          chosen = (held_out_documents(digests, [len(d) for d in docs],
                                       eval_fraction, first)
                    if split == "documents" else set())
          row["documents"] += len(docs)
          row["eval_documents"] += len(chosen)
          for start in range(0, len(docs), batch_docs):
            batch = docs[start:start + batch_docs]
            encoded = tok.encode_batch(batch, bos=tok.bos_id is not None,
                                       eos=tok.eos_id is not None)
            for i, ids in enumerate(encoded, start):
              ids = np.asarray(ids, dtype)
              n_eval = (len(ids) if i in chosen else
                        int(len(ids) * eval_fraction) if split == "tail"
                        else 0)
              train.write(ids[:len(ids) - n_eval].tobytes())
              held_out.write(ids[len(ids) - n_eval:].tobytes())
              row["train_tokens"] += len(ids) - n_eval
              row["eval_tokens"] += n_eval
            bar.update(len(batch))
            bar.set_postfix(source=row["name"][-24:])

        docs, digests, first = [], [], True
        for doc in iter_documents(spec, errors):
          if max_documents and total_docs >= max_documents:
            break
          digest = hashlib.sha256(" ".join(doc.split()).encode()).digest()
          if digest in seen:
            row["duplicates"] += 1
            continue
          seen.add(digest)
          docs.append(doc)
          digests.append(digest)
          total_docs += 1
          if len(docs) == _SPLIT_BLOCK:
            flush(docs, digests, first)
            docs, digests, first = [], [], False
        if docs:
          flush(docs, digests, first)
        eval_offset += row["eval_tokens"]
        table.append(row)
    train_tokens = sum(r["train_tokens"] for r in table)
    if train_tokens == 0:
      raise DataError(f"data sources {sources!r} produced no tokens.")
    meta = dict(sources=sources, tokenizer=tokenizer_name,
                vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name,
                eval_fraction=eval_fraction, split=split,
                max_documents=max_documents, train_tokens=train_tokens,
                eval_tokens=sum(r["eval_tokens"] for r in table),
                documents=total_docs,
                duplicates=sum(r["duplicates"] for r in table),
                per_source=table, key_inputs=key_inputs)
    (tmp / META).write_text(json.dumps(meta, indent=2))
  return out_dir


def prepare_for_config(config, progress: bool = True) -> pathlib.Path:
  """The prepared corpus for a training config (cached under
  `data.cache_dir` by a hash of the sources, tokenizer, split and
  max_documents)."""
  spec = config.data.tokenizer or config.init.checkpoint
  if not spec:
    raise DataError("no tokenizer: set data.tokenizer (a path or 'bytes') or "
                    "init.checkpoint.")
  tok = locations.load_tokenizer(spec)
  cache = pathlib.Path(config.data.cache_dir or
                       (assets.cache_dir() / "corpora")).expanduser()
  d = config.data
  key, inputs = corpus_key(d.sources, spec, d.eval_fraction, d.split,
                           d.max_documents, d.errors)
  return prepare(d.sources, tok, cache / key, tokenizer_name=spec,
                 eval_fraction=d.eval_fraction, split=d.split,
                 max_documents=d.max_documents, errors=d.errors,
                 progress=progress, key_inputs=inputs)


def read_meta(corpus_dir) -> dict:
  path = pathlib.Path(corpus_dir) / META
  if not path.exists():
    raise DataError(f"{corpus_dir} is not a prepared corpus (no {META}); run "
                    "`python -m tequila_jax.data --config ...` or let the "
                    "trainer prepare it.")
  return json.loads(path.read_text())


def corpus_id(corpus_dir) -> dict:
  """What identifies a prepared corpus: `{"key", "inputs"}`, its cache key
  and what that hashes (`corpus_key`: the sources' files by path, size and
  mtime, the tokenizer, the split); a corpus without them is known by the
  hash of its meta.json."""
  meta = read_meta(corpus_dir)
  inputs = meta.get("key_inputs") or meta
  text = json.dumps(inputs, sort_keys=True)
  return dict(key=hashlib.sha256(text.encode()).hexdigest()[:16],
              inputs=inputs)


def changed_inputs(old: dict, new: dict) -> str:
  """What differs between two corpora's `corpus_id` inputs, in words."""
  files = lambda inputs: {f[0]: f[1:] for spec in inputs.get("sources", [])  # noqa: E731
                          for f in spec[1:] if isinstance(f, list)}
  before, after = files(old), files(new)
  parts = [f"{f} {'removed' if f not in after else 'added' if f not in before else 'changed'}"
           for f in sorted(before.keys() | after.keys())
           if before.get(f) != after.get(f)]
  parts += [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(
      old.keys() | new.keys()) if k != "sources" and old.get(k) != new.get(k)]
  return ", ".join(parts[:5]) + (", ..." if len(parts) > 5 else "") or (
      "its files differ")


def eval_sources(corpus_dir) -> list[str]:
  """The names of the sources that hold held-out tokens, in order."""
  return [r["name"] for r in read_meta(corpus_dir).get("per_source", [])
          if r["eval_tokens"]]


class PackedWindows(grain.sources.RandomAccessDataSource):
  """Window i = tokens[i*seq_len : (i+1)*seq_len + 1] of a token stream
  (the held-out stream of one source only, given `source`)."""

  def __init__(self, corpus_dir, split: str, seq_len: int,
               source: str | None = None):
    meta = read_meta(corpus_dir)
    self._path = str(pathlib.Path(corpus_dir) / f"{split}.bin")
    self._dtype = np.dtype(meta["dtype"])
    self._start, self._n = 0, meta[f"{split}_tokens"]
    if source is not None:
      rows = {r["name"]: r for r in meta.get("per_source", [])}
      if split != "eval" or source not in rows:
        raise DataError(f"{corpus_dir} has no held-out source {source!r}; "
                        f"it has {sorted(rows)}.")
      self._start, self._n = (rows[source]["eval_offset"],
                              rows[source]["eval_tokens"])
    self._seq_len = seq_len
    self._tokens = None

  def __len__(self) -> int:
    return max(0, (self._n - 1) // self._seq_len)

  def __getitem__(self, i: int) -> np.ndarray:
    if self._tokens is None:  # opened lazily: the source is pickled by grain
      self._tokens = np.memmap(self._path, self._dtype, mode="r")
    start = self._start + int(i) * self._seq_len
    return np.asarray(self._tokens[start:start + self._seq_len + 1], np.int32)

  def __repr__(self):
    return f"PackedWindows({self._path}, seq_len={self._seq_len})"


def train_iterator(corpus_dir, *, seq_len: int, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   num_threads: int = 2, prefetch: int = 8):
  """A checkpointable iterator of `[batch_size, seq_len + 1]` int32 batches
  (this process's share, `batch_size` rows, of a global batch of
  `batch_size * process_count`), looping over epochs."""
  source = PackedWindows(corpus_dir, "train", seq_len)
  if len(source) < batch_size * process_count:
    raise DataError(
        f"the training corpus has {len(source)} windows of {seq_len + 1} "
        f"tokens, fewer than one global batch of {batch_size * process_count}"
        "; use a larger corpus or a smaller batch_size/seq_len.")
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  # Process p reads rows [p * batch_size, (p + 1) * batch_size) of every
  # global batch, and only those: the global batch is the one a single
  # process would read.
  ds = ds.batch(batch_size, drop_remainder=True)
  if process_count > 1:
    ds = ds[process_index::process_count]
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch)))


def eval_batches(corpus_dir, *, seq_len: int, batch_size: int,
                 max_batches: int) -> list[np.ndarray]:
  """`max_batches` held-out batches of windows spread evenly over the whole
  held-out stream (so that every source is represented), deterministic."""
  source = PackedWindows(corpus_dir, "eval", seq_len)
  n = min(max_batches, len(source) // batch_size)
  if n == 0:
    raise DataError(
        f"the held-out split has {len(source)} windows of {seq_len + 1} "
        f"tokens, fewer than one batch of {batch_size}; raise "
        "data.eval_fraction or lower eval batch size.")
  picks = np.linspace(0, len(source) - 1, n * batch_size).round().astype(int)
  return [np.stack([source[i] for i in picks[b * batch_size:(b + 1) * batch_size]])
          for b in range(n)]
