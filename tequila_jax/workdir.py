"""A training workdir's files, known only here.

`WORKDIR/config.json` (the run's config), `WORKDIR/corpus.json` (what
identifies its corpus), `WORKDIR/metrics.jsonl` (+ `tensorboard/`),
`WORKDIR/checkpoints/STEP/` (`tequila_jax.checkpoint`), `WORKDIR/lock`
(held by the run that is using the workdir), `WORKDIR/teacher.json` (a
distilling run's teacher: source, content hash, shapes; the teacher itself
is never checkpointed). Light on purpose (no JAX, no orbax): reading a
workdir's config or tokenizer does not load the training stack.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket

import ml_collections

from tequila_jax.errors import ExpectedError
from tequila_jax.io.atomic import atomic_path

CONFIG = "config.json"
CORPUS = "corpus.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LOCK = "lock"
TEACHER = "teacher.json"


class NoTokenizer(ExpectedError, ValueError):
  """A config that names no tokenizer (neither data nor init)."""


class WorkdirInUse(ExpectedError, RuntimeError):
  """Another run holds the workdir's lock."""


@contextlib.contextmanager
def workdir_lock(workdir):
  """Exclusive use of `workdir` by one run, for the duration of the block.

  An `flock` on `WORKDIR/lock`, which names its holder: the kernel drops it
  when the holder exits, however it exits, so a lock file left by a killed
  run never blocks the next one.
  """
  path = pathlib.Path(workdir) / LOCK
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise WorkdirInUse(
          f"{workdir} is in use by {holder}: wait for that run to finish or "
          "stop it, or train in another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def is_workdir(path) -> bool:
  path = pathlib.Path(path)
  return (path / CHECKPOINTS).is_dir() and (path / CONFIG).exists()


def read_config(workdir) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      json.loads((pathlib.Path(workdir) / CONFIG).read_text()))


def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  with atomic_path(pathlib.Path(workdir) / CONFIG) as tmp:
    tmp.write_text(config.to_json(indent=2))


def read_corpus(workdir) -> dict | None:
  """What identifies the corpus the run in `workdir` trained on
  (`data.corpus_id`), or None for a workdir of an older version."""
  path = pathlib.Path(workdir) / CORPUS
  return json.loads(path.read_text()) if path.exists() else None


def write_corpus(workdir, corpus: dict) -> None:
  with atomic_path(pathlib.Path(workdir) / CORPUS) as tmp:
    tmp.write_text(json.dumps(corpus, indent=2))


def write_teacher(workdir, record: dict) -> None:
  with atomic_path(pathlib.Path(workdir) / TEACHER) as tmp:
    tmp.write_text(json.dumps(record, indent=2))


def read_teacher(workdir) -> dict | None:
  """The teacher the run in `workdir` distilled from, if it did."""
  path = pathlib.Path(workdir) / TEACHER
  return json.loads(path.read_text()) if path.exists() else None


def tokenizer_spec(config: ml_collections.ConfigDict,
                   where: str = "the config") -> str:
  """Where a training config's tokenizer comes from: `data.tokenizer`, else
  its `init.checkpoint`'s (a location `io.locations.load_tokenizer` opens)."""
  spec = config.data.tokenizer or config.init.checkpoint
  if not spec:
    raise NoTokenizer(f"{where} names no tokenizer: set data.tokenizer (a "
                      "path or 'bytes') or init.checkpoint.")
  return spec
