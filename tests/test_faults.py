"""Faults a careful user can cause (issue 29), one test per fault: each is
injected as a user would cause it, and the test asserts the recovery or the
one-line error, and that nothing is left behind (temporaries, a half-written
file, a renamed good checkpoint, a lock or a config.json in a new workdir)."""

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from experiments import sweep
from tequila_jax import checkpoint, cli as cli_lib, data, evaluate
from tequila_jax import metrics
from tequila_jax import model as model_lib
from tequila_jax import train
from tequila_jax.io import locations, tokenizers, tqj
from tequila_jax.io.atomic import atomic_path, check_writable
from tests import cli
from tests.conftest import (TINY, TINY_RUN, tiny_model_config,
                            tiny_run_config)

ROOT = pathlib.Path(__file__).resolve().parent.parent
ONE = jax.devices()[:1]  # one device: the fastest tiny run
@pytest.fixture
def workdir(tiny_run, tmp_path):
  """A copy of the session's `tiny_run` to break."""
  path = tmp_path / "run"
  shutil.copytree(tiny_run, path)
  (path / "lock").unlink()
  return path


def _tree(path) -> dict:
  """Every file under `path` (name -> bytes) and every directory."""
  path = pathlib.Path(path)
  return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(path.rglob("*")) if p.name != "lock"}


def _steps(workdir) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _largest_state_file(workdir, step) -> pathlib.Path:
  files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
           if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
  assert out.returncode == 2, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines()
            if line.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  return errors[0]


def _train_cli(workdir, corpora, *args, **kw):
  return cli.run_cli(
      "train", f"--config={TINY}", f"--workdir={workdir}",
      f"--config.data.cache_dir={corpora}",
      *[f"--config.train.{k}={v}" for k, v in TINY_RUN.items()
        if k != "async_checkpoints"], *args,
      check=False, **kw)


@contextlib.contextmanager
def _tmpfs(path, options):
  """A tmpfs mounted at `path` (skips the test where mounting is not
  allowed, i.e. not root)."""
  path.mkdir(parents=True, exist_ok=True)
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                        str(path)], capture_output=True, text=True,
                       check=False)
  if out.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _export(tmp_path) -> pathlib.Path:
  cfg = tiny_model_config("tequila")
  path = tmp_path / "m.tqj"
  tqj.write_export(model_lib.Llama(cfg, rngs=nnx.Rngs(0)), path,
                   tokenizer=tokenizers.ByteTokenizer())
  return path


# 1 -------------------------------------------------------------------------

def _overwrite(path: pathlib.Path, where: float):
  """4 bytes of `path`, at fraction `where` of it, made 01 02 03 04."""
  raw = bytearray(path.read_bytes())
  at = min(int(len(raw) * where), len(raw) - 4)
  raw[at:at + 4] = b"\x01\x02\x03\x04"
  path.write_bytes(bytes(raw))


def test_corrupted_checkpoint_bytes_are_set_aside(workdir, corpora, caplog):
  """4 bytes overwritten inside the latest checkpoint's largest data file:
  the restore's integrity check sets it aside, naming the array, and
  resumes from the one before; reading it for an export is one clear
  error."""
  _overwrite(_largest_state_file(workdir, 12), 0.5)
  with pytest.raises(checkpoint.CheckpointCorrupted,
                     match=r"12 is corrupted: the fingerprint of 1 of \d+ "
                           r"arrays differs.*--step"):
    checkpoint.restore_state(workdir, 12)
  summary = train.run(tiny_run_config(corpora), workdir, devices=ONE)
  assert summary["start_step"] == 10 and summary["step"] == 12
  assert _steps(workdir) == ["10", "12", "5", "damaged-12"]
  assert re.search(
      r"the checkpoint of step 12 is corrupted: the fingerprint of 1 of \d+ "
      r"arrays differs from the saved one \((params|opt_state)/[\w/]+\): "
      r"moved checkpoints/12 to checkpoints/damaged-12", caplog.text), (
          caplog.text)


