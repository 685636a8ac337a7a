"""Device mesh and shardings: data parallelism over `data`, FSDP over `fsdp`.

Parameters carry logical axis names where they are declared (`layers.py`,
`model.py`: "vocab", "embed", "heads", "mlp", "layers"). `RULES` maps them
to the mesh: each parameter is sharded over `fsdp` along its largest axis
that the rules allow there and that `fsdp` divides (replicated when none
does, or when `fsdp == 1`). AdamW's moments follow their parameter; other
state (step, counters, diagnostics) is replicated. Batches are split over
both axes, so every device sees its own slice of the global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
# Logical axis -> the mesh axis it may be sharded over (None: never).
# "groups" is the group axis of a learned scale `[groups, out]` (small:
# it is sharded, if at all, along its output axis).
RULES = {"vocab": "fsdp", "embed": "fsdp", "heads": "fsdp", "mlp": "fsdp",
         "layers": None, "groups": None}


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
  return jax.make_mesh((data, fsdp), BATCH_AXES,
                       axis_types=(AxisType.Auto,) * 2, devices=devices)


def param_spec(shape, axes: P, mesh: Mesh) -> P:
  """The mesh layout of one parameter of logical `axes`: its largest
  dimension (the first of equals) that `RULES` lets onto `fsdp` and that
  `fsdp` divides; replicated if none."""
  fsdp = mesh.shape["fsdp"]
  spec = [None] * len(shape)
  allowed = [d for d, name in enumerate(axes)
             if RULES.get(name) == "fsdp" and shape[d] % fsdp == 0]
  if fsdp > 1 and allowed:
    spec[max(allowed, key=lambda d: (shape[d], -d))] = "fsdp"
  return P(*spec)


def state_shardings(abstract_state, mesh: Mesh, param_axes: dict):
  """A `NamedSharding` per leaf of a (abstract) train state: parameters and
  any state leaf whose path ends in a parameter's path (AdamW's moments) by
  `param_spec`, everything else replicated."""
  specs = {}
  for path, axes in jax.tree_util.tree_flatten_with_path(param_axes)[0]:
    specs[tuple(path)] = axes

  def leaf(path, x):
    for n in range(len(path)):
      axes = specs.get(tuple(path[n:]))
      if axes is not None and len(axes) == len(x.shape):
        return NamedSharding(mesh, param_spec(x.shape, axes, mesh))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array from this process's rows of the batch (multi-host safe)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def replicated_batch(full: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array from a whole batch that every process holds (held-out
  batches): each device takes its rows of it."""
  return jax.make_array_from_callback(full.shape, batch_sharding(mesh),
                                      lambda index: full[index])
