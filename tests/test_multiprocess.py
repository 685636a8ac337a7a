"""Training over 2 processes (JAX's multi-controller runtime on localhost,
4 fake CPU devices each) equals the single-process 8-device run; a 2-process
checkpoint resumes bit-exactly; the shard_map step agrees too."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tequila_jax import train
from tests.cli import ROOT
from tests.conftest import CORPORA
from tests.test_trainer import TINY, _losses, _params, _tiny
from tests.tolerances import assert_runs_close

STEPS = dict(steps=6, log_every=1, checkpoint_every=3, keep_checkpoints=5,
             eval_every=100, batch_size=16, eval_batch_size=16)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, **overrides):
  """docs/training.md's command on 2 processes of 4 CPU devices each."""
  port = _free_port()
  flags = {**STEPS, **overrides, "async_checkpoints": False,
           "diagnostics.enabled": False,  # one compiled step: CI's 2 cores
           "distributed": True, "coordinator_address": f"127.0.0.1:{port}",
           "num_processes": 2}
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tequila_jax.train", f"--config={TINY}",
       f"--workdir={workdir}", f"--config.data.cache_dir={CORPORA}",
       *(f"--config.{k if '.' in k else 'train.' + k}={v}"
         for k, v in flags.items()), f"--config.train.process_id={p}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
      cwd=ROOT) for p in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in outs]


@pytest.mark.multidevice
def test_two_processes_match_one_and_resume_exactly(tmp_path):
  config = _tiny(**STEPS)
  config.mesh.update(data=4, fsdp=2)
  config.diagnostics.enabled = False
  train.run(config, tmp_path / "single")

  logs = _launch(tmp_path / "two", **{"mesh.fsdp": 2})
  assert "process 1 of 2: 4 local devices of 8" in logs[1]
  a, b = _losses(tmp_path / "single"), _losses(tmp_path / "two")
  assert sorted(b) == list(range(1, 7))  # process 0 alone writes metrics
  np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=2e-5)
  two = _params(tmp_path / "two", 6)
  assert_runs_close(_params(tmp_path / "single", 6), two)  # tests/tolerances
  # Both processes' data positions are in the checkpoint.
  data_dir = tmp_path / "two" / "checkpoints" / "3" / "data"
  assert len(list(data_dir.glob("process_*"))) == 2

  # Preempted after step 3: both processes restore it and finish bit-exactly.
  shutil.copytree(tmp_path / "two", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  _launch(tmp_path / "resumed", **{"mesh.fsdp": 2})
  for x, y in zip(jax.tree.leaves(two),
                  jax.tree.leaves(_params(tmp_path / "resumed", 6))):
    np.testing.assert_array_equal(x, y)

  # The explicit data-parallel step (shard_map over the 8 devices of both).
  _launch(tmp_path / "shard_map", parallelism="shard_map")
  c = _losses(tmp_path / "shard_map")
  np.testing.assert_allclose([c[k] for k in a], list(a.values()), rtol=2e-5)
  assert_runs_close(two, _params(tmp_path / "shard_map", 6))
