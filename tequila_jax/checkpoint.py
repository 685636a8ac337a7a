"""The orbax checkpoints in a training workdir (`WORKDIR/checkpoints/STEP/`;
the workdir's other files are `tequila_jax.workdir`'s).

One `CheckpointManager` holds, per step, `state` (params, optimizer state,
step; restored straight into the sharded layout) and `data` (the grain
iterator position), so a resumed run continues the exact data stream.
Saves are asynchronous; orbax writes each step to a temporary directory and
renames it when complete, so an interrupted save never looks valid (one left
by a killed or failed save is removed when the workdir is next opened).

Integrity: orbax and tensorstore keep no checksum of the array data (zarr3's
`crc32c` codec guards only a shard's index, and orbax offers no codec
option), so each checkpoint also holds `integrity`, a 64-bit fingerprint of
every leaf of the state (`state_fingerprints`: params, optimizer state,
diagnostics, whatever leaves it has), computed where the state lives (in
place on the host for CPU arrays) at each save and verified after every
restore: a flipped byte is `CheckpointCorrupted`, never a silently
different state. Checkpoints of the previous algorithm (`FINGERPRINTS`)
still verify.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import re
import shutil
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tequila_jax.errors import ExpectedError
from tequila_jax.io.atomic import disk_full, is_disk_full
from tequila_jax.workdir import CHECKPOINTS

log = logging.getLogger("tequila_jax")

ITEMS = ("state", "data", "integrity")
_TMP = ".orbax-checkpoint-tmp"  # what orbax appends to an unfinished step
FINGERPRINT = "rowcol-fmix32x2-v2"  # the algorithm of `state_fingerprints`


class CheckpointCorrupted(ExpectedError, ValueError):
  """A checkpoint that cannot be read or whose restored arrays differ from
  what was saved; `problem` says which (naming the file or the leaf), the
  message says where too."""

  def __init__(self, where: str, problem: str):
    super().__init__(f"{where} {problem}.")
    self.where, self.problem = where, problem


# --------------------------------------------------------------------------
# Integrity: a fingerprint per leaf, computed where the state lives
# --------------------------------------------------------------------------

_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # one per 32-bit lane
_BLOCK = 1 << 18  # bytes of a leaf summed at a time on the host (in cache)


def _fmix32(h):
  """murmur3's finalizer: a bijection on uint32 that mixes every bit (numpy
  or jax arrays alike)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x) -> jax.Array:
  """A leaf's bits as uint32 words, in its shape (one per element; 64-bit:
  two, the last axis doubled)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[
      x.dtype.itemsize]
  w = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return w.reshape(*x.shape[:-1], -1) if x.dtype.itemsize == 8 else w


def _lanes(xp, rows, cols):
  """The fingerprint (2 uint32) of a leaf from its row and column sums (of
  its words as a matrix: rows = all but the last axis): per lane, every
  sum mixed with its index, `sum_i fmix(s_i ^ fmix(i + seed))` mod 2^32.
  `xp` is numpy or jax.numpy: one formula for both."""
  return xp.stack([
      xp.sum(_fmix32(s ^ _fmix32(xp.arange(s.size, dtype=xp.uint32)
                                 + xp.uint32(seed))), dtype=xp.uint32)
      for s, seed in zip((rows, cols), _SEEDS)])


def _host_sums(x) -> tuple[np.ndarray, np.ndarray]:
  """Row and column sums (mod 2^32) of a leaf's words, read in place on
  the host, one cache-sized block of rows at a time (one pass)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  a = np.asarray(x)
  a = a.reshape(a.shape or (1,))
  if a.dtype == np.bool_:
    a = a.view(np.uint8)
  a = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[
      a.dtype.itemsize])  # 64-bit: two words, the last axis doubled
  w = a.reshape(math.prod(a.shape[:-1]), a.shape[-1])
  rows, cols = np.empty(w.shape[0], np.uint32), np.zeros(w.shape[1], np.uint32)
  step = max(1, _BLOCK // max(1, w.shape[1] * w.itemsize))
  for b in range(0, w.shape[0], step):
    block = w[b:b + step]
    np.add.reduce(block, axis=1, dtype=np.uint32, out=rows[b:b + step])
    cols += np.add.reduce(block, axis=0, dtype=np.uint32)
  return rows, cols


def _device_lanes(x) -> jax.Array:
  """`_lanes` of a leaf on its devices (any sharding: the sums are exact
  in integers, so partial sums add up to the same words)."""
  w = _words(x)
  w = w.reshape(w.shape if w.ndim > 1 else (1, -1))
  rows = jnp.sum(w, axis=-1, dtype=jnp.uint32).reshape(-1)
  cols = jnp.sum(w, axis=tuple(range(w.ndim - 1)), dtype=jnp.uint32)
  return _lanes(jnp, rows, cols)


_device_fingerprints = jax.jit(lambda leaves: [_device_lanes(x)
                                               for x in leaves])


def _in_place(x) -> bool:
  """Whether the host can read `x`'s bytes in place (numpy, or a jax array
  on one CPU device): there numpy sums at memory speed, where XLA's CPU
  reductions run at a fraction of it."""
  if not isinstance(x, jax.Array):
    return True
  devices = x.sharding.device_set
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def state_fingerprints(state: dict) -> dict[str, str]:
  """`{leaf path: 16 hex digits}` for every leaf of `state` (algorithm
  `FINGERPRINT`): two 32-bit lanes from the row and column sums of the
  leaf's bits, so any change of one element changes both (fmix is a
  bijection), and a change goes unseen only if it keeps every row and
  column sum (+d/-d at a rectangle's corners) or its mixed sums cancel
  (odds 2^-32 a lane). Integer arithmetic: the same on every processor,
  thread count and sharding. Leaves on one CPU device are read in place on
  the host, others on their devices (one compiled call per set of
  devices); only the fingerprints come to the host. Paths as `_path`
  spells them, so a state restored as saved metadata lays it out (dicts
  for named tuples) has the same keys."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  lanes, groups = [None] * len(leaves), {}
  for i, (_, x) in enumerate(leaves):
    if not _in_place(x):
      groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
  pending = [(ix, _device_fingerprints([leaves[i][1] for i in ix]))
             for ix in groups.values()]  # dispatched: runs beside the host
  for i, (_, x) in enumerate(leaves):
    if _in_place(x):
      lanes[i] = _lanes(np, *_host_sums(x))
  for ix, out in pending:
    for i, v in zip(ix, jax.device_get(out)):
      lanes[i] = v
  return {_path(p): "".join(f"{int(v):08x}" for v in np.asarray(lane))
          for (p, _), lane in zip(leaves, lanes)}


def _fingerprint_v1(x) -> jax.Array:
  """fmix32x2-v1 (checkpoints before v2; read only): two 32-bit lanes of
  `sum_i fmix(word_i ^ fmix(i + c))` mod 2^32 over every element."""
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, dim) * (
        jnp.uint32(stride % 2**32))
    stride *= w.shape[dim]
  return jnp.stack([jnp.sum(_fmix32(w ^ _fmix32(index + jnp.uint32(c))),
                            dtype=jnp.uint32) for c in _SEEDS])


_fingerprints_v1 = jax.jit(lambda tree: jax.tree.map(_fingerprint_v1, tree))


def _state_fingerprints_v1(state: dict) -> dict[str, str]:
  """`state_fingerprints` as fmix32x2-v1 computed them (one top-level entry
  at a time: a stale entry may sit on other devices)."""
  out = {}
  for key, sub in state.items():
    leaves = jax.tree_util.tree_flatten_with_path(
        jax.device_get(_fingerprints_v1({key: sub})))[0]
    out.update({_path(p): "".join(f"{int(v):08x}" for v in np.asarray(x))
                for p, x in leaves})
  return out


FINGERPRINTS = {FINGERPRINT: state_fingerprints,
                "fmix32x2-v1": _state_fingerprints_v1}  # what verify reads


def verify(state, saved: dict | None, where: str) -> None:
  """Raises `CheckpointCorrupted` unless `state`'s fingerprints are `saved`
  (the `integrity` item; None: a checkpoint of an older version, which is
  accepted with a warning)."""
  if saved is None:
    log.warning("%s carries no integrity data (written by an older version): "
                "its arrays cannot be verified.", where)
    return
  fingerprints = FINGERPRINTS.get(saved.get("algorithm"))
  if fingerprints is None:
    raise CheckpointCorrupted(
        where, f"has an unknown integrity algorithm "
        f"{saved.get('algorithm')!r} (written by a newer version?)")
  now, then = fingerprints(state), saved["leaves"]
  paths = now.keys() | then.keys()
  bad = sorted(k for k in paths if now.get(k) != then.get(k))
  if bad:
    names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    raise CheckpointCorrupted(where, (
        f"is corrupted: the fingerprint of 1 of {len(paths)} arrays differs "
        f"from the saved one ({names})" if len(bad) == 1 else
        f"is corrupted: the fingerprints of {len(bad)} of {len(paths)} "
        f"arrays differ from the saved ones ({names})"))


class _IntegrityHandler(ocp.JsonCheckpointHandler):
  """The `integrity` item: JSON like `ocp.args.JsonSave`'s, written in the
  save's background once its fingerprints (a future, computed beside the
  state's write) are ready."""

  async def async_save(self, directory, item=None, args=None):
    del item
    record = args.record

    async def write():
      leaves = record["leaves"].result()
      if jax.process_index() == 0:
        (directory / "metadata").write_text(
            json.dumps({**record, "leaves": leaves}))
    return [ocp.future.CommitFutureAwaitingContractedSignals(
        write(), name="integrity")]


@ocp.args.register_with_handler(_IntegrityHandler, for_save=True)
@dataclasses.dataclass
class _IntegritySave(ocp.args.CheckpointArgs):
  record: dict  # {"algorithm": FINGERPRINT, "leaves": Future of the digits}


@ocp.args.register_with_handler(_IntegrityHandler, for_restore=True)
@dataclasses.dataclass
class _IntegrityRestore(ocp.args.CheckpointArgs):
  """The record as saved (also by `ocp.args.JsonSave`, before v2)."""


class _OrbaxErrors(logging.Filter):
  """Drops orbax's own error logs (each a traceback of hundreds of lines)
  and asyncio's reports of the futures a failed save abandoned: the error
  they report is raised to the caller as one exception."""

  def filter(self, record):
    if record.levelno >= logging.ERROR and (
        "orbax" in record.pathname or record.name == "asyncio"):
      log.debug("orbax: %s", record.getMessage())
      return False
    return True


@contextlib.contextmanager
def _quiet_orbax():
  """While orbax restores a damaged checkpoint or fails a save, it logs
  tracebacks and tensorstore's abandoned coroutines report hundreds of
  'Exception ignored' ones; they go to the debug log instead, and the one
  useful error is raised as usual (its traceback under `--verbose`)."""
  old, quiet = sys.unraisablehook, _OrbaxErrors()
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]

  def hook(unraisable):
    log.debug("ignored: %s", unraisable.exc_value)

  sys.unraisablehook = hook
  for logger in loggers:
    logger.addFilter(quiet)
  try:
    yield
  finally:
    sys.unraisablehook = old
    for logger in loggers:
      logger.removeFilter(quiet)


