"""Test setup: 8 fake CPU devices, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
