"""TernaryDense: a thin NNX module over tequila_jax.quant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tequila_jax import QuantConfig, TernaryDense, quant
from tequila_jax.layers import attend_cache
from tests.tolerances import assert_within, chain_atol, matmul_tolerances


def _layer(cfg=QuantConfig(lam=0.01), **kw):
  return TernaryDense(256, 32, quant_config=cfg, rngs=nnx.Rngs(0), **kw)


def test_forward_is_the_quantized_matmul_in_compute_dtype():
  layer = _layer(dtype=jnp.float32, use_bias=True)
  layer.bias[...] = jnp.arange(32, dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(1), (2, 5, 256))
  want = quant.ternary_matmul(x, layer.kernel[...], layer.quant_config) + \
      jnp.arange(32)
  np.testing.assert_array_equal(layer(x), want)
  assert layer.kernel[...].dtype == jnp.float32
  assert _layer()(x).dtype == jnp.bfloat16


def test_gradient_through_module_is_the_custom_vjp():
  layer = _layer(dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(1), (7, 256))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  w = layer.kernel[...]
  want = jax.grad(lambda w: jnp.sum(
      quant.ternary_matmul(x, w, layer.quant_config) ** 2))(w)
  np.testing.assert_allclose(grads["kernel"][...], want, rtol=1e-6)


def test_ternary_state_and_float_method():
  layer = _layer()
  st = layer.ternary_state()
  assert st.codes.shape == (256, 32) and st.alpha.shape == (2, 32)
  assert st.c.shape == (32,) and np.any(st.c != 0)
  dense = _layer(QuantConfig("none"), dtype=jnp.float32)
  x = jnp.ones((3, 256))
  np.testing.assert_allclose(dense(x), x @ dense.kernel[...], rtol=1e-6)
  with pytest.raises(ValueError, match="no ternary state"):
    dense.ternary_state()


def test_bad_input_names_layer_and_fix():
  with pytest.raises(ValueError, match=r"q_proj of shape \[in=576, out=64\]"):
    TernaryDense(576, 64, name="q_proj", rngs=nnx.Rngs(0))
  layer = _layer()
  with pytest.raises(ValueError, match=r"input of shape \(2, 100\) must end in "
                     "256 features"):
    layer(jnp.ones((2, 100)))


def test_jit_and_split_merge():
  layer = _layer()
  graphdef, state = nnx.split(layer)

  @jax.jit
  def f(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jnp.ones((4, 256))
  # Jitted and op by op are two programs (bf16 output): equal to their
  # sums' order and bf16 rounding (tests/tolerances.py).
  want = layer(x)
  tol, _, _ = matmul_tolerances(layer.quant_config, x, layer.kernel[...],
                                jnp.ones(want.shape), jnp.bfloat16)
  assert_within(np.asarray(f(state, x), np.float32),
                np.asarray(want, np.float32), tol, "jit")


def test_attend_cache_is_causal_attention_in_either_layout():
  """One function for both caches: `bskd` (Llama) and `bksd` (the inference
  decoders) agree (to their sums' order: another layout is another program)
  and equal masked softmax attention; a bf16 cache is read in bf16."""
  b, t, n, k, d, slots = 2, 3, 4, 2, 8, 16
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32)
  keys, values = (jnp.asarray(rng.normal(size=(b, slots, k, d)), jnp.float32)
                  for _ in range(2))
  positions = jnp.asarray([[5, 6, 7], [0, 1, 2]])
  got = attend_cache(q, keys, values, positions)
  assert got.shape == (b, t, n * d) and got.dtype == jnp.float32
  # Each output: a softmax over `slots` scores of `d` terms, then a sum over
  # the slots: chains of <= slots·d terms, 3 deep (tests/tolerances.py).
  atol = chain_atol(got, slots * d, 3)
  heads_major = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
  np.testing.assert_allclose(
      attend_cache(q, heads_major(keys), heads_major(values), positions,
                   layout="bksd"), got, rtol=1e-6, atol=atol)
  mask = jnp.arange(slots)[None, None, None, :] <= positions[:, None, :, None]
  want = jax.nn.dot_product_attention(q, keys, values, mask=mask)
  np.testing.assert_allclose(got, want.reshape(b, t, -1), rtol=1e-5,
                             atol=atol)
  # Slots past the positions are never read.
  junk = keys.at[:, 8:].set(1e4)
  np.testing.assert_array_equal(attend_cache(q, junk, values, positions), got)
  half = attend_cache(q, keys.astype(jnp.bfloat16), values.astype(jnp.bfloat16),
                      positions)
  assert half.dtype == jnp.float32
  assert 0 < float(jnp.abs(half - got).max()) < 5e-2
  with pytest.raises(ValueError, match="layout 'bsdk': choose one of"):
    attend_cache(q, keys, values, positions, layout="bsdk")
