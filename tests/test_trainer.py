"""The trainer: smoke run of the real CLI, parallel == serial, exact resume."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tequila_jax import checkpoint, config_lib, losses, metrics, train
from tequila_jax import workdir as workdir_lib
from tests import cli
from tests.conftest import CORPORA
from tests.tolerances import assert_runs_close, chain_atol

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.py")


def _tiny(**overrides):
  """configs/tiny.py with `overrides` of its train fields, its corpus in the
  session's cache (`CORPORA`)."""
  config = config_lib.load_config_file(TINY)
  config.data.cache_dir = str(CORPORA)
  config.train.update(async_checkpoints=False, **overrides)
  return config


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in
          metrics.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
          if "train/loss" in r}


def _state(workdir, step):
  return checkpoint.restore_state(workdir, step)


def _params(workdir, step):
  return _state(workdir, step)["params"]


_env = cli.env


def test_cli_smoke_loss_falls(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "tequila_jax.train", f"--config={TINY}",
         f"--workdir={workdir}", f"--config.data.cache_dir={CORPORA}"]
  out = subprocess.run(cmd, capture_output=True, text=True, env=_env(),
                       cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout[out.stdout.index("{"):])
  assert summary["step"] == 30
  assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 1.5
  losses = _losses(workdir)
  assert losses[30] < losses[5] - 1.0
  assert (workdir / "checkpoints" / "30").exists()
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 30


PARALLEL_STEPS = dict(steps=6, log_every=1, checkpoint_every=6,
                      eval_every=100, batch_size=16, eval_batch_size=16)


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  """`PARALLEL_STEPS` on one device: the run every layout must match."""
  tmp = tmp_path_factory.mktemp("single_device")
  summary = train.run(_tiny(**PARALLEL_STEPS), tmp / "single",
                      devices=jax.devices()[:1])
  return tmp / "single", summary


@pytest.mark.multidevice
@pytest.mark.parametrize(
    "mesh, micro, parallelism",
    [((2, 4), 1, "gspmd"), ((1, 8), 2, "gspmd"), ((8, 1), 2, "shard_map")],
    ids=["data2_fsdp4", "fsdp8_accum2", "shard_map_data8_accum2"])
def test_parallel_matches_single_device(tmp_path, single_device_run, mesh,
                                        micro, parallelism):
  single, s1 = single_device_run
  par = _tiny(**PARALLEL_STEPS, micro_batches=micro,
              parallelism=parallelism)
  par.mesh.update(data=mesh[0], fsdp=mesh[1])
  s8 = train.run(par, tmp_path / "par")
  a, b = _losses(single), _losses(tmp_path / "par")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=2e-5)
  pa, pb = _params(single, 6), _params(tmp_path / "par", 6)
  assert_runs_close(pa, pb)  # isolated threshold flips: tests/tolerances.py
  assert abs(s1["eval_after"]["loss"] - s8["eval_after"]["loss"]) < 1e-4


@pytest.mark.parametrize("method", [
    pytest.param("tequila", marks=pytest.mark.slow), "sherry"])
def test_resume_is_exact(tmp_path, method):
  """A run split at step 10 equals the straight one, losses, diagnostics and
  state bit for bit; for Sherry also its logged Arenas ε (a function of the
  step). The tequila variant is slow: the sherry one runs the same resume
  path (data stream, trap counters, optimizer) in the default suite."""
  kw = dict(steps=20, log_every=1, checkpoint_every=5, eval_every=100)

  def config():  # trap windows of 4 steps: the split at 10 is mid-window
    c = _tiny(**kw)
    c.diagnostics.trap_steps = 4
    c.model.quant.method = method
    return c

  train.run(config(), tmp_path / "straight")
  first = train.run(config(), tmp_path / "split", stop_at=10)
  assert first["step"] == 10
  second = train.run(config(), tmp_path / "split")
  assert second["start_step"] == 10 and second["step"] == 20
  a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
  assert sorted(a) == sorted(b) == list(range(1, 21))
  # The data stream continues exactly, so every loss is bit-identical; so
  # are the diagnostics, whose trap counters travel in the checkpoint.
  assert [a[k] for k in a] == [b[k] for k in a]
  train_metrics = lambda w: [  # noqa: E731
      {k: v for k, v in r.items()
       if k.startswith("train/") and k != "train/tokens_per_s"}
      for r in metrics.read_jsonl(w / "metrics.jsonl") if "train/loss" in r]
  straight = train_metrics(tmp_path / "straight")
  split = train_metrics(tmp_path / "split")
  assert straight == split
  assert straight[-1]["train/escape_rate/all"] is not None
  assert straight[-1]["train/trapped_fraction/all"] > 0
  if method == "sherry":  # record k logs step k - 1's ε; 1 of 4 is pruned
    from tequila_jax import quant  # pylint: disable=g-import-not-at-top
    # jitted inside the step vs eagerly here: cos may differ by a few ulps
    # of its value, which is <= 1 (8 ulps of 1 in fp32 bound it).
    np.testing.assert_allclose(
        [r["train/arenas_eps"] for r in straight],
        [float(quant.arenas_eps(k, 20)) for k in range(20)],
        rtol=0, atol=8 * np.finfo(np.float32).eps)
    assert {r["train/dead_fraction/all"] for r in straight} == {0.25}
  else:
    assert all("train/arenas_eps" not in r for r in straight)
  for x, y in zip(jax.tree.leaves(_state(tmp_path / "straight", 20)),
                  jax.tree.leaves(_state(tmp_path / "split", 20))):
    np.testing.assert_array_equal(x, y)
  assert int(_state(tmp_path / "split", 20)["diag"]["count"]) == 20


