"""Metrics to JSONL and TensorBoard, written by process 0 only."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter

from tequila_jax import checkpoint


def to_python(metrics: dict) -> dict:
  """Device scalars/arrays -> floats/lists (this blocks on the device)."""
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = float(v) if v.ndim == 0 else v.tolist()
  return out


class MetricWriter:

  def __init__(self, workdir, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / checkpoint.METRICS, "a", encoding="utf-8")
    if tensorboard:
      self._tb = SummaryWriter(str(workdir / checkpoint.TENSORBOARD))

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
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
