"""A tokenized corpus -> packed, shuffled, sharded grain batches.

Streams are packed into fixed-length windows of `seq_len + 1` tokens (no
padding), which grain shuffles with a seed (anew each epoch) and batches;
each process reads only its rows of every global batch. The grain iterator
prefetches and is checkpointable, so a resumed run sees exactly the batches
an unbroken run would.
"""

from __future__ import annotations

import pathlib

import grain
import numpy as np

from tequila_jax.data.corpus import read_meta
from tequila_jax.data.sources import DataError


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
