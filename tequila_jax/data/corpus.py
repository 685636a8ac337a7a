"""Documents -> a tokenized corpus, cached by what its bytes depend on.

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
documents are kept once.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Callable

import numpy as np
import tqdm

from tequila_jax import workdir as workdir_lib
from tequila_jax.data.sources import (DataError, content_hash, fingerprint,
                                      iter_documents, provenance, source_name)
from tequila_jax.io import assets
from tequila_jax.io.atomic import atomic_path
from tequila_jax.io.tokenizers import Tokenizer

META = "meta.json"
SPLITS = ("documents", "tail")
CORPUS_FORMAT = 2  # bumped when prepare's output changes for the same inputs
_SPLIT_BLOCK = 10_000  # documents ranked together for the held-out choice


def _token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


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
                   eval_tokens=0, eval_offset=eval_offset, **provenance(spec))

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


def prepare_for_config(config, load_tokenizer: Callable[[str], Tokenizer],
                       progress: bool = True) -> pathlib.Path:
  """The prepared corpus for a training config, cached under
  `data.cache_dir` by a hash of the sources, tokenizer, split and
  max_documents. `load_tokenizer(spec)` opens the tokenizer the config names
  (`io.locations.load_tokenizer`): called here with the spec the key hashes,
  so the tokens and the key always agree."""
  spec = workdir_lib.tokenizer_spec(config)
  tok = load_tokenizer(spec)
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
