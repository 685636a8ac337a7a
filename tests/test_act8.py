"""W1.58A8: 8-bit per-token activations in the QAT forward, the packed CPU
model and the exports."""

import dataclasses

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
from tests.tolerances import assert_within, settle_codes, sum_order_bound


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
  return settle_codes(m)  # codes free of summation order (tests/tolerances)


class _Recording(PackedLlama):
  """PackedLlama that keeps every projection call's input and output (run
  it under `jax.disable_jit()` to see them)."""
  calls: list

  def linear(self, h, entry):
    y = super().linear(h, entry)
    self.calls.append((np.asarray(h), np.asarray(y)))
    return y


# PackedLlama's fused projections, in the order its decode step calls them.
_FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",),
          ("gate_proj", "up_proj"), ("down_proj",))


@pytest.mark.parametrize("method", ["tequila", "dlt"])
def test_a8_export_runs_quantized_in_every_kernel(method, tmp_path):
  """The export records act_bits; in every strategy each PackedLlama
  projection quantizes its input per token and equals the A8 QAT layer
  (`quantized_matmul` with act_bits=8) on that same input, to the rounding
  of the two sums' orders.

  Compared layer by layer, on the inputs the packed model fed each layer:
  end to end, two fp32 forwards round differently upstream, which moves
  some per-token int8 roundings across a rounding boundary (a flip of one
  level, ~1/127 of the token's absmax), and flips compound through the
  layers (2.6e-3 relative logits on an AMD Zen 4). On one input the
  quantized x̂ is one elementwise expression (absmax is exact in any
  order), so only the dot's order and the weight statistics' remain (the
  codes agree: `settle_codes`)."""
  m = _a8_model(method)
  path = tmp_path / "a8.tqj"
  tqj.write_export(m, path, tokenizer=tokenizers.ByteTokenizer())
  ex = tqj.read_export(path)
  assert ex.cfg.quant.act_bits == 8
  cfg = m.cfg.quant
  cfg16 = dataclasses.replace(cfg, act_bits=0)
  layers = nnx.to_pure_dict(nnx.state(m.layers, nnx.Param))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 24)))
  for strategy in ("exact", "lut", "int8"):
    packed = _Recording(ex, InferenceSettings(strategy))
    packed.calls = []
    with jax.disable_jit():
      packed(tokens)
    assert len(packed.calls) == len(_FUSED) * m.cfg.num_layers
    for n, (h, got) in enumerate(packed.calls):
      i, parts = n // len(_FUSED), _FUSED[n % len(_FUSED)]
      want, want16, terms = [], [], []
      xhat = np.abs(np.asarray(quant.fake_quantize_int8(jnp.asarray(h)),
                               np.float64))
      for proj in parts:
        p = {k: v[i] for k, v in layers[model_lib.PROJECTIONS[proj]][
            proj].items()}
        w, qp = p.pop("kernel"), p
        want.append(quant.quantized_matmul(jnp.asarray(h), w, cfg, qp))
        want16.append(quant.quantized_matmul(jnp.asarray(h), w, cfg16, qp))
        # Σ|terms| of y_j = Σ_i x̂_i Q_ij + c_j: |x̂| @ |Q| (DLT's γ as a
        # term of its own) and c's λ·Σ_{i∈D} |W_ij|.
        codes = ex.codes(proj)[i].astype(np.float64)
        alpha = ex.tensors[f"layers.{proj}.alpha"][i].astype(np.float64)
        gamma = ex.gamma(proj)
        groups = alpha.shape[0]
        level = np.repeat(alpha, codes.shape[0] // groups, axis=0)
        extra = (0 if gamma is None else np.repeat(
            np.abs(gamma[i]), codes.shape[0] // groups, axis=0))
        terms.append(xhat @ (np.abs(codes) * level + extra) +
                     cfg.bias_lam * (np.abs(w) * (codes == 0)).sum(0))
      want, want16 = np.concatenate(want, -1), np.concatenate(want16, -1)
      got = got.reshape(want.shape)
      d_in = h.shape[-1]
      # The dot (d_in terms), α and c (means / sums of <= d_in weights, α
      # entering Q as a relative error), γ's group sums: 2·d_in + 2 terms.
      tol = sum_order_bound(np.concatenate(terms, -1), 2 * d_in + 2)
      where = f"{strategy} layer {i} {'+'.join(parts)}"
      assert_within(got, want, tol, where)
      # The bound tells quantized inputs from unquantized ones.
      assert np.mean(np.abs(want16 - want) > tol) > 0.5, where
  # The same weights trained at 16-bit activations: the int8 kernel's
  # quantization is an error that model never saw (~1e-2).
  a16 = tqj.build_export(m)
  a16.cfg = a16.cfg.replace(quant=QuantConfig(method, group_size=64, lam=0.05))
  full = np.asarray(PackedLlama(a16, InferenceSettings("exact"))(tokens))
  int8 = np.asarray(PackedLlama(a16, InferenceSettings("int8"))(tokens))
  assert np.linalg.norm(int8 - full) / np.linalg.norm(full) > 1e-3
