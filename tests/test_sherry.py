"""Sherry's configuration, its Arenas plumbing through the model and its
block statistics (the float64 comparisons with the official code:
test_sherry_reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tequila_jax import model as model_lib
from tequila_jax import quant
from tequila_jax.quant import QuantConfig
from tests.tolerances import (assert_within, chain_atol, llama_depth,
                               sum_order_bound)


@pytest.mark.parametrize("fields, message", [
    (dict(method="sherry", group_size=66), "multiple of 4"),
    (dict(method="sherry", stat_dtype="bfloat16"), "stat_dtype='float32'"),
    (dict(method="tequila", arenas_max_eps=0.0), "method 'sherry'"),
    (dict(method="absmean", arenas_warmup_fraction=0.2), "method 'sherry'"),
    (dict(method="sherry", arenas_max_eps=-1.0), "arenas_max_eps must be"),
    (dict(method="sherry", arenas_warmup_fraction=1.5), "in \\[0, 1\\]"),
])
def test_bad_settings_name_the_fix(fields, message):
  with pytest.raises(ValueError, match=message):
    QuantConfig(**fields)


def test_input_width_must_be_a_multiple_of_4():
  cfg = QuantConfig("sherry", "per_channel")
  with pytest.raises(ValueError, match="multiple of 4 \\(got 18\\)"):
    cfg.check_kernel_shape((18, 8), "q_proj")


def test_describe_names_the_ablation():
  assert "3:4 Arenas ε≤1" in QuantConfig("sherry").describe()
  assert "3:4 no Arenas" in QuantConfig("sherry",
                                        arenas_max_eps=0.0).describe()


def test_schedule_shape():
  """Rises linearly to max_eps at the end of warmup, falls monotonically,
  is 0 at the last step and after; max_eps = 0 is 0 throughout."""
  eps = np.asarray([quant.arenas_eps(s, 50, 0.2, 0.5) for s in range(60)])
  np.testing.assert_allclose(eps[:10], 0.5 * np.arange(1, 11) / 10,
                             rtol=1e-6)
  assert np.all(np.diff(eps[9:50]) < 0) and eps[9] == np.float32(0.5)
  assert np.all(eps[49:] == 0)
  assert not np.any([quant.arenas_eps(s, 50, 0.2, 0.0) for s in range(60)])
  # All warmup: the rise ends one step early, and the last step is 0.
  full = np.asarray([quant.arenas_eps(s, 10, 1.0) for s in range(11)])
  np.testing.assert_allclose(full[:9], np.arange(1, 10) / 10, rtol=1e-6)
  assert full[9] == full[10] == 0 and float(quant.arenas_eps(0, 1)) == 0


def _sherry_and_folded(eps: float, **run):
  """A small sherry Llama and the float model (method none) whose every
  kernel is its `Q + εW`: what the sherry model computes at Arenas ε."""
  cfg = model_lib.ModelConfig.from_dict(dict(
      vocab_size=64, hidden_size=32, ffn_size=64, num_layers=2, num_heads=2,
      num_kv_heads=1, head_dim=16, max_seq_len=16, dtype="float32",
      quant=dict(method="sherry", granularity="per_group", group_size=16),
      **run))
  m = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  dense = model_lib.Llama(cfg.replace(quant=QuantConfig("none")),
                          rngs=nnx.Rngs(0))

  def folded(p):
    if isinstance(p, dict) and "kernel" in p:
      k = jax.vmap(lambda w: quant.ternary_state(w, cfg.quant))(p["kernel"])
      q = jax.vmap(quant.dequantize)(k.codes, k.alpha)
      return {**p, "kernel": q + eps * p["kernel"]}
    if isinstance(p, dict):
      return {k: folded(v) for k, v in p.items()}
    return p

  nnx.update(dense, folded(nnx.to_pure_dict(nnx.state(m, nnx.Param))))
  return m, dense


def _split(model):
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


TOKENS = jnp.arange(26).reshape(2, 13) % 64


def test_model_passes_eps_to_every_projection():
  """`Llama(tokens, arenas_eps=ε)` equals the model whose every kernel is
  `Q + εW` in float (method none): ε reaches all seven projections."""
  m, dense = _sherry_and_folded(0.3)
  want = np.asarray(dense(TOKENS))
  got = np.asarray(jax.jit(lambda t, e: m(t, arenas_eps=e))(TOKENS, 0.3))
  # The same kernels: at most the sums' order differs (jit vs eager).
  np.testing.assert_allclose(got, want, rtol=0, atol=chain_atol(
      want, m.cfg.ffn_size, llama_depth(m.cfg.num_layers)))
  assert not np.allclose(np.asarray(m(TOKENS)), want)  # ε = 0 differs


@pytest.mark.parametrize("run, loss_chunk", [
    (dict(), 0), (dict(), 4), (dict(scan_layers=False), 0),
    (dict(remat="full"), 0), (dict(remat="quantized"), 4)])
def test_training_losses_see_eps(run, loss_chunk):
  """Every path the train step takes (chunked loss, unrolled layers, remat)
  and the distillation objective (with its attention relation) compute the
  sherry model at the ε given, and its gradient flows (1 + ε)·xᵀg to W."""
  from tequila_jax import distill, losses  # pylint: disable=g-import-not-at-top
  eps = 0.3
  m, dense = _sherry_and_folded(eps, **run)
  (gs, ps), (gd, pd) = _split(m), _split(dense)
  loss = jax.jit(lambda p: losses.next_token_loss(
      p, gs, TOKENS, loss_chunk, arenas_eps=eps))(ps)
  want = losses.next_token_loss(pd, gd, TOKENS, loss_chunk)
  tol = chain_atol(want, m.cfg.vocab_size, llama_depth(m.cfg.num_layers))
  np.testing.assert_allclose(loss, want, rtol=0, atol=tol)
  cfg = distill.DistillConfig(weight=1.0, attention_weight=1.0,
                              attention_heads=1)
  teacher = _split(model_lib.Llama(dense.cfg, rngs=nnx.Rngs(3)))
  got, _ = distill.objective(ps, gs, teacher[1], teacher[0], TOKENS, cfg,
                             loss_chunk, arenas_eps=eps)
  want, _ = distill.objective(pd, gd, teacher[1], teacher[0], TOKENS, cfg,
                              loss_chunk)
  np.testing.assert_allclose(got, want, rtol=0, atol=2 * tol)


def test_distilling_a_sherry_ablation_builds_its_float_teacher():
  """The float teacher of a sherry run is method none, whatever the
  student's Arenas fields (they belong to sherry alone)."""
  from tequila_jax import train  # pylint: disable=g-import-not-at-top
  from tests.test_trainer import _tiny  # pylint: disable=g-import-not-at-top
  config = _tiny()
  config.model.quant.update(method="sherry", arenas_max_eps=0.0)
  config.distill.weight = 1.0
  tr = train.build_train(config, devices=jax.devices()[:1])
  assert tr.teacher.cfg.quant == QuantConfig("none")
  assert train.describe(config, devices=jax.devices()[:1])["params"]


