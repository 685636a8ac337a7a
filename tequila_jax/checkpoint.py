"""Orbax checkpoints of the train state together with the grain iterator.

One `CheckpointManager` holds, per step, `state` (params, optimizer state,
step; restored straight into the sharded layout) and `data` (the grain
iterator position), so a resumed run continues the exact data stream.
Saves are asynchronous; orbax writes each step to a temporary directory and
renames it when complete, so an interrupted save never looks valid.
"""

from __future__ import annotations

import pathlib

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory, *, every: int, keep: int,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep,
            enable_async_checkpointing=async_save),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=force)

  def restore(self, step: int, abstract_state, data_iter):
    """The state at `step` in the layout of `abstract_state` (ShapeDtypeStructs
    with shardings); `data_iter` is moved to its saved position in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, shardings)