def _opened(workdir, corpora, layout_step):
  """`(Checkpointer, data iterator, layout of checkpoint layout_step on one
  device)` of a tiny run's workdir, opened as the trainer opens them."""
  config = tiny_run_config(corpora)
  corpus = data.prepare_for_config(config, locations.load_tokenizer,
                                   progress=False)
  it = data.train_iterator(corpus, seq_len=config.data.seq_len, batch_size=8,
                           seed=0)
  ckpt = checkpoint.Checkpointer(workdir, every=1, keep=10, async_save=False)
  layout = checkpoint._on_one_device(  # pylint: disable=protected-access
      checkpoint._saved_layout(ckpt.directory, layout_step))  # pylint: disable=protected-access
  return ckpt, it, layout


def _resume_from(workdir, corpora, step) -> dict:
  """The state the trainer resumes from `step` (`Checkpointer.restore`)."""
  ckpt, it, layout = _opened(workdir, corpora, 5)
  try:
    return ckpt.restore(step, layout, it)[0]
  finally:
    ckpt.close()


def test_a_checkpoint_with_v1_fingerprints_still_verifies(workdir, corpora):
  """A checkpoint as versions before fingerprints v2 wrote it (orbax's JSON
  handler, fmix32x2-v1): it restores, and a damaged array in it is still
  caught and named."""
  step_dir = workdir / "checkpoints" / "12"
  state = checkpoint.restore_state(workdir, 12)
  (step_dir / "integrity" / "metadata").write_text(json.dumps(
      {"algorithm": "fmix32x2-v1",
       "leaves": checkpoint.FINGERPRINTS["fmix32x2-v1"](state)}))
  meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
  meta["item_handlers"]["integrity"] = (
      "orbax.checkpoint._src.handlers.json_checkpoint_handler."
      "JsonCheckpointHandler")
  (step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
  for restored in (checkpoint.restore_state(workdir, 12),
                   _resume_from(workdir, corpora, 12)):
    jax.tree.map(np.testing.assert_array_equal, restored, state)
  _overwrite(_largest_state_file(workdir, 12), 0.5)
  with pytest.raises(checkpoint.CheckpointCorrupted,
                     match=r"12 is corrupted: the fingerprint of 1 of \d+ "
                           r"arrays differs from the saved one \("
                           r"(params|opt_state)/"):
    _resume_from(workdir, corpora, 12)


def _state_file(name):
  return lambda step_dir: step_dir / "state" / name


_DAMAGE = {  # file, where in it: what the error names
    "metadata": (_state_file("_METADATA"), 0.5,
                 r"the state's metadata: state/_METADATA is not valid JSON "
                 r"\(.* \(char \d+\)\)"),
    "b-tree": (lambda step_dir: next((step_dir / "state" / "d").iterdir()),
               0.5, r"the state's metadata: .*local file \"state/d/\w+\": "
               r"Error decoding b-tree node: CRC-32C checksum verification "
               r"failed"),
    "chunk header": (lambda step_dir: _largest_state_file(
        step_dir.parent.parent, step_dir.name), 0,
                     r"the state: ValueError: .*Error reading "
                     r"\"\w+\.[\w.]+/[\d.]+\" .*"
                     r"ZSTD_decompressStream\(\) failed"),
    "fingerprints": (lambda step_dir: step_dir / "integrity" / "metadata",
                     0.5, r"the fingerprints: integrity/metadata is not "
                     r"valid JSON"),
    "data position": (lambda step_dir: next((step_dir / "data").glob(
        "*.json")), 0, r"the data position: data/process_0-of-1\.json is "
                      r"not valid JSON"),
}


@pytest.mark.parametrize("damage", _DAMAGE)
def test_an_unreadable_checkpoint_says_what_was_found(workdir, corpora,
                                                      damage):
  """4 bytes overwritten in a file orbax reads before the arrays are
  compared: the error says which part could not be read and why, naming
  the file or the array (not a TypeError from a metadata read that came
  back empty), for the trainer and for an export or evaluation."""
  file, where, says = _DAMAGE[damage]
  _overwrite(file(workdir / "checkpoints" / "12"), where)
  with pytest.raises(checkpoint.CheckpointCorrupted) as e:
    _resume_from(workdir, corpora, 12)
  assert re.fullmatch(rf"the checkpoint of step 12 cannot be read: {says}.*",
                      str(e.value)), str(e.value)
  assert "tensorstore_spec" not in str(e.value)
  if damage != "data position":  # which an export does not read
    with pytest.raises(checkpoint.CheckpointCorrupted) as e:
      checkpoint.restore_state(workdir, 12)
    assert re.fullmatch(
        rf"the checkpoint \S+/checkpoints/12 cannot be read: {says}.*; use "
        r"another step \(--step\)\.", str(e.value)), str(e.value)


def test_the_trainer_says_what_it_found_in_a_checkpoint_it_sets_aside(
    workdir, corpora, caplog):
  file, where, says = _DAMAGE["metadata"]
  _overwrite(file(workdir / "checkpoints" / "12"), where)
  summary = train.run(tiny_run_config(corpora), workdir, devices=ONE)
  assert summary["start_step"] == 10
  assert re.search(rf"the checkpoint of step 12 cannot be read: {says}: "
                   r"moved checkpoints/12 to checkpoints/damaged-12",
                   caplog.text), caplog.text


def test_fingerprints_cover_every_leaf_of_the_state(tiny_run):
  """Params, optimizer state and diagnostics, whatever leaves there are:
  one changed bit in any leaf fails the check."""
  state = checkpoint.restore_state(tiny_run, 12)
  saved = {"algorithm": checkpoint.FINGERPRINT,
           "leaves": checkpoint.state_fingerprints(state)}
  checkpoint.verify(state, saved, "step 12")
  leaves, treedef = jax.tree.flatten(state)
  assert {"params", "opt_state", "diag"} <= set(state)
  flipped = []
  for leaf in leaves:  # one bit of each leaf
    bits = np.asarray(leaf).copy()
    bits.reshape(-1).view(np.uint8)[-1] ^= 1
    flipped.append(bits)
  with pytest.raises(checkpoint.CheckpointCorrupted,
                     match=f"the fingerprints of {len(leaves)} of "
                           f"{len(leaves)} arrays differ"):
    checkpoint.verify(jax.tree.unflatten(treedef, flipped), saved, "step 12")


# 2 -------------------------------------------------------------------------

def _rewrite(workdir, corpora, step, change):
  """Re-saves checkpoint `step` with `change(state)` (valid integrity: the
  fault is in the values, as if training had produced it)."""
  ckpt, it, saved = _opened(workdir, corpora, step)
  state, _ = ckpt.restore(step, saved, it)
  shutil.rmtree(ckpt.directory / str(step))
  ckpt.manager.reload()
  ckpt.save(step, change(state), it, force=True)
  ckpt.close()


def test_nan_in_the_optimizer_state_is_set_aside(workdir, corpora):
  """One NaN in AdamW's second moment at the latest checkpoint: the restore
  finds it and resumes from the checkpoint before."""

  def poison(state):
    nu = state["opt_state"][1][0]["nu"]
    leaf = np.asarray(nu["final_norm"]["scale"]).copy()
    leaf[3] = np.nan
    nu["final_norm"]["scale"] = jnp.asarray(leaf)
    return state

  _rewrite(workdir, corpora, 12, poison)
  summary = train.run(tiny_run_config(corpora), workdir, devices=ONE)
  assert summary["start_step"] == 10 and np.isfinite(summary["loss"])
  assert "damaged-12" in _steps(workdir)


def test_nonfinite_right_after_a_resume_does_not_call_it_good(workdir, corpora):
  config = tiny_run_config(corpora, steps=14, allow_config_change=True)
  config.optim.lr = 1e30
  with pytest.raises(train.TrainingError) as e:
    train.run(config, workdir, devices=ONE)
  message = str(e.value)
  assert "after resuming from the checkpoint of step 12, which may hold the " \
         "fault" in message and "restore_step=10" in message
  assert "good" not in message


# 3 -------------------------------------------------------------------------

def test_a_shape_change_is_refused_before_anything_is_written(workdir, corpora,
                                                              tmp_path):
  before = _tree(workdir)
  config = tiny_run_config(corpora, allow_config_change=True)
  config.model.update(hidden_size=256, head_dim=64)
  with pytest.raises(ValueError, match=r"another shape .*embedding.*"
                     r"checkpoint \(\(512, 128\).*config \(\(512, 256\)"):
    train.run(config, workdir, devices=ONE)
  assert _tree(workdir) == before  # nothing renamed, config.json unchanged
  assert train.run(tiny_run_config(corpora), workdir, devices=ONE)["start_step"] == 12
  for bad in ({"model.quant.group_size": 48}, {"train.batch_size": 0}):
    config = tiny_run_config(corpora)
    config.update_from_flattened_dict(bad)
    with pytest.raises(ValueError):
      train.run(config, tmp_path / "new", devices=ONE)
    assert not (tmp_path / "new").exists()  # no config.json, no lock


# 4 -------------------------------------------------------------------------

def test_tqj_header_edits_are_refused(tmp_path):
  path = _export(tmp_path)
  good = path.read_bytes()
  header_len = int.from_bytes(good[:8], "little")

  def edited(name, old, new):
    assert len(old) == len(new)
    header = good[8:8 + header_len]
    assert header.count(old) >= 1, old
    out = tmp_path / name
    out.write_bytes(good[:8] + header.replace(old, new, 1)
                    + good[8 + header_len:])
    return out

  for name, old, new in [("eps.tqj", b'rms_eps\\": 1e-05', b'rms_eps\\": 9e-01'),
                         ("theta.tqj", b'rope_theta\\": 5', b'rope_theta\\": 9'),
                         ("lam.tqj", b'lam\\": 0.001', b'lam\\": 0.901')]:
    with pytest.raises(tqj.ExportError, match="header .*does not match"):
      tqj.read_export(edited(name, old, new))
  renamed = edited("renamed.tqj", b'"checksums"', b'"checksumz"')
  with pytest.raises(tqj.ExportError, match=r"lacks its \['checksums'\]"):
    tqj.read_export(renamed)
  with safe_open(str(path), framework="numpy") as f:
    meta = f.metadata()
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  no_header_sum = {k: v for k, v in meta.items() if k != tqj.HEADER_CHECKSUM}
  save_file(tensors, str(tmp_path / "v4.tqj"), metadata=no_header_sum)
  with pytest.raises(tqj.ExportError, match="lacks its .'header_checksum'"):
    tqj.read_export(tmp_path / "v4.tqj")
  v3 = {**no_header_sum, "version": "3", "model": meta["model"][:-1]}
  save_file(tensors, str(tmp_path / "v3.tqj"), metadata=v3)
  with pytest.raises(tqj.ExportError, match=r"v3.tqj has a broken header"):
    tqj.read_export(tmp_path / "v3.tqj")
  assert tqj.read_export(path).cfg.arch.rms_eps == 1e-5


# 5, 15 ---------------------------------------------------------------------

@pytest.mark.parametrize("line, problem", [
    ('{"context": "ROMEO.", "choices": [" yes", " no"], "label": 5}',
     r"label 5 is not an integer in \[0, 2\)"),
    ('{"context": "ROMEO.", "choices": [" yes", " no"], "label": "0"}',
     "label '0' is not an integer"),
    ('{"context": "ROMEO.", "choices": [], "label": 0}',
     "choices is not a list of at least two"),
    ('{"context": "", "choices": ["a", "b"], "label": 0}',
     "context is not a non-empty string"),
    ('["context", "choices"]', "a JSON list, not an object"),
    ('{"context": "ROMEO.", "choices": ["a", "b"],', "is not JSON"),
])
def test_evaluate_refuses_invalid_task_lines(tmp_path, line, problem):
  path = tmp_path / "task.jsonl"
  good = '{"context": "A", "choices": [" b", " c"], "label": 1}'
  path.write_text(f"{good}\n{line}\n")
  with pytest.raises(ValueError, match=f"task.jsonl:2.*{problem}"):
    evaluate.read_tasks(path)


def test_evaluate_cli_names_file_and_line(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  line = _one_line_error(cli.run_cli("evaluate", "--checkpoint", "nowhere",
                                     "--tasks", empty, check=False))
  assert "empty.jsonl holds no task" in line
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"context": "x", "choices": ["a", "b"], "label": 0}\n\n'
                 "{oops\n")
  line = _one_line_error(cli.run_cli("evaluate", "--checkpoint", "nowhere",
                                     "--tasks", bad, check=False))
  assert "bad.jsonl:3 is not JSON" in line and '"label": int' in line


