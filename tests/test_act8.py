"""W1.58A8: 8-bit per-token activations in the QAT forward, the packed CPU
model and the exports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tequila_jax import config_lib, quant
from tequila_jax import model as model_lib
from tequila_jax.inference import InferenceSettings, PackedLlama, kernels
from tequila_jax.io import tqj, tokenizers
from tequila_jax.quant import QuantConfig
from tests.conftest import tiny_model_config


def _np_fake_quant(x):
  """The int8 kernel's expression in float64 numpy: scale = max|x|/127 per
  row (1 for an all-zero row), x̂ = clip(round(x / scale), -127, 127)·scale,
  round half to even."""
  x = np.asarray(x, np.float64)
  scale = np.abs(x).max(-1, keepdims=True) / 127.0
  scale = np.where(scale > 0, scale, 1.0)
  return np.clip(np.round(x / scale), -127, 127) * scale


def test_fake_quantization_matches_the_kernels_expression():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6, 64)).astype(np.float32)
  x[0, 0] = 0.0  # an all-zero token stays zero
  x[1, 2, 5] = 40.0  # an outlier sets its token's scale
  got = np.asarray(quant.fake_quantize_int8(jnp.asarray(x)))
  np.testing.assert_allclose(got, _np_fake_quant(x), rtol=1e-6, atol=1e-7)
  assert not got[0, 0].any()
  levels = got / (np.abs(x).max(-1, keepdims=True) / 127 + (x == 0).all(
      -1, keepdims=True))
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # 255 levels
  q, scale = kernels.quantize_int8(jnp.asarray(x.reshape(-1, 64)))
  np.testing.assert_array_equal(got.reshape(-1, 64), q * scale)  # one owner
  # Straight-through: the gradient of any loss flows as if x̂ were x.
  g = rng.normal(size=x.shape).astype(np.float32)
  dx = jax.grad(lambda v: jnp.sum(quant.fake_quantize_int8(v) * g))(
      jnp.asarray(x))
  np.testing.assert_array_equal(dx, g)
  bf16 = quant.fake_quantize_int8(jnp.asarray(x, jnp.bfloat16))
  assert bf16.dtype == jnp.bfloat16


@pytest.mark.parametrize("method", ["tequila", "absmean", "minima",
                                    "tequila_dynamic", "seq"])
def test_a8_forward_and_gradient_see_quantized_inputs(method):
  """act_bits=8 is the layer of act_bits=0 applied to x̂ (bias paths too),
  and x's gradient is the one at x̂ (STE)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 16)) * 0.05, jnp.float32)
  cfg8 = QuantConfig(method, group_size=32, lam=0.05, act_bits=8)
  cfg0 = QuantConfig(method, group_size=32, lam=0.05)
  qp = quant.init_qparams(w, cfg0)
  xhat = jnp.asarray(_np_fake_quant(x), jnp.float32)
  f = lambda c, v, k: jnp.sum(quant.quantized_matmul(v, k, c, qp) ** 2)  # noqa: E731
  np.testing.assert_allclose(
      quant.quantized_matmul(x, w, cfg8, qp),
      quant.quantized_matmul(xhat, w, cfg0, qp), rtol=1e-5, atol=1e-6)
  g8 = jax.grad(f, argnums=(1, 2))(cfg8, x, w)
  g0 = jax.grad(f, argnums=(1, 2))(cfg0, xhat, w)
  for a, b in zip(g8, g0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_act_bits_refusals_and_default():
  with pytest.raises(ValueError, match="act_bits=4: use 0"):
    QuantConfig("tequila", act_bits=4)
  with pytest.raises(ValueError, match="method is 'none'"):
    QuantConfig("none", act_bits=8)
  assert QuantConfig().act_bits == 0
  assert QuantConfig(act_bits=8).describe().endswith("A8")
  assert config_lib.tiny().model.quant.act_bits == 0


def _a8_model(method="tequila", **quant_kw):
  cfg = tiny_model_config()
  cfg = cfg.replace(quant=QuantConfig(method, group_size=64, lam=0.05,
                                      act_bits=8, **quant_kw))
  m = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(m, nnx.Param)
  nnx.update(m, jax.tree.map(lambda a: a + 0.02 * jax.random.normal(
      jax.random.key(1), a.shape), state))
  return m


@pytest.mark.parametrize("method", ["tequila", "dlt"])
def test_a8_export_runs_quantized_in_every_kernel(method, tmp_path):
  """The export records act_bits; PackedLlama quantizes activations in
  every strategy and matches the A8 QAT forward (fp32 model: the per-token
  roundings agree except where upstream summation order moves a value
  across a rounding boundary, which the tolerance allows)."""
  m = _a8_model(method)
  path = tmp_path / "a8.tqj"
  tqj.write_export(m, path, tokenizer=tokenizers.ByteTokenizer())
  ex = tqj.read_export(path)
  assert ex.cfg.quant.act_bits == 8
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 24)))
  want = np.asarray(m(tokens))
  for strategy in ("exact", "lut", "int8"):
    packed = PackedLlama.load(path, InferenceSettings(strategy))
    got = np.asarray(packed(tokens))
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4, (strategy, rel)
    assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.99
  # The same weights trained at 16-bit activations: the int8 kernel's
  # quantization is an error that model never saw (~1e-2).
  a16 = tqj.build_export(m)
  a16.cfg = a16.cfg.replace(quant=QuantConfig(method, group_size=64, lam=0.05))
  full = np.asarray(PackedLlama(a16, InferenceSettings("exact"))(tokens))
  int8 = np.asarray(PackedLlama(a16, InferenceSettings("int8"))(tokens))
  assert np.linalg.norm(int8 - full) / np.linalg.norm(full) > 1e-3