def _integrity_of(step_dir: pathlib.Path, manager, step: int) -> dict | None:
  if not (step_dir / "integrity").exists():
    return None
  return manager.restore(step, args=ocp.args.Composite(
      integrity=_IntegrityRestore()))["integrity"]


@contextlib.contextmanager
def _reading(where: str, step_dir: pathlib.Path, what: str):
  """A failure to read `what` (of the checkpoint in `step_dir`) raised as
  `CheckpointCorrupted` saying what was found."""
  try:
    yield
  except CheckpointCorrupted:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorrupted(
        where, f"cannot be read: {what}: {_found(e, step_dir)}") from e


def _found(error: BaseException, step_dir: pathlib.Path) -> str:
  """What a failed read met, in one line: the innermost error (orbax wraps
  tensorstore's, which names the file and the array), paths relative to
  the step, tensorstore's spec left out; a JSON error names its file."""
  while error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, json.JSONDecodeError):
    return _broken_json(step_dir) or f"invalid JSON ({error})"
  text = re.sub(r"\s*\[tensorstore_spec=.*", "", str(error), flags=re.S)
  text = " ".join(text.replace(f"{step_dir}/", "").split())
  return f"{type(error).__name__}: {text[:400]}"


def _broken_json(step_dir: pathlib.Path) -> str | None:
  """'FILE is not valid JSON (why)' for the first of the step's JSON files
  (orbax's metadata, the data position, the fingerprints) that is not."""
  for path in sorted(step_dir.rglob("*")):
    if not path.is_file() or path.suffix in (".txt", ".ocdbt") or (
        "d" in path.relative_to(step_dir).parts[:-1]):  # ocdbt's data
      continue
    try:
      json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      return f"{path.relative_to(step_dir)} is not valid JSON ({e})"
  return None