# 6 -------------------------------------------------------------------------

class _Stopped(Exception):
  pass


def test_sweep_point_stopped_during_evaluation_records_real_figures(
    tmp_path, corpora):
  """A point stopped after its last checkpoint, in its evaluation, has no
  summary; the rerun evaluates it from its checkpoint and records the
  logged train loss and the wall time of both tries."""
  # tiny_run's steps: its compiled step (cached in the session) serves.
  config = lambda: tiny_run_config(corpora, checkpoint_every=3)  # noqa: E731
  point = tmp_path / "point"

  def stop(*_):
    raise _Stopped()

  start = time.time()
  with pytest.raises(_Stopped):
    sweep.run_point(config, {}, point, evaluate_fn=stop, max_eval_windows=2)
  first = time.time() - start
  assert not (point / "summary.json").exists()
  result = sweep.run_point(config, {}, point, max_eval_windows=2)
  logged = [r["train/loss"] for r in metrics.read_jsonl(point / "metrics.jsonl")
            if r["step"] == 12 and "train/loss" in r]
  assert result["train_loss"] == logged[-1] and np.isfinite(logged[-1])
  assert result["wall_s"] > first * 0.9
  assert json.loads((point / "summary.json").read_text())["steps"] == 12


# 7 -------------------------------------------------------------------------

