"""TernaryDense: a thin NNX module over tequila_jax.quant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tequila_jax import QuantConfig, TernaryDense, quant


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
  np.testing.assert_array_equal(f(state, x), layer(x))
