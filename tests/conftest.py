"""Test setup: 8 fake CPU devices, set before jax is imported."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and for the commands
# its tests start (they inherit the environment): tiny runs compile the same
# programs in test after test and subprocess after subprocess. A fresh one per
# session unless JAX_COMPILATION_CACHE_DIR names one (to keep it across runs).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="tequila_jax_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"],
                  ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield


def pytest_collection_modifyitems(config, items):
  if jax.device_count() < 8:
    skip = pytest.mark.skip(reason="needs 8 devices (XLA_FLAGS)")
    for item in items:
      if "multidevice" in item.keywords:
        item.add_marker(skip)


# Shared tiny models and runs (built once per session, never modified: a
# test that breaks a run copies it first).
TINY = str(pathlib.Path(__file__).resolve().parent.parent / "configs" /
           "tiny.py")
TINY_RUN = dict(steps=12, checkpoint_every=5, log_every=1, eval_every=100,
                async_checkpoints=False)


def tiny_model_config(method: str = "tequila", **fields):
  """The tiny config's `ModelConfig` with `method` and `fields` replaced."""
  from tequila_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.to_model_config(
      config_lib.tiny(method).model).replace(**fields)


def tiny_run_config(corpora, **train_overrides):
  """The config of `tiny_run` (`TINY_RUN`, corpora cached in `corpora`),
  with `train_overrides`: what resumes or repeats it."""
  from tequila_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.tiny()
  config.data.cache_dir = str(corpora)
  config.train.update(**{**TINY_RUN, **train_overrides})
  return config


# One corpus cache for the session's tiny runs (`corpora`, and
# tests.test_trainer's `_tiny` configs): each corpus is prepared once.
CORPORA = pathlib.Path(tempfile.mkdtemp(prefix="tequila_jax_corpora_"))
atexit.register(shutil.rmtree, CORPORA, ignore_errors=True)


@pytest.fixture(scope="session")
def corpora():
  """A corpus cache shared by the session's tiny runs."""
  return CORPORA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpora):
  """A finished tiny tequila run (`TINY_RUN`: checkpoints 5, 10 and 12);
  read it, or copy it to change it."""
  from tequila_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("tiny_run") / "run"
  train.run(tiny_run_config(corpora), workdir, devices=jax.devices()[:1])
  return workdir
