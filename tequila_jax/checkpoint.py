"""A training workdir and the orbax checkpoints in it.

The layout, known only here: `WORKDIR/config.json` (the run's config),
`WORKDIR/metrics.jsonl` (+ `tensorboard/`), `WORKDIR/checkpoints/STEP/`,
`WORKDIR/lock` (held by the run that is using the workdir),
`WORKDIR/teacher.json` (a distilling run's teacher: source, content hash,
shapes; the teacher itself is never checkpointed).

One `CheckpointManager` holds, per step, `state` (params, optimizer state,
step; restored straight into the sharded layout) and `data` (the grain
iterator position), so a resumed run continues the exact data stream.
Saves are asynchronous; orbax writes each step to a temporary directory and
renames it when complete, so an interrupted save never looks valid.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LOCK = "lock"
TEACHER = "teacher.json"


class WorkdirInUse(RuntimeError):
  pass


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
  (pathlib.Path(workdir) / CONFIG).write_text(config.to_json(indent=2))


def write_teacher(workdir, record: dict) -> None:
  (pathlib.Path(workdir) / TEACHER).write_text(json.dumps(record, indent=2))


def read_teacher(workdir) -> dict | None:
  """The teacher the run in `workdir` distilled from, if it did."""
  path = pathlib.Path(workdir) / TEACHER
  return json.loads(path.read_text()) if path.exists() else None


def restore_state(workdir, step: int | None = None) -> dict:
  """The train state of a run at `step` (default: the latest), on this
  host's first device, whatever topology (devices, hosts) saved it."""
  directory = (pathlib.Path(workdir) / CHECKPOINTS).absolute()
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}/{CHECKPOINTS} holds no checkpoint.")
  target = _on_one_device(_saved_layout(directory, step))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))
  manager.close()
  return restored["state"]


def restore_params(workdir, step: int | None = None) -> dict:
  """The parameters of a training run at `step` (default: the latest)."""
  return restore_state(workdir, step)["params"]


def _saved_layout(directory: pathlib.Path, step: int) -> dict:
  """The saved state's tree of array metadata (shapes, dtypes)."""
  with ocp.StandardCheckpointer() as reader:
    return dict(reader.metadata(directory / str(step) / "state").item_metadata)


def _on_one_device(tree):
  """`ShapeDtypeStruct`s of a metadata tree, on this host's first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


class Checkpointer:
  """The checkpoints of `workdir` (in its `checkpoints/`)."""

  def __init__(self, workdir, *, every: int, keep: int,
               async_save: bool = True):
    self.directory = (pathlib.Path(workdir) / CHECKPOINTS).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep,
            enable_async_checkpointing=async_save),
        item_names=("state", "data"))

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
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=force)

  def restore(self, step: int, abstract_state: dict, data_iter,
              rebuildable: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """`(state at step, stale keys)`: the state in the layout of
    `abstract_state` (ShapeDtypeStructs with shardings); `data_iter` is moved
    to its saved position in place. A top-level entry named in `rebuildable`
    whose saved layout differs from `abstract_state`'s (a checkpoint of
    another version, or saved with that entry off) is left out of the result
    and named in the stale keys, for the caller to rebuild."""
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
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(data_iter)))["state"]
    return {k: v for k, v in restored.items() if k not in stale}, stale

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _layout(tree) -> list | None:
  """Paths, shapes and dtypes of a (metadata or abstract) tree."""
  if tree is None:
    return None
  leaves = jax.tree_util.tree_flatten_with_path(
      dict(tree) if hasattr(tree, "keys") else tree)[0]
  return [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype))
          for p, x in leaves]
