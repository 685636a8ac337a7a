"""Deadzone diagnostics on hand-built weights and histories with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tequila_jax import diagnostics, trainer
from tequila_jax.quant import QuantConfig

QCFG = QuantConfig("tequila", group_size=4)
DCFG = diagnostics.DiagnosticsConfig(history_k=4, sample_size=16)


def _params(kernel):
  """A params tree whose seven ternary kernels are all `kernel[None]`."""
  k = {"kernel": jnp.asarray(kernel, jnp.float32)[None]}
  return {"layers": {"attn": {n: k for n in ("q_proj", "k_proj", "v_proj",
                                              "o_proj")},
                     "mlp": {n: k for n in ("gate_proj", "up_proj",
                                            "down_proj")}}}


# Each column of 4 has mean|W| = 3.125 and delta = 1.5625 (the entry 0.5 is
# dead: exactly 1/4), or mean 2, delta 1 with 1.0 on the boundary.
KERNEL = np.array([[4.0, 2.0], [-4.0, -1.05], [4.0, 4.0], [0.5, 0.95]])


def test_dead_boundary_and_flip_fractions():
  m, ratios, _ = diagnostics.step_metrics(_params(KERNEL), _params(KERNEL),
                                          QCFG)
  # column 1: mean|W| = 2, delta = 1: 0.95 dead, 1.05 and 0.95 in the band.
  np.testing.assert_allclose(m["dead_fraction/q_proj"], 2 / 8)
  np.testing.assert_allclose(m["dead_fraction/all"], 2 / 8)
  np.testing.assert_allclose(m["boundary_fraction/up_proj"], 2 / 8)
  assert float(m["flip_rate/all"]) == 0
  np.testing.assert_allclose(ratios["q_proj"][0, :, 1], [2.0, 1.05, 4.0, 0.95],
                             rtol=1e-6)
  moved = KERNEL.copy()
  moved[3, 0] = 2.0    # 0 -> +1 (delta also moves: mean 3.5, delta 1.75)
  moved[1, 1] = 0.5    # -1 -> 0 (mean 1.8625, delta .93; 0.95 becomes +1)
  m, _, _ = diagnostics.step_metrics(_params(KERNEL), _params(moved), QCFG)
  np.testing.assert_allclose(m["flip_rate/all"], 3 / 8)


def test_trapped_mask_by_hand():
  #            oscillates  at zero  crossed  rising  inside, dips toward 0
  history = np.array([
      [0.95, 0.0, 0.95, 0.5, 0.5],
      [0.85, 0.0, 1.05, 0.7, 0.3],
      [0.95, 0.0, 0.92, 0.9, 0.4],
      [0.90, 0.0, 0.91, 0.95, 0.2]], np.float32)
  got = diagnostics.trapped_mask(jnp.asarray(history), jnp.asarray(4))
  np.testing.assert_array_equal(got, [True, False, False, False, False])
  # Fewer than K recorded steps: nothing is called trapped yet.
  assert not diagnostics.trapped_mask(jnp.asarray(history), jnp.asarray(3)).any()


def test_history_ring_buffer_order():
  state = {"history": {"q_proj": jnp.zeros((4, 3))}, "count": jnp.asarray(0)}
  cfg = diagnostics.DiagnosticsConfig(history_k=4, sample_size=3)
  idx = diagnostics.sample_indices({"q_proj": np.zeros((1, 2, 2))}, cfg)
  # An oscillating weight recorded over 6 steps: the window holds the last 4.
  values = [0.5, 0.6, 0.95, 0.85, 0.95, 0.9]
  for v in values:
    ratios = {"q_proj": jnp.full((1, 2, 2), v)}
    state = diagnostics.update_history(state, ratios, cfg)
  assert int(state["count"]) == 6 and len(idx["q_proj"]) == 3
  assert diagnostics.trapped_mask(state["history"]["q_proj"], state["count"]).all()
  ratios = {"q_proj": jnp.full((1, 2, 2), 1.2)}  # escapes the deadzone
  state = diagnostics.update_history(state, ratios, cfg)
  assert not diagnostics.trapped_mask(state["history"]["q_proj"],
                                      state["count"]).any()


def test_gsnr_by_hand():
  codes = {n: jnp.asarray([[[0, 1], [1, 0]]]) for n in diagnostics.LAYER_TYPES}
  ratios = {n: jnp.ones((1, 2, 2)) for n in diagnostics.LAYER_TYPES}
  mean = _params([[1.0, 2.0], [3.0, 4.0]])
  var = _params([[1.0, 2.0], [3.0, 8.0]])
  state = {"history": {n: jnp.zeros((4, 16)) for n in diagnostics.LAYER_TYPES},
           "count": jnp.asarray(0)}
  m = diagnostics.full_metrics(state, ratios, DCFG, codes, mean, var)
  # dead: (1, 1) and (4, 8): snr 1 and 2; active: (4, 2) and (9, 3): 2 and 3.
  np.testing.assert_allclose(m["gsnr_dead/q_proj"], 1.5)
  np.testing.assert_allclose(m["gsnr_active/all"], 2.5)
  np.testing.assert_allclose(m["gsnr_pooled_dead/v_proj"], 17 / 9)
  np.testing.assert_allclose(m["gsnr_pooled_active/all"], 13 / 5)
  assert m["ratio_hist/q_proj"].sum() == 4


def test_train_step_gsnr_equals_direct_computation(tmp_path):
  """Welford accumulation in train_step vs per-micro-batch gradients."""
  from tests.test_trainer import _tiny  # pylint: disable=g-import-not-at-top
  config = _tiny(tmp_path, micro_batches=4, batch_size=8)
  setup = trainer.prepare_setup(config, devices=jax.devices()[:1],
                                progress=False)
  graphdef, state, _ = trainer.init_state(setup)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 258, (8, 65)))
  _, m = trainer.train_step(
      state, batch, graphdef=graphdef, tx=setup.tx,
      lr_schedule=setup.lr_schedule, micro_batches=4,
      qcfg=setup.model_cfg.quant, diag=setup.diag, full_diagnostics=True)
  micro = batch.reshape(-1, 4, 65).swapaxes(0, 1)
  grads = [jax.grad(trainer.loss_fn)(state["params"], graphdef, mb)
           for mb in micro]
  g = np.stack([np.asarray(gr["layers"]["attn"]["q_proj"]["kernel"])
                for gr in grads])
  from tequila_jax import quant  # pylint: disable=g-import-not-at-top
  w = state["params"]["layers"]["attn"]["q_proj"]["kernel"]
  dead = np.asarray(jax.vmap(lambda x: quant.ternarize(x, setup.model_cfg.quant
                                                      )[0])(w)) == 0
  sig, var = g.mean(0) ** 2, g.var(0, ddof=1)
  np.testing.assert_allclose(m["gsnr_pooled_dead/q_proj"],
                             sig[dead].sum() / var[dead].sum(), rtol=1e-4)
  np.testing.assert_allclose(m["gsnr_pooled_active/q_proj"],
                             sig[~dead].sum() / var[~dead].sum(), rtol=1e-4)
  np.testing.assert_allclose(m["gsnr_dead/q_proj"],
                             (sig / var)[dead].mean(), rtol=1e-3)


@pytest.mark.parametrize("method", ["none", "absmean"])
def test_diagnostics_follow_the_method(tmp_path, method):
  from tests.test_trainer import _tiny  # pylint: disable=g-import-not-at-top
  config = _tiny(tmp_path)
  config.model.quant.method = method
  setup = trainer.prepare_setup(config, devices=jax.devices()[:1],
                                progress=False)
  assert (setup.diag is None) == (method == "none")
