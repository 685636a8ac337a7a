"""Checkpoint integrity by hand: the fingerprints
(`checkpoint.state_fingerprints`) on the host and on devices, the old and
the new algorithm, what they catch and what they cannot. The faults a user
meets (damaged checkpoints on disk) are in test_faults.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tequila_jax import checkpoint

M32 = 2**32 - 1


def _tree():
  return {"f": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
          "b": jnp.array([True, False, True]), "i": jnp.array(-5, jnp.int32),
          "h": jnp.arange(6, dtype=jnp.bfloat16)}


def test_fingerprints_are_fixed_numbers():
  """The same digits on every machine and thread count: v1's are those of
  the code that wrote the fmix32x2-v1 checkpoints (so those still verify),
  v2's those of today's `FINGERPRINT`."""
  assert checkpoint.FINGERPRINTS["fmix32x2-v1"](_tree()) == {
      "f": "627a51f5eee21f1e", "b": "edbe7fa7b2b16562",
      "i": "cebf8269b6fdc79d", "h": "a30ab13fe1aa186d"}
  assert checkpoint.FINGERPRINT == "rowcol-fmix32x2-v2"
  assert checkpoint.FINGERPRINTS[checkpoint.FINGERPRINT] is (
      checkpoint.state_fingerprints)
  assert checkpoint.state_fingerprints(_tree()) == {
      "f": "1da8927423c560b6", "b": "226eb3e8b2b16562",
      "i": "cebf8269b6fdc79d", "h": "4719bb92e1aa186d"}


def _fmix(h: int) -> int:
  h ^= h >> 16
  h = h * 0x85EBCA6B & M32
  h ^= h >> 13
  h = h * 0xC2B2AE35 & M32
  return h ^ h >> 16


def _by_hand(words: np.ndarray) -> str:
  """rowcol-fmix32x2-v2 in Python integers, from its definition."""
  rows = [sum(int(v) for v in row) & M32 for row in words]
  cols = [sum(int(v) for v in col) & M32 for col in words.T]
  lanes = [sum(_fmix(s ^ _fmix(i + seed & M32)) for i, s in enumerate(sums))
           & M32 for sums, seed in ((rows, 0x9E3779B9), (cols, 0x7F4A7C15))]
  return "".join(f"{lane:08x}" for lane in lanes)


def test_the_fingerprint_is_its_definition(monkeypatch):
  """Row and column sums of the words (rows: all axes but the last), each
  mixed with its index: here in Python integers, for a leaf summed in
  blocks of 4 rows (the last one short) and for 16-bit words widened."""
  monkeypatch.setattr(checkpoint, "_BLOCK", 4 * 50 * 4)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 10, 50)).astype(np.float32)
  h = rng.integers(0, 2**16, (5, 7), dtype=np.uint16)
  assert checkpoint.state_fingerprints({"x": x, "h": h}) == {
      "x": _by_hand(x.view(np.uint32).reshape(30, 50)),
      "h": _by_hand(h.astype(np.uint32))}


def _leaves():
  rng = np.random.default_rng(1)
  return {"scalar": np.float32(3.5),
          "vector": rng.standard_normal(7).astype(np.float32),
          "matrix": rng.standard_normal((16, 9)).astype(np.float32),
          "stack": rng.standard_normal((8, 4, 33)).astype(np.float32),
          "bool": rng.random((8, 6)) > .5,
          "bf16": jnp.asarray(rng.standard_normal((6, 8)), jnp.bfloat16),
          "int8": rng.integers(-100, 100, (3, 5)).astype(np.int8),
          "empty": np.zeros((0, 4), np.float32),
          "key": jax.random.key(3),
          "keys": jax.random.split(jax.random.key(1), 5)}


@pytest.mark.multidevice
def test_host_and_devices_give_the_same_fingerprints():
  """On the host (numpy, a leaf on one CPU device) and on devices (XLA,
  here sharded over 8): the same digits for every dtype and shape."""
  mesh = jax.make_mesh((8,), ("x",))

  def sharded(v):
    v = jnp.asarray(v)
    split = v.ndim and v.shape[0] % 8 == 0
    return jax.device_put(v, jax.NamedSharding(
        mesh, jax.P("x") if split else jax.P()))

  leaves = _leaves()
  on_devices = {k: sharded(v) for k, v in leaves.items()}
  assert not any(checkpoint._in_place(v)  # pylint: disable=protected-access
                 for v in on_devices.values())
  assert checkpoint.state_fingerprints(leaves) == (
      checkpoint.state_fingerprints(on_devices))


@pytest.mark.multidevice
def test_64_bit_leaves_agree_on_host_and_devices(x64):
  del x64
  x = np.random.default_rng(2).standard_normal((8, 3))
  on_devices = jax.device_put(x, jax.NamedSharding(
      jax.make_mesh((8,), ("x",)), jax.P("x")))
  assert checkpoint.state_fingerprints({"x": x}) == (
      checkpoint.state_fingerprints({"x": on_devices}))


@pytest.mark.parametrize("algorithm", ["rowcol-fmix32x2-v2", "fmix32x2-v1"])
def test_every_flipped_byte_is_caught(algorithm):
  """Each byte of each element, in turn: the fingerprint differs."""
  fingerprints = checkpoint.FINGERPRINTS[algorithm]
  x = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32)
  saved = fingerprints({"x": x})["x"]
  raw = x.view(np.uint8).reshape(-1)
  for i in range(raw.size):
    for flip in (0x01, 0x80, 0xFF):
      raw[i] ^= flip
      assert fingerprints({"x": x})["x"] != saved, (i, flip)
      raw[i] ^= flip
  assert fingerprints({"x": x})["x"] == saved


@pytest.mark.parametrize("change", [
    "sign bits of two elements, one set one cleared",
    "two elements of a row swapped", "two elements of a column swapped",
    "two rows swapped", "transposed", "a block zeroed"])
def test_changes_of_several_elements_are_caught(change):
  x = np.random.default_rng(4).standard_normal((6, 6)).astype(np.float32)
  x[0, 0], x[3, 2] = -abs(x[0, 0]), abs(x[3, 2])
  y = x.copy()
  if change.startswith("sign"):
    y[0, 0], y[3, 2] = -y[0, 0], -y[3, 2]
  elif change == "two elements of a row swapped":
    y[1, 1], y[1, 4] = x[1, 4], x[1, 1]
  elif change == "two elements of a column swapped":
    y[1, 1], y[4, 1] = x[4, 1], x[1, 1]
  elif change == "two rows swapped":
    y[[2, 5]] = x[[5, 2]]
  elif change == "transposed":
    y = np.ascontiguousarray(x.T)
  else:
    y[2:4, 1:5] = 0
  assert checkpoint.state_fingerprints({"x": x}) != (
      checkpoint.state_fingerprints({"x": y}))


def test_what_the_row_and_column_sums_cannot_see():
  """The documented blind spot: +d and -d at the four corners of a
  rectangle keep every row and column sum."""
  x = np.zeros((4, 4), np.uint32)
  y = x.copy()
  y[0, 0] = y[2, 3] = 5
  y[0, 3] = y[2, 0] = M32 - 4  # -5 mod 2^32
  assert checkpoint.state_fingerprints({"x": x}) == (
      checkpoint.state_fingerprints({"x": y}))
  assert checkpoint.FINGERPRINTS["fmix32x2-v1"]({"x": x}) != (
      checkpoint.FINGERPRINTS["fmix32x2-v1"]({"x": y}))


def test_verify_names_the_leaves_that_differ_and_reads_v1_records():
  tree = _tree()
  for algorithm, fingerprints in checkpoint.FINGERPRINTS.items():
    checkpoint.verify(tree, {"algorithm": algorithm,
                             "leaves": fingerprints(tree)}, "step 3")
  saved = {"algorithm": "fmix32x2-v1",
           "leaves": checkpoint.FINGERPRINTS["fmix32x2-v1"](tree)}
  changed = {**tree, "i": jnp.array(-4, jnp.int32)}
  with pytest.raises(checkpoint.CheckpointCorrupted,
                     match=r"^step 3 is corrupted: the fingerprint of 1 of 4 "
                           r"arrays differs from the saved one \(i\)"):
    checkpoint.verify(changed, saved, "step 3")
  with pytest.raises(checkpoint.CheckpointCorrupted,
                     match="unknown integrity algorithm 'md5'"):
    checkpoint.verify(tree, {"algorithm": "md5", "leaves": {}}, "step 3")