@pytest.mark.parametrize("flag, says", [
    ("--config.train.stepz=3", "no config field 'stepz' Did you mean"),
    ("--config.train.steps=abc", "invalid literal for int()"),
    ("--no_such_flag", "Unknown command line flag 'no_such_flag'"),
])
def test_flag_errors_are_one_line(tmp_path, flag, says):
  out = cli.run_cli("train", f"--config={TINY}", f"--workdir={tmp_path}/w",
                    flag, check=False)
  line = _one_line_error(out)
  assert says in line and "fix the flag" in line
  assert len(out.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "w").exists()


# 8 -------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint_save(tmp_path, corpora):
  """A 10 MB disk fills at the second checkpoint (asynchronous): one line
  naming the full disk, soon after the save failed (not at the next save);
  no temporary directory is left."""
  with _tmpfs(tmp_path / "disk", "size=10m") as disk:
    out = _train_cli(disk / "run", corpora, "--config.train.steps=30",
                     "--config.train.checkpoint_every=5",
                     "--config.train.keep_checkpoints=10",
                     "--config.train.async_checkpoints=True")
    line = _one_line_error(out)
    assert "disk full writing" in line and "free space" in line
    assert len(out.stderr.splitlines()) < 10, out.stderr[-3000:]
    left = [p.name for p in (disk / "run/checkpoints").iterdir()]
    assert left and all(name.isdigit() for name in left), left
    steps = [json.loads(r)["step"] for r in
             (disk / "run/metrics.jsonl").read_text().splitlines()]
    failed = max(map(int, left)) + 5
    assert max(steps) < failed + 5, (failed, steps)  # not at the next save
    # A temporary left by a killed save is removed on the next start.
    stale = disk / "run/checkpoints/8.orbax-checkpoint-tmp-123"
    stale.mkdir()
    checkpoint.Checkpointer(disk / "run", every=1, keep=1).close()
    assert not stale.exists()

