"""Source specs -> documents (text), and what identifies a source's bytes.

Source specs (comma-separated in `config.data.sources`):
  asset:shakespeare               an offline corpus (`data.corpora`)
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

from tequila_jax.data import corpora
from tequila_jax.errors import ExpectedError

ERRORS = ("strict", "replace")  # data.errors: undecodable bytes refused/replaced


class DataError(ExpectedError, ValueError):
  """A data source, prepared corpus or data config that cannot be used."""


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
    for f in sorted(corpora.fetch(spec[6:]).glob("*.txt")):
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


def content_hash(keys) -> str:
  """A short hash of content keys (JSON data such as `fingerprint`s): the
  corpus cache's key, and how a run records its distillation teacher."""
  text = json.dumps(keys, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_name(spec: str) -> str:
  """The name a source's figures go by: the asset's name, else the spec."""
  return spec.split(":", 1)[1] if spec.startswith("asset:") else spec


def provenance(spec: str) -> dict:
  """Package, version, sha256 and licence of an offline corpus; {} for
  other sources."""
  if spec.startswith("asset:") and spec[6:] in corpora.CORPORA:
    return corpora.provenance(spec[6:])
  return {}