def restore_state(workdir, step: int | None = None) -> dict:
  """The train state of a run at `step` (default: the latest), on this
  host's first device, whatever topology (devices, hosts) saved it."""
  directory = (pathlib.Path(workdir) / CHECKPOINTS).absolute()
  manager = ocp.CheckpointManager(directory, item_names=ITEMS)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}/{CHECKPOINTS} holds no checkpoint.")
  where, step_dir = f"the checkpoint {directory / str(step)}", directory / str(
      step)
  try:
    with _quiet_orbax():
      with _reading(where, step_dir, "the state's metadata"):
        target = _on_one_device(_saved_layout(directory, step))
      with _reading(where, step_dir, "the state"):
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
      with _reading(where, step_dir, "the fingerprints"):
        saved = _integrity_of(step_dir, manager, step)
    verify(state, saved, where)
  except CheckpointCorrupted as e:
    raise CheckpointCorrupted(
        where, f"{e.problem}; use another step (--step)") from e
  finally:
    manager.close()
  return state


def restore_params(workdir, step: int | None = None) -> dict:
  """The parameters of a training run at `step` (default: the latest)."""
  return restore_state(workdir, step)["params"]


def _saved_layout(directory: pathlib.Path, step: int) -> dict:
  """The saved state's tree of array metadata (shapes, dtypes). Asked of
  the handler itself: a `StandardCheckpointer` would turn a damaged file
  into `None` and its error into a warning."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return dict(handler.metadata(directory / str(step) / "state"))
  finally:
    handler.close()


def _on_one_device(tree):
  """`ShapeDtypeStruct`s of a metadata tree, on this host's first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def layout_differences(workdir, abstract_state: dict,
                       ignore: tuple[str, ...] = ()) -> list[str] | None:
  """How the train state's layout (paths, shapes, dtypes; top-level keys
  in `ignore` aside) differs from that of `workdir`'s checkpoints: [] if
  one of them matches, None if none can be read (damage, not a config
  question), else the differences from the latest readable one."""
  directory = pathlib.Path(workdir) / CHECKPOINTS
  if not directory.is_dir():
    return None
  steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()),
                 reverse=True)
  first = None
  want = _layout({k: v for k, v in abstract_state.items() if k not in ignore})
  for step in steps:
    try:
      with _quiet_orbax():
        saved = _saved_layout(directory.absolute(), step)
    except Exception:  # pylint: disable=broad-except
      continue  # damaged: the restore sets it aside
    have = _layout({k: v for k, v in saved.items() if k not in ignore})
    if have == want:
      return []
    if first is None:
      have_d, want_d = ({p: (s, d) for p, s, d in x} for x in (have, want))
      first = [f"{p}: checkpoint {have_d.get(p)}, config {want_d.get(p)}"
               for p in sorted(have_d.keys() | want_d.keys())
               if have_d.get(p) != want_d.get(p)]
  return first