_ABANDONED_FUTURE = """
import asyncio, errno, gc
from tequila_jax import cli
def main(argv):
  loop = asyncio.new_event_loop()
  future = loop.create_future()
  future.set_exception(ValueError("RESOURCE_EXHAUSTED: No space left"))
  loop.close()
  raise OSError(errno.ENOSPC, "No space left on device", "ckpt")
cli.run(main)
"""


def test_a_save_s_abandoned_futures_do_not_bury_the_one_line():
  """asyncio reports each future a failed save abandoned ('Future exception
  was never retrieved') when it is collected, after the error is printed."""
  out = subprocess.run([sys.executable, "-c", _ABANDONED_FUTURE],
                       capture_output=True, text=True, check=False)
  assert "disk full writing ckpt" in _one_line_error(out)
  assert out.stderr.count("\n") == 1, out.stderr


_LATE_FAILURES = """
import errno, threading, time
from tequila_jax import cli
class Abandoned:  # a coroutine the failed save left: raises when collected
  def __del__(self):
    raise RuntimeError("abandoned write")
def main(argv):
  def save():  # the background save, failing after the error is printed
    time.sleep(0.5)
    raise OSError(errno.ENOSPC, "No space left on device")
  threading.Thread(target=save).start()
  main.left = Abandoned()
  raise OSError(errno.ENOSPC, "No space left on device", "ckpt")
cli.run(main)
"""


