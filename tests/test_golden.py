"""The default path is pinned to its behaviour before the learned quantizers
and 8-bit activations (commit 5241f20): `lam_mode="fixed"` and `act_bits=0`
compute what they computed then. tests/data/golden_5241f20.npz holds that
commit's outputs and gradients of every static method in fp32 and bf16 and
one tiny train step; on the machine that wrote it they are bit-identical
(checked when it was made), the tolerances only absorb another CPU's
summation order."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax import config_lib, quant, train
from tequila_jax.quant import QuantConfig

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden_5241f20.npz"


def test_static_methods_and_train_step_match_the_golden_outputs():
  want = np.load(GOLDEN)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 16)) * 0.05, jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  checked = 0
  for m in ("absmean", "twn", "tequila", "tequila_dynamic", "minima"):
    for gran in ("per_group", "per_channel", "per_tensor"):
      for dt in (jnp.float32, jnp.bfloat16):
        cfg = QuantConfig(m, gran, 16, lam=0.05, eps=0.01)
        y, pull = jax.vjp(lambda x, w: quant.quantized_matmul(x, w, cfg),  # pylint: disable=cell-var-from-loop
                          x.astype(dt), w)
        key = f"{m}-{gran}-{jnp.dtype(dt).name}"
        tol = 1e-6 if dt == jnp.float32 else 1e-2
        for name, got in zip(("y", "dx", "dw"), (y, *pull(g.astype(dt)))):
          np.testing.assert_allclose(np.asarray(got, np.float32),
                                     want[f"{key}/{name}"], rtol=tol,
                                     atol=tol * 1e-2, err_msg=key + name)
          checked += 1
  config = config_lib.tiny("tequila")
  config.train.update(micro_batches=2)
  tr = train.build_train(config, devices=jax.devices()[:1])
  batch = jnp.asarray(np.random.default_rng(1).integers(0, 258, (8, 65)))
  new, m = tr.step_fn(full_diagnostics=True)(tr.init_state(), batch)
  np.testing.assert_allclose(m["loss"], want["step/loss"], rtol=1e-6)
  np.testing.assert_allclose(m["grad_norm"], want["step/grad_norm"],
                             rtol=1e-5)
  np.testing.assert_allclose(m["dead_fraction/all"],
                             want["step/dead_fraction"], rtol=1e-6)
  np.testing.assert_allclose(
      new["params"]["layers"]["attn"]["q_proj"]["kernel"][0, :8, :8],
      want["step/q_proj"], rtol=1e-5, atol=1e-7)
  assert checked == 90