def test_gradient_with_the_default_eps_under_remat_jit_and_scan():
  """The layer's default ε (a Python 0.0) differentiates under
  `jax.checkpoint`, `jit` and `lax.scan` (dW = xᵀg), and at ε = 0.5
  dW = 1.5·xᵀg with g taken at the kernel Q + 0.5·W."""
  cfg = QuantConfig("sherry", group_size=32)
  x = jax.random.normal(jax.random.key(1), (3, 64))
  w = jax.random.normal(jax.random.key(0), (64, 8))
  loss = lambda w, e=0.0: jnp.sum(  # noqa: E731
      jnp.sin(quant.quantized_matmul(x, w, cfg, arenas_eps=e)))
  q = quant.dequantize(*quant.ternary_state(w, cfg)[:2])
  want = np.asarray(x.T @ jnp.cos(x @ q))
  scanned = lambda w: jax.lax.scan(  # noqa: E731
      lambda c, xi: (c + jnp.sum(jnp.sin(quant.quantized_matmul(
          xi, w, cfg))), None), 0.0, x[:, None, :])[0]
  def bound(kernel):
    """dW = xᵀ cos(x·K): the forward dot's order (64 terms) moves cos by at
    most as much, plus cos's own rounding, then the 3-term dot's order."""
    ax, ak = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(kernel))
    dg = sum_order_bound(ax @ ak, 64) + np.finfo(np.float32).eps
    return ax.T @ dg + sum_order_bound(ax.T @ np.ones((3, 8)), 3)

  for grad in (jax.grad(jax.checkpoint(loss)), jax.jit(jax.grad(loss)),
               jax.grad(scanned)):
    assert_within(grad(w), want, bound(q), "default ε")
  at_half = 1.5 * np.asarray(x.T @ jnp.cos(x @ (q + 0.5 * w)))
  got = jax.grad(jax.checkpoint(loss))(w, jnp.float32(0.5))
  assert_within(got, at_half, 1.5 * bound(q + 0.5 * w), "ε = 0.5")
