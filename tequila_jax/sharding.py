"""Device mesh and shardings: data parallelism over `data`, FSDP over `fsdp`.

Parameters and optimizer state are sharded along their largest dimension that
the `fsdp` axis divides (replicated when `fsdp == 1`); batches are split over
both axes, so every device sees its own slice of the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A `(data, fsdp)` mesh; `data=-1` takes all devices that fsdp leaves."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the {n} devices.")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices; set "
                     "mesh.data=-1 to use them all.")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def param_spec(shape, fsdp: int) -> P:
  """Shards the largest dimension divisible by `fsdp`; scalars replicate."""
  if fsdp == 1 or not shape:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh):
  """A `NamedSharding` per leaf of a (abstract) train state."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array from this process's rows of the batch (multi-host safe)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
