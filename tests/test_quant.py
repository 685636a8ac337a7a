"""The quantizers and quantized matmuls against the Tequila math, exactly."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from tequila_jax import quant
from tequila_jax.quant import QuantConfig
from tests.reference import (official_ultraquant_np,
                             official_ultraquantv2_stats_bf16, quantize_np)
from tests.tolerances import assert_within, bf16_mean_ambiguous, gamma

CONFIGS = [
    QuantConfig("tequila", "per_group", 64, lam=0.3),
    QuantConfig("tequila", "per_group", 128, lam=1e-3),
    QuantConfig("tequila", "per_channel", lam=0.05),
    QuantConfig("tequila", "per_tensor", lam=0.05),
]
X_SHAPES = [(5, 256), (2, 3, 256)]
D_OUT = 12


def _data(x_shape, seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=x_shape).astype(dtype)
  w = rng.normal(size=(x_shape[-1], D_OUT)).astype(dtype) * 0.05
  g = rng.normal(size=x_shape[:-1] + (D_OUT,)).astype(dtype)
  return jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)


def _closed_form(x, w, g, cfg):
  """§1.2 and §1.3 written out in numpy from the reference quantizer."""
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  codes, q = quantize_np(w, cfg.method, cfg.granularity, cfg.group_size)
  dead = codes == 0
  xf, gf = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  y = x @ q + cfg.lam * (w * dead).sum(0)
  dx = g @ q.T
  dw = xf.T @ gf + dead * cfg.lam * gf.sum(0)
  return y, dx, dw


def _stop_gradient_form(x, w, cfg):
  """Tequila written with stop_gradient only: an independent formulation."""
  codes, alpha = quant.ternarize(w, cfg)
  q = quant.dequantize(codes, alpha, w.dtype)
  dead = jax.lax.stop_gradient(codes == 0)
  w_ste = w + jax.lax.stop_gradient(q - w)
  return x @ w_ste + cfg.lam * jnp.sum(w * dead, axis=0)


def _vjp(f, x, w, g):
  y, pullback = jax.vjp(f, x, w)
  return (y, *pullback(g))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.granularity}{c.group_size}")
@pytest.mark.parametrize("x_shape", X_SHAPES)
def test_tequila_matches_closed_form_and_stop_gradient(x64, cfg, x_shape):
  x, w, g = _data(x_shape)
  f = functools.partial(quant.ternary_matmul, cfg=cfg)
  got = _vjp(f, x, w, g)
  got_jit = jax.jit(lambda x, w, g: _vjp(f, x, w, g))(x, w, g)
  ref_sg = _vjp(functools.partial(_stop_gradient_form, cfg=cfg), x, w, g)
  ref_cf = _closed_form(x, w, g, cfg)
  for name, a, b, c, d in zip(("y", "dx", "dw"), got, got_jit, ref_sg, ref_cf):
    np.testing.assert_allclose(a, d, rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(b, d, rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(c, d, rtol=1e-12, atol=1e-12, err_msg=name)


def test_bias_gradient_is_not_trivial(x64):
  """Guards the test above: the λ term must change dW on the deadzone."""
  x, w, g = _data((5, 256))
  cfg = QuantConfig("tequila", lam=0.3)
  _, _, dw = _vjp(functools.partial(quant.ternary_matmul, cfg=cfg), x, w, g)
  _, _, dw0 = _vjp(functools.partial(quant.ternary_matmul,
                                     cfg=QuantConfig("absmean")), x, w, g)
  codes, _ = quant.ternarize(w, cfg)
  diff = np.asarray(dw - dw0)
  dead = np.asarray(codes == 0)
  assert dead.mean() > 0.2 and np.all(diff[~dead] == 0)
  np.testing.assert_allclose(diff[dead], np.broadcast_to(
      0.3 * np.asarray(g).sum(0), dead.shape)[dead], rtol=1e-12)


def test_under_grad_vmap_scan(x64):
  cfg = QuantConfig("tequila", group_size=64, lam=0.2)
  rng = np.random.default_rng(1)
  n_layers, d = 3, 128
  ws = jnp.asarray(rng.normal(size=(n_layers, d, d)) * 0.1)
  xs = jnp.asarray(rng.normal(size=(4, 6, d)))

  def net(matmul, ws, x):
    def layer(h, w):
      return jnp.tanh(matmul(h, w)), None
    return jax.lax.scan(layer, x, ws)[0]

  def loss(matmul, ws, xs):
    per_example = jax.vmap(lambda x: jnp.sum(net(matmul, ws, x) ** 2))
    return jnp.mean(per_example(xs))

  ours = functools.partial(quant.ternary_matmul, cfg=cfg)
  ref = functools.partial(_stop_gradient_form, cfg=cfg)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, ours), (0, 1)))(ws, xs)
  want = jax.value_and_grad(functools.partial(loss, ref), (0, 1))(ws, xs)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  # vmap over the kernel too (per-example kernels).
  vm = jax.vmap(jax.grad(lambda w, x: jnp.sum(ours(x, w) ** 2)))(ws, xs[:3])
  vm_ref = jax.vmap(jax.grad(lambda w, x: jnp.sum(ref(x, w) ** 2)))(ws, xs[:3])
  np.testing.assert_allclose(vm, vm_ref, rtol=1e-12, atol=1e-12)


def test_lambda_zero_is_absmean_exactly():
  x, w, g = _data((2, 3, 256), dtype=np.float32)
  outs = [_vjp(functools.partial(quant.quantized_matmul, cfg=cfg), x, w, g)
          for cfg in (QuantConfig("tequila", lam=0.0), QuantConfig("absmean"))]
  for a, b in zip(*outs):
    np.testing.assert_array_equal(a, b)


def test_codes_and_scales_by_hand_including_ties():
  # in=8, out=2, G=4. Column 0, group 0: mean|W| = 2, delta = 1, so -1 and 1
  # sit exactly on ±delta and go to ±1. Column 0, group 1: mean 1, delta 0.5,
  # ties at 0.5 and -0.5. Column 1: mean 1.1875 / delta 0.59375, then all ones.
  w = np.array([[6.0, -2.0], [-1.0, 2.0], [1.0, 0.5], [0.0, -0.25],
                [0.5, 1.0], [-0.5, 1.0], [0.25, 1.0], [2.75, 1.0]], np.float32)
  cfg = QuantConfig("tequila", group_size=4, lam=0.5)
  st = quant.ternary_state(jnp.asarray(w), cfg)
  np.testing.assert_array_equal(
      st.codes, [[1, -1], [-1, 1], [1, 0], [0, 0], [1, 1], [-1, 1], [0, 1],
                 [1, 1]])
  np.testing.assert_array_equal(st.alpha, [[2.0, 1.1875], [1.0, 1.0]])
  np.testing.assert_allclose(st.c, [0.5 * 0.25, 0.5 * 0.25], rtol=1e-7)
  assert st.codes.dtype == jnp.int8
  np.testing.assert_array_equal(
      quant.dequantize(st.codes, st.alpha),
      [[2, -1.1875], [-2, 1.1875], [2, 0], [0, 0], [1, 1], [-1, 1], [0, 1],
       [1, 1]])


@pytest.mark.parametrize("granularity", ["per_group", "per_channel", "per_tensor"])
@pytest.mark.parametrize("method", ["absmean", "twn"])
def test_quantizer_matches_reference(x64, method, granularity):
  _, w, _ = _data((1, 256))
  cfg = QuantConfig(method, granularity, 64)
  codes, alpha = quant.ternarize(w, cfg)
  ref_codes, ref_q = quantize_np(w, method, granularity, 64)
  np.testing.assert_array_equal(codes, ref_codes)
  np.testing.assert_allclose(quant.dequantize(codes, alpha, jnp.float64),
                             ref_q, rtol=1e-14)
  dead = (ref_codes == 0).mean()
  # Gaussian weights: absmean deadzone ≈ 0.31 (DESIGN 0.295 is the population
  # figure), TWN's wider threshold ≈ 0.45.
  assert (0.2 < dead < 0.4) if method == "absmean" else (0.35 < dead < 0.55)


def _count_dots(jaxpr):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_dots(sub)
  return n


def test_forward_has_one_matmul_and_backward_two():
  x, w, g = _data((4, 256), dtype=np.float32)
  cfg = QuantConfig("tequila")
  f = functools.partial(quant.quantized_matmul, cfg=cfg)
  assert _count_dots(jax.make_jaxpr(f)(x, w).jaxpr) == 1
  fwd_bwd = jax.make_jaxpr(lambda x, w: _vjp(f, x, w, g))(x, w).jaxpr
  assert _count_dots(fwd_bwd) == 3  # y, dx, dW


def test_quantizer_saves_only_int8_codes():
  _, w, _ = _data((4, 256), dtype=np.float32)
  _, res = quant.matmul._qk_fwd(w, None, QuantConfig("tequila"), jnp.bfloat16)
  codes, w_proto, lam, dead_sum = res
  assert codes.shape == w.shape and codes.dtype == jnp.int8
  assert w_proto.shape == () and w_proto.dtype == jnp.float32
  assert lam is None and dead_sum is None  # fixed λ: nothing else saved
  cfg = QuantConfig("tequila", lam_mode="per_channel")
  _, res = quant.matmul._qk_fwd(w, jnp.full(w.shape[1:], 1e-3), cfg,
                                jnp.bfloat16)
  assert res[3].shape == w.shape[1:]  # a learned λ adds one sum per output


def _other_method_closed_form(x, w, g, cfg):
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  xf, gf = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  if cfg.method == "none":
    return x @ w, g @ w.T, xf.T @ gf
  codes, q = quantize_np(w, cfg.method, cfg.granularity, cfg.group_size)
  dead = codes == 0
  w_dead = w * dead
  if cfg.method in ("absmean", "twn"):
    return x @ q, g @ q.T, xf.T @ gf
  if cfg.method == "tequila_dynamic":
    y = x @ q + cfg.lam * x @ w_dead
    return y, g @ (q + cfg.lam * w_dead).T, xf.T @ gf + cfg.lam * dead * (xf.T @ gf)
  assert cfg.method == "minima"  # sign(W) on D, +1 for W = 0 (official)
  y = x @ q + cfg.eps * np.sign(x) @ (np.where(w >= 0, 1.0, -1.0) * dead)
  return y, g @ q.T, xf.T @ gf + dead * (np.sign(xf).T @ gf)


@pytest.mark.parametrize("cfg", [
    QuantConfig("none"), QuantConfig("absmean", group_size=64),
    QuantConfig("twn", "per_channel"),
    QuantConfig("tequila_dynamic", group_size=64, lam=0.2),
    QuantConfig("minima", group_size=64, eps=0.05),
], ids=lambda c: c.method)
@pytest.mark.parametrize("x_shape", X_SHAPES)
def test_other_methods_match_definitions(x64, cfg, x_shape):
  x, w, g = _data(x_shape, seed=3)
  got = _vjp(functools.partial(quant.quantized_matmul, cfg=cfg), x, w, g)
  want = _other_method_closed_form(x, w, g, cfg)
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


def test_bf16_compute_close_to_fp32():
  x, w, g = _data((8, 256), dtype=np.float32)
  cfg = QuantConfig("tequila", lam=1e-2)
  f = functools.partial(quant.quantized_matmul, cfg=cfg)
  y32, dx32, dw32 = _vjp(f, x, w, g)
  y16, dx16, dw16 = _vjp(f, x.astype(jnp.bfloat16), w, g.astype(jnp.bfloat16))
  assert y16.dtype == dx16.dtype == jnp.bfloat16 and dw16.dtype == jnp.float32
  # bf16 has an 8-bit mantissa: inputs round to ~4e-3 relative error and dot
  # products of 256 terms average it down; 1e-2 relative is the stated bound.
  for a, b in ((y16, y32), (dx16, dx32), (dw16, dw32)):
    rel = np.linalg.norm(np.float32(a) - b) / np.linalg.norm(b)
    assert rel < 1e-2, rel


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="bitnet"), "Unknown quant method 'bitnet'"),
    (dict(granularity="per_row"), "Unknown granularity"),
    (dict(lam=-1e-3), "lam must be >= 0"),
    (dict(group_size=0), "group_size must be positive"),
])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantConfig(**kwargs)


def test_bad_shapes_name_the_fix():
  cfg = QuantConfig(group_size=128)
  with pytest.raises(ValueError, match=r"in=576, out=64.*multiple of group_size"
                     r" 128.*\[64, 32, 16\]"):
    quant.quantized_matmul(jnp.ones((2, 576)), jnp.ones((576, 64)), cfg)
  with pytest.raises(ValueError, match="expected a 2-D"):
    quant.quantized_matmul(jnp.ones((2, 128)), jnp.ones((128, 4, 2)), cfg)
  with pytest.raises(ValueError, match="input has 64 features"):
    quant.quantized_matmul(jnp.ones((2, 64)), jnp.ones((128, 4)), cfg)


@pytest.mark.parametrize("x_shape", X_SHAPES)
def test_minima_matches_the_official_ultraquant(x64, x_shape):
  """Forward, dx and dW against the official backward, which adds
  sign(x)ᵀ g on the deadzone unscaled (not times eps)."""
  x, w, g = _data(x_shape, seed=5)
  w = w.at[3, 2].set(0.0)  # an exact zero: the official mask gives it +eps
  cfg = QuantConfig("minima", group_size=64, eps=1e-3)
  y, dx, dw = _vjp(functools.partial(quant.quantized_matmul, cfg=cfg), x, w, g)
  want_y, want_dx, want_dw = official_ultraquant_np(x, np.asarray(w).T, g, 64,
                                                    1e-3)
  np.testing.assert_allclose(y, want_y, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(dw, want_dw.T, rtol=1e-13, atol=1e-13)
  dead = np.asarray(quant.ternarize(w, cfg)[0]) == 0
  # The reactivation gradient is O(tokens), not O(eps * tokens).
  extra = np.asarray(dw) - np.asarray(x).reshape(-1, 256).T @ np.asarray(
      g).reshape(-1, D_OUT)
  assert np.abs(extra[dead]).max() > 0.5 and np.abs(extra[~dead]).max() < 1e-12


def test_bias_gradient_accumulates_in_fp32():
  """dc = Σ_tokens g: bf16 activations, but the sum over 8k tokens in fp32
  (a bf16 sum is off by ~1%; the official matmul accumulates in fp32)."""
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(1.0, 0.3, (8, 1024, 16)), jnp.bfloat16)
  y = jnp.zeros(g.shape, jnp.bfloat16)
  dc = jax.vjp(lambda c: quant.matmul.add_bias(y, c),
               jnp.zeros(16, jnp.float32))[1](g)[0]
  assert dc.dtype == jnp.float32
  want = np.asarray(g, np.float64).sum((0, 1))
  # fp32 in any order is within γ_n·Σ|g| of the exact sum (n = 8,192,
  # tests/tolerances.py: 5e-4 relative at most, ~1e-6 in practice); a bf16
  # sum is off by ~1e-2.
  n = g.shape[0] * g.shape[1]
  abs_g = np.abs(np.asarray(g, np.float64)).sum((0, 1))
  assert_within(dc, want, gamma(n) * abs_g, "dc")
  # And through the layer: dW on the deadzone carries λ·dc in fp32.
  x = jnp.asarray(rng.normal(size=(8, 1024, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(128, 16)) * 0.05, jnp.float32)
  cfg = QuantConfig("tequila", group_size=64, lam=1.0)
  _, pull = jax.vjp(lambda w: quant.ternary_matmul(x, w, cfg), w)
  dw = np.asarray(pull(g)[0], np.float64)
  dw_ste = np.asarray(jax.vjp(
      lambda w: quant.ternary_matmul(x, w, QuantConfig("absmean", group_size=64)),
      w)[1](g)[0], np.float64)
  dead = np.asarray(quant.ternarize(w, cfg)[0]) == 0
  # dw = xᵀg (+ λ·dc on D) and dw_ste = xᵀg: each a sum of n terms (xᵀg of
  # bf16 products, exact in fp32) in an order of its own.
  xg = np.abs(np.asarray(x, np.float64)).reshape(n, -1).T @ np.abs(
      np.asarray(g, np.float64)).reshape(n, -1)
  assert_within((dw - dw_ste)[dead], np.broadcast_to(want, dw.shape)[dead],
                (gamma(n + 1) * (abs_g + 2 * xg))[dead], "dW on D")


@pytest.mark.parametrize("method", ["absmean", "tequila"])
def test_bf16_statistics_match_the_official_code(method):
  """stat_dtype='bfloat16' reproduces the official ultraquantv2 codes and
  scales on bf16 weights exactly (torch transcription, in bf16)."""
  rng = np.random.default_rng(7)
  w_out_in = (rng.normal(size=(48, 512)) * 0.02).astype(np.float32)
  w_out_in = np.asarray(jnp.asarray(w_out_in, jnp.bfloat16), np.float32)
  codes, alpha, c = official_ultraquantv2_stats_bf16(w_out_in, 128, 1e-3)
  # Each group's mean|W| rounds to the same bf16 value whatever order torch
  # and XLA sum it in (tests/tolerances.py): exact equality is guaranteed.
  assert not bf16_mean_ambiguous(w_out_in.reshape(-1, 128)).any()
  cfg = QuantConfig(method, group_size=128, lam=1e-3, stat_dtype="bfloat16")
  got = quant.ternary_state(jnp.asarray(w_out_in.T), cfg)
  np.testing.assert_array_equal(got.codes, codes.T)
  np.testing.assert_array_equal(got.alpha, alpha.T)
  if method == "tequila":  # official λ is bf16(1e-3) and B is rounded to bf16:
    # each term within 2^-8 relative, so the sum within 2^-8 λ Σ_D |W|.
    bound = 1e-3 * np.sum(np.abs(w_out_in) * (codes == 0), -1) * 2.0**-8
    assert np.all(np.abs(np.asarray(got.c) - c) <= bound)
  # fp32 statistics differ from the official ones on some groups' scales.
  fp32 = quant.ternary_state(jnp.asarray(w_out_in.T),
                             QuantConfig(method, group_size=128))
  assert not np.array_equal(fp32.alpha, got.alpha)