def test_a_save_s_late_failures_do_not_bury_the_one_line():
  """A background save's thread that fails after the error is printed, and
  an object that raises when collected at exit, stay off stderr."""
  out = subprocess.run([sys.executable, "-c", _LATE_FAILURES],
                       capture_output=True, text=True, check=False)
  assert "disk full writing ckpt" in _one_line_error(out)
  assert out.stderr.count("\n") == 1, out.stderr


def test_disk_full_during_an_export(tmp_path):
  path = _export(tmp_path)
  export = tqj.read_export(path)
  with _tmpfs(tmp_path / "disk", "size=64k") as disk:
    with pytest.raises(OSError) as e:
      tqj.save_export(export, disk / "m.tqj")
    assert cli_lib.message(e.value).startswith(
        f"disk full writing {disk / 'm.tqj'}: free space")
    assert not list(disk.iterdir())


# 9 -------------------------------------------------------------------------

def test_export_checks_every_destination_before_writing(tiny_run, tmp_path):
  existing = tmp_path / "hf"
  existing.mkdir()
  out = cli.run_cli("export", "--checkpoint", tiny_run, "--out",
                    tmp_path / "x.tqj", "--hf_out", existing, check=False)
  assert f"{existing} exists" in _one_line_error(out)
  assert not (tmp_path / "x.tqj").exists() and not list(existing.iterdir())
  with _tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
    with pytest.raises(PermissionError, match=rf"cannot write {ro}/x.tqj: "
                       f"{ro} is not writable; choose another destination"):
      check_writable(ro / "x.tqj")
    out = cli.run_cli("export", "--checkpoint", tiny_run, "--out",
                      ro / "x.tqj", check=False)
    assert "is not writable; choose another" in _one_line_error(out)


# 10 ------------------------------------------------------------------------