class Checkpointer:
  """The checkpoints of `workdir` (in its `checkpoints/`)."""

  def __init__(self, workdir, *, every: int, keep: int,
               async_save: bool = True, integrity: bool = True):
    """`integrity=False` skips the fingerprints (only to measure their
    cost: experiments/bench_checkpoint.py)."""
    self.directory = (pathlib.Path(workdir) / CHECKPOINTS).absolute()
    self.integrity = integrity
    self._fingerprinter = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="fingerprints")
    self._quiet = contextlib.ExitStack()  # until close(): saves run async
    self._quiet.enter_context(_quiet_orbax())
    if jax.process_index() == 0:
      self.remove_unfinished()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep,
            enable_async_checkpointing=async_save),
        item_names=ITEMS)

  def remove_unfinished(self) -> None:
    """Deletes the temporary directories of saves that never completed
    (killed, or failed on a full disk); orbax would leave them."""
    if self.directory.is_dir():
      for p in self.directory.iterdir():
        if _TMP in p.name:
          shutil.rmtree(p, ignore_errors=True)

  def _failed(self, error: Exception) -> Exception:
    """A save's error as what it means: a full disk is one line (and its
    partial checkpoint is removed now), anything else stays as it is."""
    if not is_disk_full(error):
      return error
    with contextlib.suppress(Exception):
      self.remove_unfinished()
    return disk_full(self.directory)

  def check(self) -> None:
    """Raises the error of an asynchronous save that failed (a full disk as
    `OSError(ENOSPC)`), as soon as it has failed: orbax itself raises it
    only when the next save or the exit waits for it."""
    if not self.manager.is_saving_in_progress():
      self.wait()  # joins the finished save: its error, if any, now

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def set_aside(self, step: int, why: str) -> str:
    """Renames step's checkpoint to `WHY-STEP` (kept for inspection, no
    longer a step); returns what was done."""
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(self.directory / f"{why}-{step}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set_aside {step}")
    self.manager.reload()
    return f"moved checkpoints/{step} to checkpoints/{why}-{step}"

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves `state` (and its fingerprints) and the data position at
    `step`; a failure, now or of the previous asynchronous save, is raised
    (see `check`). The fingerprints are computed on a thread while orbax
    copies and writes the state, and are done when this returns (the
    caller may then overwrite the state's buffers)."""
    items = dict(state=ocp.args.StandardSave(state),
                 data=grain.checkpoint.CheckpointSave(data_iter))
    leaves = None
    if self.integrity and (force or self.manager.should_save(step)):
      leaves = self._fingerprinter.submit(state_fingerprints, state)
      items["integrity"] = _IntegritySave(
          {"algorithm": FINGERPRINT, "leaves": leaves})
    try:
      return self.manager.save(step, args=ocp.args.Composite(**items),
                               force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e
    finally:
      if leaves is not None:
        concurrent.futures.wait([leaves])

  def restore(self, step: int, abstract_state: dict, data_iter,
              rebuildable: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """`(state at step, stale keys)`: the state in the layout of
    `abstract_state` (ShapeDtypeStructs with shardings); `data_iter` is moved
    to its saved position in place. A top-level entry named in `rebuildable`
    whose saved layout differs from `abstract_state`'s (a checkpoint of
    another version, or saved with that entry off) is left out of the result
    and named in the stale keys, for the caller to rebuild. A checkpoint
    that cannot be read or fails its fingerprints is `CheckpointCorrupted`
    saying what was found (the file or the leaf)."""
    where = f"the checkpoint of step {step}"
    step_dir = self.directory / str(step)
    with _reading(where, step_dir, "the state's metadata"):
      saved = _saved_layout(self.directory, step)
    abstract, stale = dict(abstract_state), []
    for key in rebuildable:
      if _layout(saved.get(key)) == _layout(abstract.get(key)):
        continue
      stale.append(key)
      if key in saved:  # restore what is on disk, then drop it
        abstract[key] = _on_one_device(dict(saved[key]))
      else:
        abstract.pop(key, None)
    with _reading(where, step_dir, "the state"):
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    with _reading(where, step_dir, "the data position"):
      self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iter)))
    if self.integrity:
      with _reading(where, step_dir, "the fingerprints"):
        record = _integrity_of(step_dir, self.manager, step)
      verify(restored, record, where)
    return {k: v for k, v in restored.items() if k not in stale}, stale

  def wait(self) -> None:
    """Blocks until the pending save is written; raises its failure."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
      self._fingerprinter.shutdown()
      self._quiet.close()


def _layout(tree) -> list | None:
  """Paths, shapes and dtypes of a (metadata or abstract) tree."""
  if tree is None:
    return None
  leaves = jax.tree_util.tree_flatten_with_path(
      dict(tree) if hasattr(tree, "keys") else tree)[0]
  return sorted((_path(p), tuple(x.shape), str(x.dtype)) for p, x in leaves)


def _path(path) -> str:
  """A leaf's path as saved metadata spells it (a tuple's or named tuple's
  entry is named by its index or field, like a dict's key)."""
  names = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
           for k in path)
  return "/".join(str(n) for n in names)