def test_resume_rebuilds_diagnostics_of_another_layout(tmp_path, caplog):
  """A checkpoint saved without diagnostics, or with another trap-counter
  layout (another version or sample size), resumes; the counters restart."""
  def config(enabled, sample_size=4096):
    c = _tiny(steps=12, checkpoint_every=4, eval_every=100,
              log_every=1)
    c.diagnostics.update(enabled=enabled, sample_size=sample_size)
    return c

  workdir = tmp_path / "run"
  train.run(config(False), workdir, stop_at=4)
  train.run(config(True), workdir, stop_at=8)
  assert "trap counters do not fit" in caplog.text
  caplog.clear()
  done = train.run(config(True, sample_size=512), workdir)
  assert done["start_step"] == 8 and done["step"] == 12
  assert "trap counters do not fit" in caplog.text
  assert _state(workdir, 12)["diag"]["dead_run"]["q_proj"].shape == (512,)
  last = metrics.read_jsonl(workdir / "metrics.jsonl")[-2]
  assert last["step"] == 12 and last["train/trapped_sample_size"] == 512


def test_sigterm_saves_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "tequila_jax.train", f"--config={TINY}",
         f"--workdir={workdir}", f"--config.data.cache_dir={CORPORA}",
         "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.checkpoint_every=100000"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=_env(), cwd=ROOT, text=True)
  jsonl = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if jsonl.exists() and len(_losses(workdir)) >= 5:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM, resumable
  summary = json.loads(out[out.index("{"):])
  assert summary["stopped_by"] == "SIGTERM"
  stopped = summary["step"]
  assert (workdir / "checkpoints" / str(stopped)).exists()
  config = _tiny(steps=100000, log_every=1)
  again = train.run(config, workdir, stop_at=stopped + 3)
  assert again["start_step"] == stopped and again["step"] == stopped + 3


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = _tiny(steps=20, checkpoint_every=1, log_every=1)
  config.optim.update(lr=1e30, clip_norm=0.0, warmup_fraction=0.0)
  with pytest.raises(train.TrainingError, match="non-finite"):
    train.run(config, tmp_path / "run")
  steps = sorted(int(p.name) for p in (tmp_path / "run/checkpoints").iterdir()
                 if p.name.isdigit())
  for leaf in jax.tree.leaves(_params(tmp_path / "run", steps[-1])):
    assert np.isfinite(leaf).all()


def test_bad_configs_fail_before_compute(tmp_path):
  config = _tiny(batch_size=12)
  with pytest.raises(ValueError, match="does not split over the 8 devices"):
    train.run(config, tmp_path / "a")
  config = _tiny()
  config.data.sources = str(tmp_path / "nothing/*.txt")
  with pytest.raises(ValueError, match="matches no files"):
    train.run(config, tmp_path / "b")
  config = _tiny(batch_size=4, micro_batches=3)
  with pytest.raises(ValueError, match="not divisible by"):
    train.run(config, tmp_path / "c")
  config = _tiny(parallelism="shard_map")
  config.mesh.fsdp = 2
  with pytest.raises(ValueError, match="parallelism='gspmd' for FSDP"):
    train.run(config, tmp_path / "d")
  config = _tiny(parallelism="pmap")
  with pytest.raises(ValueError, match="choose one of"):
    train.run(config, tmp_path / "e")
  assert not any((tmp_path / k).exists() for k in "acde")
  out = subprocess.run(
      [sys.executable, "-m", "tequila_jax.train", f"--config={TINY}",
       "--config.train.stepz=3"], capture_output=True, text=True, env=_env(),
      cwd=ROOT)
  assert out.returncode != 0 and "stepz" in out.stderr