def test_ctrl_c_during_startup_exits_130(tmp_path, corpora):
  """SIGINT while the step compiles: a clean exit 130, no crash, nothing
  saved."""
  for attempt in range(2):
    workdir = tmp_path / f"run{attempt}"
    err = tmp_path / f"err{attempt}"
    with open(err, "w") as f:
      proc = subprocess.Popen(
          [sys.executable, "-m", "tequila_jax.train", f"--config={TINY}",
           f"--workdir={workdir}", f"--config.data.cache_dir={corpora}"],
          stdout=subprocess.PIPE, stderr=f, env=cli.env(), cwd=ROOT, text=True)
      deadline = time.time() + 300
      while "model: " not in err.read_text() and time.time() < deadline:
        time.sleep(0.05)
      proc.send_signal(signal.SIGINT)
      out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, err.read_text()[-3000:]
    assert json.loads(out[out.index("{"):])["stopped_by"] == "SIGINT"
    assert "Traceback" not in err.read_text()
    assert not [p for p in (workdir / "checkpoints").iterdir()]


# 11 ------------------------------------------------------------------------

def test_negative_lr_and_too_long_sequences_are_refused(tmp_path, corpora):
  config = tiny_run_config(corpora)
  config.optim.lr = -1e-3
  with pytest.raises(ValueError, match="optim.lr=-0.001 is negative.*use a "
                     "positive"):
    train.run(config, tmp_path / "a", devices=ONE)
  config = tiny_run_config(corpora)
  config.data.seq_len = 512
  with pytest.raises(ValueError, match="data.seq_len=512 exceeds "
                     "model.max_seq_len=256.*lower data.seq_len"):
    train.run(config, tmp_path / "b", devices=ONE)
  assert not list(tmp_path.iterdir())


# 12 ------------------------------------------------------------------------

def test_resume_on_an_edited_corpus_is_refused(tmp_path, corpora):
  source = tmp_path / "text.txt"
  source.write_text("To be, or not to be, that is the question. " * 400)
  # tiny_run's steps: its compiled step (cached in the session) serves.
  config = lambda **kw: tiny_run_config(corpora, checkpoint_every=2, **kw)  # noqa: E731

  def with_source(c):
    c.data.sources = str(source)
    c.data.eval_fraction = 0.1
    c.data.split = "tail"
    return c

  workdir = tmp_path / "run"
  train.run(with_source(config()), workdir, devices=ONE, stop_at=2)
  before = _tree(workdir)
  time.sleep(0.01)
  source.write_text(source.read_text() + "Whether 'tis nobler in the mind.")
  with pytest.raises(ValueError, match=f"trained on another corpus: {source} "
                     "changed.*allow_config_change=True"):
    train.run(with_source(config()), workdir, devices=ONE)
  assert _tree(workdir) == before
  summary = train.run(with_source(config(allow_config_change=True)), workdir,
                      devices=ONE, stop_at=4)
  assert summary["start_step"] == 2
  # The new corpus is the run's now: resuming on it needs no override.
  assert train.run(with_source(config()), workdir, devices=ONE,
                   stop_at=6)["start_step"] == 4


# 13 ------------------------------------------------------------------------

def test_a_damaged_checkpoint_logs_one_line(workdir, corpora):
  target = _largest_state_file(workdir, 12)
  target.write_bytes(target.read_bytes()[:1000])  # truncated
  out = _train_cli(workdir, corpora)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Exception ignored" not in out.stderr
  assert "Traceback" not in out.stderr
  assert len(out.stderr.splitlines()) < 12, out.stderr[-3000:]
  damaged = [line for line in out.stderr.splitlines()
             if "checkpoint of step 12 cannot be read" in line]
  assert len(damaged) == 1 and "damaged-12" in damaged[0]


# 14 ------------------------------------------------------------------------

def test_outputs_get_the_umask_permissions(tmp_path):
  old = os.umask(0o027)
  try:
    path = _export(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o640
    with atomic_path(tmp_path / "corpora", directory=True) as tmp:
      (tmp / "x").write_text("x")
    assert (tmp_path / "corpora").stat().st_mode & 0o777 == 0o750
    path.chmod(0o644)  # a replaced file keeps its mode, as open() would
    _export(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o644
  finally:
    os.umask(old)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
