"""The default path is pinned to its behaviour before the learned quantizers
and 8-bit activations (commit 5241f20): `lam_mode="fixed"` and `act_bits=0`
compute what they computed then. tests/data/golden_5241f20.npz holds that
commit's outputs and gradients of every static method in fp32 and bf16 and
one tiny train step; on the machine that wrote it they are bit-identical
(checked when it was made). The tolerances absorb another CPU's summation
order and nothing else: per entry, the bound of two evaluations of each
sum (`tests.tolerances.matmul_tolerances`, with the codes a weight at its
threshold may flip to), and for the train step the chain model of a whole
forward / backward (`tests.tolerances.chain_atol`)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax import config_lib, quant, train
from tequila_jax import model as model_lib
from tequila_jax.quant import QuantConfig
from tests.tolerances import (assert_within, chain_atol, code_margin,
                              llama_depth, llama_k, matmul_tolerances)

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
        tols = matmul_tolerances(cfg, x.astype(dt), w, g.astype(dt), dt)
        for name, got, tol in zip(("y", "dx", "dw"), (y, *pull(g.astype(dt))),
                                  tols):
          assert_within(np.asarray(got, np.float32), want[f"{key}/{name}"],
                        tol, key + name)
          checked += 1
  config = config_lib.tiny("tequila")
  config.train.update(micro_batches=2)
  tr = train.build_train(config, devices=jax.devices()[:1])
  batch = jnp.asarray(np.random.default_rng(1).integers(0, 258, (8, 65)))
  state = tr.init_state()
  # Weights within their statistics' rounding of the threshold may take
  # the other code on another processor: each moves the dead fraction by
  # one weight.
  near = total = 0
  for name, block in model_lib.PROJECTIONS.items():
    kernel = state["params"]["layers"][block][name]["kernel"]
    _, r = jax.vmap(lambda k: quant.threshold_stats(k, tr.model_cfg.quant))(
        kernel)
    near += int((np.abs(np.asarray(r, np.float64) - 1) <= code_margin(
        tr.model_cfg.quant, kernel.shape)).sum())
    total += kernel.size
  new, m = tr.step_fn(full_diagnostics=True)(state, batch)
  # Loss and gradient norm: a forward (and backward) in fp32 in the order of
  # this processor (tests/tolerances.py), and those flips.
  cfg = tr.model_cfg
  k = llama_k(cfg, batch.size)
  np.testing.assert_allclose(m["loss"], want["step/loss"], rtol=0, atol=(
      chain_atol(want["step/loss"], k, llama_depth(cfg.num_layers))))
  np.testing.assert_allclose(m["grad_norm"], want["step/grad_norm"], rtol=0,
                             atol=chain_atol(want["step/grad_norm"], k,
                                             llama_depth(cfg.num_layers, True)))
  np.testing.assert_allclose(m["dead_fraction/all"],
                             want["step/dead_fraction"], rtol=1e-6,
                             atol=near / total)
  np.testing.assert_allclose(
      new["params"]["layers"]["attn"]["q_proj"]["kernel"][0, :8, :8],
      want["step/q_proj"], rtol=1e-5, atol=1e-7)
  assert checked == 90