@pytest.mark.multidevice
def test_3b_dry_run_describes_sharded_state():
  config = config_lib.load_config_file(str(ROOT / "configs" / "llama3b.py"))
  config.mesh.update(data=1, fsdp=8)
  config.train.batch_size = 8
  d = train.describe(config)
  assert round(d["params"] / 1e9, 2) == 3.21
  # fp32 params + two AdamW moments + the trap counters (7 layer types x
  # 4096 sampled weights: an int32 run length and two bools) + scalars.
  extra = d["state_bytes"] - 12 * d["params"] - 7 * 4096 * (4 + 1 + 1)
  assert 0 <= extra < 64, extra
  assert abs(d["state_bytes_per_device"] / (d["state_bytes"] / 8) - 1) < 0.01


def test_chunked_cross_entropy_equals_full():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 50, (2, 12)))
  full = lambda h, w: losses.cross_entropy(h @ w, t)  # noqa: E731
  chunked = lambda h, w: losses.chunked_cross_entropy(h, w, t, 4)  # noqa: E731
  np.testing.assert_allclose(chunked(h, head), full(h, head), rtol=1e-6)
  # Two programs (chunks of 4 positions or one): sums of <= 50 terms in
  # their own orders through the log-softmax and its gradient's two dots
  # (tests/tolerances.py).
  for a, b in zip(jax.grad(chunked, (0, 1))(h, head),
                  jax.grad(full, (0, 1))(h, head)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=chain_atol(b, 50, 4))


def test_workdir_guards_and_metrics_after_a_crash(tmp_path):
  """A resumed run refuses a config that changes what it computes and a
  workdir another run holds, before writing anything; a stale lock does not
  block; metrics logged after the last checkpoint are not duplicated; a
  checkpoint with non-finite parameters is set aside for the one before."""
  workdir = tmp_path / "run"
  # 12 steps: test_resume_rebuilds_diagnostics_of_another_layout's compiled
  # step (the persistent compilation cache keeps it for the session).
  kw = dict(steps=12, checkpoint_every=2, log_every=1, eval_every=2)
  train.run(_tiny(**kw), workdir, stop_at=4)
  shutil.rmtree(workdir / "checkpoints" / "4")  # as if killed before saving 4
  files = lambda: {p.name: p.read_bytes() for p in workdir.iterdir()  # noqa: E731
                   if p.is_file() and p.name != "lock"}
  before = files()

  changed = _tiny(**kw)
  changed.model.quant.lam = 0.5
  with pytest.raises(ValueError, match=r"model.quant.lam: 0.001 -> 0.5"):
    train.run(changed, workdir)
  invalid = _tiny(**kw, micro_batches=3)
  with pytest.raises(ValueError, match="not divisible"):
    train.run(invalid, workdir)
  with workdir_lib.workdir_lock(workdir):
    with pytest.raises(workdir_lib.WorkdirInUse, match=r"in use by pid \d+"):
      train.run(_tiny(**kw), workdir)
  assert files() == before

  (workdir / "lock").write_text("pid 999999 on a-host-that-died\n")
  summary = train.run(_tiny(**{**kw, "log_every": 2}), workdir,
                      stop_at=6)  # log_every is a run-time field
  assert summary["start_step"] == 2 and summary["step"] == 6

  state = checkpoint.restore_state(workdir, 6)  # a bit flip made a NaN
  state["params"]["embed"]["embedding"] = (
      state["params"]["embed"]["embedding"].at[3, 5].set(np.nan))
  shutil.rmtree(workdir / "checkpoints" / "6" / "state")
  with ocp.StandardCheckpointer() as writer:
    writer.save(workdir / "checkpoints" / "6" / "state", state)
  summary = train.run(_tiny(**kw), workdir)
  assert summary["start_step"] == 4 and summary["step"] == 12
  assert (workdir / "checkpoints" / "damaged-6").is_dir()

  records = metrics.read_jsonl(workdir / "metrics.jsonl")
  for prefix in ("train/loss", "eval/loss"):
    steps = [r["step"] for r in records if prefix in r]
    assert steps == sorted(set(steps)), (prefix, steps)
  assert [r["step"] for r in records if "eval/loss" in r] == [
      0, 2, 4, 6, 8, 10, 12]
