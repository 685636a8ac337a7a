"""Metrics to JSONL and TensorBoard, written by process 0 only."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np

from tequila_jax import workdir as workdir_lib
from tequila_jax.io.atomic import atomic_path


def to_python(metrics: dict) -> dict:
  """Device scalars/arrays -> floats/lists (this blocks on the device)."""
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = float(v) if v.ndim == 0 else v.tolist()
  return out


class MetricWriter:
  """Appends to `WORKDIR/metrics.jsonl` (and TensorBoard). A run resumed at
  `resume_step` first drops what the interrupted run logged after it (and
  its held-out records at it, which the resumed run writes again), so that
  no step appears twice."""

  def __init__(self, workdir, *, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / workdir_lib.METRICS
    if resume_step is not None and path.exists():
      _truncate(path, resume_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:  # TensorBoard hides events at and after purge_step
      # Imported here: tensorboardX imports torch when installed (~2 s),
      # which no command but training needs.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(
          str(workdir / workdir_lib.TENSORBOARD),
          purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    for k, v in metrics.items():
      finite = not isinstance(v, float) or math.isfinite(v)
      record[f"{prefix}/{k}"] = v if finite else None  # JSON has no NaN
      if self._tb is not None and isinstance(v, float) and finite:
        self._tb.add_scalar(f"{prefix}/{k}", v, step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def read_jsonl(path) -> list[dict]:
  """The records of a metrics file (a line torn by a killed run is skipped)."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _truncate(path: pathlib.Path, step: int) -> None:
  keep = [r for r in read_jsonl(path) if r["step"] < step or (
      r["step"] == step and not any(k.startswith("eval") for k in r))]
  with atomic_path(path) as tmp:
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep),
                   encoding="utf-8")
