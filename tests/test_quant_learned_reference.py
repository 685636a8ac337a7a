"""Learned-scale (LSQ / SEQ / DLT) and learned-λ Tequila against float64 numpy
transcriptions of the published reference code.

The references (read from the authors' repositories, transcribed, not copied):

* ParetoQ, `models/utils_quant.py`: `LsqBinaryTernaryExtension` (LSQ) and
  `StretchedElasticQuant` (SEQ) at `num_bits = 0`; `train.py` initializes
  `weight_clip_val` (alpha) to max|W| of each output row.
* AngelSlim branch `sherry`, `Sherry/models/utils_quant.py`: `DLTQuant`
  (LSQ plus a learned offset gamma) and `LSQLinear`.
* AngelSlim branch `tequila`, `TernaryQuant/models/utils_quant.py`:
  `UltraQuantV3`, `UltraQuantLinear.update_lambada_v3` and the
  `ultraquantv3` branch of `UltraQuantLinear.forward`; `TernaryQuant/train.py`
  (Lambada = randn * range_of_lambada).

The reference code works on a torch weight `[out, in]`, whose rows it reshapes
into groups (`reshape(-1, G)` per group, one row per output unit per channel,
one row in all per tensor); the library's kernels are `[in, out]`, so the
helpers below transpose at the boundary and otherwise follow the reference
code operation by operation. These transcriptions were checked against the
torch autograd Functions themselves (forward and every gradient, float64,
to ~1e-16) outside this repository.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tequila_jax import quant
from tequila_jax.quant import QuantConfig

D_IN, D_OUT, G = 64, 8, 16
GRANS = ("per_channel", "per_group", "per_tensor")
LEARNED = ("lsq", "seq", "dlt")
ALPHA_EPS = 1e-5  # `eps = torch.tensor(0.00001)`; alpha = where(alpha > eps, alpha, eps)
SEQ_CLIP = 1 - 1e-2  # SEQ's `clip_val`
SEQ_LEVELS = 1.5  # SEQ's `n_levels` at num_bits = 0 (shift = 0)
TIE_ALPHA = 0.046875  # 3 * 2**-6: alpha / 2 and alpha / 3 are exact ties


def _cfg(method, granularity="per_group", **kw):
  return QuantConfig(method=method, granularity=granularity, group_size=G, **kw)


# ----------------------------------------------------------------------------
# Layout helpers: [in, out] kernels <-> the reference's grouped rows.
# ----------------------------------------------------------------------------


def _rows(a_in_out, granularity, group_size=G):
  """The reference's view of a kernel: torch weight `[out, in]` reshaped into
  one row per group, as the official code reshapes it."""
  w = np.asarray(a_in_out, np.float64).T
  if granularity == "per_tensor":
    return w.reshape(1, -1)
  if granularity == "per_channel":
    return w.reshape(w.shape[0], -1)
  return w.reshape(-1, group_size)


def _unrows(rows, d_in, d_out):
  return rows.reshape(d_out, d_in).T


def _param_rows(p):
  """Library per-group parameter `[in // G, out]` (or `[1, out]`, `[1, 1]`) to
  the reference's `[n_groups, 1]` column (group order of `_rows`)."""
  return np.asarray(p, np.float64).T.reshape(-1, 1)


def _unparam(rows, shape):
  return rows.reshape(shape[::-1]).T


def _expand(p, d_in, d_out):
  """A per-group parameter broadcast over its group to `[in, out]`."""
  p = np.atleast_2d(np.asarray(p, np.float64))
  return np.broadcast_to(np.repeat(p, d_in // p.shape[0], axis=0), (d_in, d_out))


def _param_shape(granularity, d_in=D_IN, d_out=D_OUT):
  return {"per_channel": (1, d_out), "per_group": (d_in // G, d_out),
          "per_tensor": (1, 1)}[granularity]


def _round_half_away(v):
  return np.sign(v) * np.floor(np.abs(v) + 0.5)


# ----------------------------------------------------------------------------
# LSQ / SEQ / DLT: transcriptions of the autograd Functions (num_bits = 0).
# ----------------------------------------------------------------------------


def learned_rows_np(w, alpha, gamma, dq, numel, method, *, rnd=np.round,
                    seq_clip_coef=1.0, mask_ste=True):
  """One call of `LsqBinaryTernaryExtension` / `StretchedElasticQuant` /
  `DLTQuant` on grouped rows `w [n, L]` with `alpha, gamma [n, 1]` and the
  cotangent `dq` of the quantized weight. Returns `(q, levels, dw, dalpha,
  dgamma)`. The keyword arguments select deliberately WRONG variants, used
  only to show that the tests can tell them apart.

  forward:  alpha <- where(alpha > 1e-5, alpha, 1e-5)
            lsq/dlt: q_w = round(W / alpha).clamp(-1, 1)
            seq:     q_w = round(clamp(W / alpha, -.99, .99) * 1.5) / 1.5
            w_q = q_w * alpha (+ gamma for dlt)
  backward: q_w = W / alpha (clamped alpha), Qn = -1, Qp = 1 (for SEQ,
            Qp = (n_levels - shift) / n_levels = 1.5 / 1.5 = 1 as well)
            small = q_w < Qn (lsq) / < -.99 (seq), big likewise, middle = rest
            grad_alpha = sum_row((small * Qn + big * Qp + middle * (-q_w +
              round-level(q_w))) * g * grad_scale), grad_scale =
              1 / sqrt(input.numel() * Qp) = 1 / sqrt(numel of the whole W)
            grad_input = middle * g; grad_gamma = sum_row(g)
  """
  a = np.where(alpha > ALPHA_EPS, alpha, ALPHA_EPS)
  r = w / a
  if method == "seq":
    lev = rnd(np.clip(r, -SEQ_CLIP, SEQ_CLIP) * SEQ_LEVELS) / SEQ_LEVELS
    lo, hi, qn, qp = -SEQ_CLIP, SEQ_CLIP, -seq_clip_coef, seq_clip_coef
  else:
    lev = np.clip(rnd(r), -1.0, 1.0)
    lo, hi, qn, qp = -1.0, 1.0, -1.0, 1.0
  q = lev * a
  if method == "dlt":
    q = q + gamma
  small, big = r < lo, r > hi
  middle = 1.0 - small - big
  grad_scale = 1.0 / np.sqrt(numel)
  coef = small * qn + big * qp + middle * (-r + lev)
  dalpha = np.sum(coef * dq * grad_scale, axis=-1, keepdims=True)
  dw = (middle if mask_ste else 1.0) * dq
  dgamma = np.sum(dq, axis=-1, keepdims=True) if method == "dlt" else None
  return q, lev, dw, dalpha, dgamma


def learned_layer_np(x, w, g, method, granularity, qp, **variant):
  """`y = x @ Q(W)` and its gradients for the loss `sum(y * g)`, in the
  library's layout: returns a dict with y, dx, dw, alpha (and gamma) grads,
  the quantized kernel q and the codes."""
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  d_in, d_out = w.shape
  shape = np.shape(qp["alpha"])
  alpha = _param_rows(qp["alpha"])
  gamma = _param_rows(qp["gamma"]) if method == "dlt" else None
  xf, gf = x.reshape(-1, d_in), g.reshape(-1, d_out)
  dq_rows = _rows(xf.T @ gf, granularity)
  q, lev, dw, dalpha, dgamma = learned_rows_np(
      _rows(w, granularity), alpha, gamma, dq_rows, w.size, method, **variant)
  q = _unrows(q, d_in, d_out)
  out = {"y": x @ q, "dx": g @ q.T, "dw": _unrows(dw, d_in, d_out),
         "dalpha": _unparam(dalpha, shape), "q": q,
         "codes": np.sign(_unrows(lev, d_in, d_out)).astype(np.int8)}
  if method == "dlt":
    out["dgamma"] = _unparam(dgamma, shape)
  return out


def init_alpha_np(w, granularity):
  """ParetoQ `train.py` at w_bits 0: max|W| over each group."""
  rows = np.abs(_rows(w, granularity)).max(-1, keepdims=True)
  return _unparam(rows, _param_shape(granularity, *np.shape(w)))


# ----------------------------------------------------------------------------
# Tequila: absmean ternarization, learned λ, and the official ultraquantv3.
# ----------------------------------------------------------------------------


def absmean_np(w, granularity):
  """`absmean` + the masks of `UltraQuantV3.forward`, in `[in, out]`:
  returns (codes, A = codes * scale, B = W on the deadzone, scale broadcast,
  deadzone mask)."""
  w = np.asarray(w, np.float64)
  rows = _rows(w, granularity)
  scale = np.abs(rows).mean(-1, keepdims=True)
  delta = scale / 2
  t = np.where(rows >= delta, 1.0, np.where(rows <= -delta, -1.0, 0.0))
  a = t * scale
  mask_b = a == 0
  b = np.where(mask_b, rows, 0.0)
  un = functools.partial(_unrows, d_in=w.shape[0], d_out=w.shape[1])
  return (un(t).astype(np.int8), un(a), un(b),
          un(np.broadcast_to(scale, rows.shape)), un(mask_b))


def tequila_lambda_np(x, w, g, granularity, lam):
  """Tequila with a per-output-unit λ `[out]` (or scalar): y = x A + c,
  c_j = λ_j Σ_{i∈D} W_ij; dW = xᵀg + [i∈D] λ_j Σ_t g_tj; dλ_j = Σ_t g_tj ·
  Σ_{i∈D} W_ij."""
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  _, a, b, _, dead = absmean_np(w, granularity)
  xf, gf = x.reshape(-1, w.shape[0]), g.reshape(-1, w.shape[1])
  lam = np.broadcast_to(np.asarray(lam, np.float64), (w.shape[1],))
  dead_sum = b.sum(0)
  gsum = gf.sum(0)
  return {"y": x @ a + lam * dead_sum, "dx": g @ a.T,
          "dw": xf.T @ gf + dead * lam * gsum, "dlam": gsum * dead_sum,
          "c": lam * dead_sum}


def v3_np(x, w, lam_w, g, granularity, *, scale_active=True):
  """The official `ultraquantv3` layer in `[in, out]` (Λ = lam_w `[in, out]`,
  the transpose of `Lambada`):

    forward  (UltraQuantLinear.forward): y = x Aᵀ + ones (B * Λ.detach())ᵀ
    backward (UltraQuantV3.backward): grad = grad_A, grad[mask_B] =
      grad_B[mask_B], then times `scale` everywhere except on mask_B:
      dW = scale * dA on active weights, dB on the deadzone, with dA = gᵀx and
      dB = Λ * gᵀ ones.
    update_lambada_v3(x.detach(), B.detach()): x -> [T, in], Y = x Bᵀ,
      s = Σ_in Λ * B, loss = Σ (Y - s)² / T, Lambada.grad = dloss/dΛ
      = -2/T * B * Σ_t (Y - s).

  `scale_active=False` is the WRONG plain-STE variant (tests only)."""
  x, w, lam_w, g = (np.asarray(a, np.float64) for a in (x, w, lam_w, g))
  codes, a, b, scale, dead = absmean_np(w, granularity)
  xf, gf = x.reshape(-1, w.shape[0]), g.reshape(-1, w.shape[1])
  t = xf.shape[0]
  y = x @ a + (b * lam_w).sum(0)
  grad_a = xf.T @ gf
  grad_b = lam_w * gf.sum(0)
  dw = np.where(dead, grad_b, grad_a * (scale if scale_active else 1.0))
  big_y = xf @ b
  s = (lam_w * b).sum(0)
  dlam = -2.0 / t * b * (big_y - s).sum(0)
  return {"y": y, "dx": g @ a.T, "dw": dw, "dlam": dlam, "codes": codes,
          "scale": scale, "c": (b * lam_w).sum(0)}


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def _special_data(method, granularity, seed=0, x_shape=(2, 3, D_IN)):
  """x, w, g and explicit qparams with clipped weights (alpha = 0.6 of the
  init), and column 0's first group forced to alpha = TIE_ALPHA with exact
  ties and boundary weights in w[0:8, 0]."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=x_shape)
  w = rng.normal(size=(D_IN, D_OUT)) * 0.05
  g = rng.normal(size=x_shape[:-1] + (D_OUT,))
  alpha = 0.6 * init_alpha_np(w, granularity)
  alpha[0, 0] = TIE_ALPHA  # the group holding w[0:16, 0] in every layout
  a = TIE_ALPHA
  w[:8, 0] = [a / 2, -a / 2,   # lsq/dlt ties: r = ±0.5 -> 0 (half to even)
              a / 3, -a / 3,   # seq ties: 1.5 * r rounds to exactly ±0.5 -> 0
              a,               # r = 1: inside the lsq clip range (q_w > Qp strict)
              0.995 * a,       # seq: beyond clip_val .99, STE off, level 2/3
              -1.3 * a,        # clipped for every method
              1.6 * a]         # lsq: round(1.6) = 2 -> clamp to 1
  qp = {"alpha": alpha}
  if method == "dlt":
    qp["gamma"] = rng.normal(size=alpha.shape) * 0.01
  return x, w, g, qp


def _loss(cfg, x, w, qp, g):
  return jnp.sum(quant.quantized_matmul(x, w, cfg, qp) * g)


def _y_and_grads(cfg, x, w, qp, g, jit=False):
  def f(x, w, qp, g):
    y = quant.quantized_matmul(x, w, cfg, qp)
    grads = jax.grad(functools.partial(_loss, cfg), (0, 1, 2))(x, w, qp, g)
    return (y, *grads)
  if jit:
    f = jax.jit(f)
  args = jax.tree.map(jnp.asarray, (x, w, qp, g))
  return jax.tree.map(np.asarray, f(*args))


def _check_learned(got, want, method, rtol=1e-12, atol=1e-13):
  y, dx, dw, dqp = got
  np.testing.assert_allclose(y, want["y"], rtol=rtol, atol=atol, err_msg="y")
  np.testing.assert_allclose(dx, want["dx"], rtol=rtol, atol=atol, err_msg="dx")
  np.testing.assert_allclose(dw, want["dw"], rtol=rtol, atol=atol, err_msg="dW")
  np.testing.assert_allclose(dqp["alpha"], want["dalpha"], rtol=rtol, atol=atol,
                             err_msg="dalpha")
  if method == "dlt":
    np.testing.assert_allclose(dqp["gamma"], want["dgamma"], rtol=rtol,
                               atol=atol, err_msg="dgamma")
  assert set(dqp) == ({"alpha", "gamma"} if method == "dlt" else {"alpha"})


def _differs(a, b, tol=1e-8):
  return np.max(np.abs(np.asarray(a) - np.asarray(b))) > tol


# ----------------------------------------------------------------------------
# 1. LSQ / SEQ / DLT forward and gradients.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("method", LEARNED)
def test_learned_scale_matches_reference(x64, method, granularity):
  x, w, g, qp = _special_data(method, granularity)
  cfg = _cfg(method, granularity)
  want = learned_layer_np(x, w, g, method, granularity, qp)
  _check_learned(_y_and_grads(cfg, x, w, qp, g), want, method)
  _check_learned(_y_and_grads(cfg, x, w, qp, g, jit=True), want, method)

  # The constructed weights are what they claim to be ...
  r = w[:8, 0] / TIE_ALPHA
  assert r[0] == 0.5 and r[1] == -0.5
  assert np.all(np.clip(r[2:4], -SEQ_CLIP, SEQ_CLIP) * SEQ_LEVELS == [0.5, -0.5])
  assert np.mean(np.abs(w) > _expand(qp["alpha"], D_IN, D_OUT)) > 0.02
  # ... and the reference pins down the behaviour at them:
  codes = want["codes"][:8, 0]
  if method == "seq":
    np.testing.assert_array_equal(codes, [1, -1, 0, 0, 1, 1, -1, 1])
    np.testing.assert_allclose(want["q"][5, 0], TIE_ALPHA / 1.5, rtol=1e-15)
    assert want["dw"][5, 0] == 0.0 and want["dw"][4, 0] == 0.0  # r > .99
  else:
    np.testing.assert_array_equal(codes, [0, 0, 0, 0, 1, 1, -1, 1])
    assert want["dw"][4, 0] != 0.0 and want["dw"][6, 0] == 0.0
  # Plausible wrong variants give measurably different numbers, so the
  # comparison above can fail: round half away from zero (ties),
  rnd_away = learned_layer_np(x, w, g, method, granularity, qp,
                              rnd=_round_half_away)
  assert _differs(rnd_away["y"], want["y"]) and _differs(
      rnd_away["dalpha"], want["dalpha"])
  # an unmasked STE,
  assert _differs(learned_layer_np(x, w, g, method, granularity, qp,
                                   mask_ste=False)["dw"], want["dw"])
  # SEQ's clipped weights with the forward's coefficient 2/3 instead of 1.
  if method == "seq":
    assert _differs(learned_layer_np(x, w, g, method, granularity, qp,
                                     seq_clip_coef=1 / 1.5)["dalpha"],
                    want["dalpha"])


@pytest.mark.parametrize("method", LEARNED)
def test_alpha_below_eps_is_clamped_and_still_gets_a_gradient(x64, method):
  """alpha <= 1e-5 quantizes with 1e-5; the Function returns its
  grad_alpha (computed at the clamped value) for the raw alpha, not zero."""
  x, w, g, qp = _special_data(method, "per_channel", seed=1)
  qp["alpha"][0, 1] = 1e-7
  qp["alpha"][0, 2] = -0.3
  qp["alpha"][0, 3] = ALPHA_EPS
  cfg = _cfg(method, "per_channel")
  want = learned_layer_np(x, w, g, method, "per_channel", qp)
  _check_learned(_y_and_grads(cfg, x, w, qp, g), want, method)
  q = want["q"][:, 1:4] - (qp["gamma"][0, 1:4] if method == "dlt" else 0.0)
  lev = 1 / 1.5 if method == "seq" else 1.0
  np.testing.assert_allclose(np.abs(q), ALPHA_EPS * lev, rtol=1e-11)
  assert np.all(np.abs(want["dalpha"][0, 1:4]) > 1e-3)
  assert np.all(want["dw"][:, 1:4] == 0.0)


@pytest.mark.parametrize("method", LEARNED)
def test_learned_scale_under_jit_vmap_scan(x64, method):
  granularity = "per_group"
  cfg = _cfg(method, granularity)
  data = [_special_data(method, granularity, seed=10 + k, x_shape=(5, D_IN))
          for k in range(3)]
  xs, ws, gs = (np.stack([d[i] for d in data]) for i in range(3))
  qps = jax.tree.map(lambda *a: np.stack(a), *[d[3] for d in data])
  wants = [learned_layer_np(*d[:3], method, granularity, d[3]) for d in data]

  grad = jax.grad(functools.partial(_loss, cfg), (0, 1, 2))
  vm = jax.jit(jax.vmap(grad))(*map(jnp.asarray, (xs, ws)),
                               jax.tree.map(jnp.asarray, qps), jnp.asarray(gs))

  def scanned(ws, qps, xs, gs):
    def body(acc, layer):
      w, qp, x, g = layer
      return acc + _loss(cfg, x, w, qp, g), None
    return jax.lax.scan(body, jnp.zeros((), jnp.float64), (ws, qps, xs, gs))[0]

  sc = jax.jit(jax.grad(scanned, (0, 1)))(
      jnp.asarray(ws), jax.tree.map(jnp.asarray, qps), jnp.asarray(xs),
      jnp.asarray(gs))
  ys = jax.vmap(lambda x, w, qp: quant.quantized_matmul(x, w, cfg, qp))(
      jnp.asarray(xs), jnp.asarray(ws), jax.tree.map(jnp.asarray, qps))
  for k, want in enumerate(wants):
    np.testing.assert_allclose(ys[k], want["y"], rtol=1e-12, atol=1e-13)
    for got_dw, got_qp in ((vm[1][k], jax.tree.map(lambda a: a[k], vm[2])),
                           (sc[0][k], jax.tree.map(lambda a: a[k], sc[1]))):
      np.testing.assert_allclose(got_dw, want["dw"], rtol=1e-12, atol=1e-13)
      np.testing.assert_allclose(got_qp["alpha"], want["dalpha"], rtol=1e-12,
                                 atol=1e-13)
      if method == "dlt":
        np.testing.assert_allclose(got_qp["gamma"], want["dgamma"], rtol=1e-12,
                                   atol=1e-13)
    np.testing.assert_allclose(vm[0][k], want["dx"], rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------
# 2. init_qparams, threshold_stats, ternary_state.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("method", LEARNED)
def test_init_qparams_is_paretoq_init(x64, method, granularity):
  rng = np.random.default_rng(2)
  w = rng.normal(size=(D_IN, D_OUT)) * 0.05
  qp = quant.init_qparams(jnp.asarray(w), _cfg(method, granularity))
  assert set(qp) == ({"alpha", "gamma"} if method == "dlt" else {"alpha"})
  want = init_alpha_np(w, granularity)
  assert np.shape(qp["alpha"]) == _param_shape(granularity)
  np.testing.assert_array_equal(qp["alpha"], want)
  # by hand: the group of w[0:16, 0] in each layout
  block = {"per_group": w[:G, 0], "per_channel": w[:, 0],
           "per_tensor": w}[granularity]
  assert np.asarray(qp["alpha"])[0, 0] == np.abs(block).max()
  if method == "dlt":
    assert np.shape(qp["gamma"]) == np.shape(want)
    assert np.all(np.asarray(qp["gamma"]) == 0)


@pytest.mark.parametrize("cfg_kw, keys", [
    (dict(method="tequila"), set()),
    (dict(method="tequila", lam_mode="fixed"), set()),
    (dict(method="absmean"), set()),
    (dict(method="tequila", lam_mode="per_layer"), {"lam_log"}),
    (dict(method="tequila", lam_mode="per_channel"), {"lam_log"}),
], ids=["tequila", "fixed", "absmean", "per_layer", "per_channel"])
def test_init_qparams_other_methods(x64, cfg_kw, keys):
  w = jnp.asarray(np.random.default_rng(3).normal(size=(D_IN, D_OUT)) * 0.05)
  qp = quant.init_qparams(w, _cfg(**cfg_kw), key=jax.random.PRNGKey(0))
  assert set(qp) == keys
  if keys:
    shape = () if cfg_kw["lam_mode"] == "per_layer" else (D_OUT,)
    assert np.shape(qp["lam_log"]) == shape
    assert np.all(np.asarray(qp["lam_log"]) == 0)


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("method", LEARNED)
def test_threshold_stats_and_ternary_state(x64, method, granularity):
  x, w, g, qp = _special_data(method, granularity, seed=4)
  cfg = _cfg(method, granularity)
  want = learned_layer_np(x, w, g, method, granularity, qp)
  alpha = _expand(qp["alpha"], D_IN, D_OUT)
  delta = alpha / (3.0 if method == "seq" else 2.0)
  args = (jnp.asarray(w), cfg, jax.tree.map(jnp.asarray, qp))

  codes, r = (np.asarray(a) for a in quant.threshold_stats(*args))
  assert codes.dtype == np.int8 and codes.shape == r.shape == w.shape
  np.testing.assert_array_equal(codes, want["codes"])
  np.testing.assert_allclose(r, np.abs(w) / delta, rtol=1e-13)
  # Deadzone |W| < Delta away from ties; the exact ties (r == 1) are in it.
  rr = np.abs(w) / delta
  clear = np.abs(rr - 1) > 1e-9
  np.testing.assert_array_equal((codes == 0)[clear], (rr < 1)[clear])
  ties = [(0, 0), (1, 0)] if method != "seq" else [(2, 0), (3, 0)]
  for i, j in ties:
    assert r[i, j] == pytest.approx(1.0, abs=1e-15) and codes[i, j] == 0
  assert (~clear).sum() == 2  # the threshold is not alpha/3 for lsq, alpha/2 for seq

  st = quant.ternary_state(*args)
  assert np.asarray(st.codes).dtype == np.int8
  np.testing.assert_array_equal(st.codes, want["codes"])
  s_alpha = _expand(st.alpha, D_IN, D_OUT)
  clamped = np.where(alpha > ALPHA_EPS, alpha, ALPHA_EPS)
  np.testing.assert_allclose(
      s_alpha, clamped * (2 / 3 if method == "seq" else 1.0), rtol=1e-15)
  q = np.asarray(st.codes, np.float64) * s_alpha
  if method == "dlt":
    np.testing.assert_array_equal(st.gamma, qp["gamma"])
    q = q + _expand(st.gamma, D_IN, D_OUT)
  else:
    assert st.gamma is None
  np.testing.assert_allclose(q, want["q"], rtol=1e-15, atol=0)
  # exactly the training Q: x = I reads Q out of the matmul.
  q_train = quant.quantized_matmul(jnp.eye(D_IN, dtype=jnp.float64), *args)
  np.testing.assert_array_equal(q, q_train)
  np.testing.assert_array_equal(st.c, np.zeros(D_OUT))


@pytest.mark.parametrize("granularity", GRANS)
def test_threshold_stats_absmean_tequila(x64, granularity):
  w = np.random.default_rng(5).normal(size=(D_IN, D_OUT)) * 0.05
  codes_ref, _, _, scale, _ = absmean_np(w, granularity)
  for cfg in (_cfg("absmean", granularity), _cfg("tequila", granularity),
              _cfg("tequila", granularity, lam_mode="per_channel")):
    qp = quant.init_qparams(jnp.asarray(w), cfg)
    codes, r = quant.threshold_stats(jnp.asarray(w), cfg, qp)
    np.testing.assert_array_equal(codes, codes_ref)
    np.testing.assert_allclose(r, np.abs(w) / (scale / 2), rtol=1e-13)


# ----------------------------------------------------------------------------
# 3. Tequila with a learned λ (per layer / per output unit).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["per_group", "per_channel"])
@pytest.mark.parametrize("lam_mode", ["per_layer", "per_channel"])
def test_tequila_learned_lambda(x64, lam_mode, granularity):
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 3, D_IN))
  w = rng.normal(size=(D_IN, D_OUT)) * 0.05
  g = rng.normal(size=(2, 3, D_OUT))
  cfg = _cfg("tequila", granularity, lam=0.05, lam_mode=lam_mode)
  theta = (rng.normal(size=()) if lam_mode == "per_layer"
           else rng.normal(size=(D_OUT,))) * 0.7
  qp = {"lam_log": theta}
  lam = 0.05 * np.exp(theta)
  want = tequila_lambda_np(x, w, g, granularity, lam)
  y, dx, dw, dqp = _y_and_grads(cfg, x, w, qp, g)
  y_j, dx_j, dw_j, dqp_j = _y_and_grads(cfg, x, w, qp, g, jit=True)
  dtheta = want["dlam"] * lam
  if lam_mode == "per_layer":
    dtheta = dtheta.sum()
  for got in ((y, dx, dw, dqp), (y_j, dx_j, dw_j, dqp_j)):
    for name, a, b in zip(("y", "dx", "dW"), got[:3],
                          (want["y"], want["dx"], want["dw"])):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13, err_msg=name)
    assert set(got[3]) == {"lam_log"}
    np.testing.assert_allclose(got[3]["lam_log"], dtheta, rtol=1e-11,
                               atol=1e-14)
  # central finite difference of the loss in theta (float64; the loss is
  # exp-linear in theta, so O(h^2) error ~1e-12).
  h = 1e-5
  loss = jax.jit(lambda t: _loss(cfg, jnp.asarray(x), jnp.asarray(w),
                                 {"lam_log": t}, jnp.asarray(g)))
  fd = np.zeros_like(theta)
  for idx in np.ndindex(np.shape(theta)):
    e = np.zeros_like(theta)
    e[idx] = h
    fd[idx] = (loss(theta + e) - loss(theta - e)) / (2 * h)
  np.testing.assert_allclose(dqp["lam_log"], fd, rtol=1e-7, atol=1e-10)
  assert np.all(np.abs(dtheta) > 1e-6)
  # The learned λ is used: lam alone (theta ignored) gives different numbers.
  assert _differs(tequila_lambda_np(x, w, g, granularity, 0.05)["y"], want["y"])
  st = quant.ternary_state(jnp.asarray(w), cfg, jax.tree.map(jnp.asarray, qp))
  np.testing.assert_allclose(st.c, want["c"], rtol=1e-12, atol=1e-15)
  # theta = 0 (the init) is the fixed-λ layer.
  qp0 = quant.init_qparams(jnp.asarray(w), cfg)
  got0 = _y_and_grads(cfg, x, w, qp0, g)
  want0 = tequila_lambda_np(x, w, g, granularity, 0.05)
  for a, b in zip(got0[:3], (want0["y"], want0["dx"], want0["dw"])):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("granularity", GRANS)
def test_fixed_lam_mode_is_plain_tequila_bit_for_bit(x64, granularity):
  """The fixed λ (today's constant-λ custom_vjp path) equals, bit for bit,
  the learned-λ path at θ = 0 (λ = lam · exp(0), an array with its own
  gradient), and both equal the float64 closed form."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 3, D_IN)))
  w = jnp.asarray(rng.normal(size=(D_IN, D_OUT)) * 0.05)
  g = jnp.asarray(rng.normal(size=(2, 3, D_OUT)))
  outs = []
  for mode in ("fixed", "per_layer", "per_channel"):
    cfg = _cfg("tequila", granularity, lam=0.03, lam_mode=mode)
    qp = quant.init_qparams(w, cfg)
    y, pull = jax.vjp(lambda x, w: quant.quantized_matmul(x, w, cfg, qp),
                      x, w)
    outs.append((y, *pull(g)))
  for other in outs[1:]:
    for a, b in zip(outs[0], other):
      np.testing.assert_array_equal(a, b)
  want = tequila_lambda_np(x, w, g, granularity, 0.03)
  np.testing.assert_allclose(outs[0][0], want["y"], rtol=1e-12, atol=1e-13)
  np.testing.assert_allclose(outs[0][2], want["dw"], rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------
# 4. v3: the official ultraquantv3 (per-weight Λ fitted by a local regression).
# ----------------------------------------------------------------------------


def _v3_data(seed, lam_std=0.01):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 3, D_IN))
  w = rng.normal(size=(D_IN, D_OUT)) * 0.05
  g = rng.normal(size=(2, 3, D_OUT))
  lam_w = rng.normal(size=(D_IN, D_OUT)) * lam_std
  return x, w, g, lam_w


@pytest.mark.parametrize("granularity", ["per_group", "per_channel"])
def test_v3_matches_official(x64, granularity):
  x, w, g, lam_w = _v3_data(8)
  cfg = _cfg("tequila", granularity, lam_mode="v3", lam_std=0.01)
  qp = {"lam_weight": lam_w}
  want = v3_np(x, w, lam_w, g, granularity)
  for jit in (False, True):
    y, dx, dw, dqp = _y_and_grads(cfg, x, w, qp, g, jit=jit)
    np.testing.assert_allclose(y, want["y"], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, want["dx"], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dw, want["dw"], rtol=1e-12, atol=1e-13)
    assert set(dqp) == {"lam_weight"}
    np.testing.assert_allclose(dqp["lam_weight"], want["dlam"], rtol=1e-12,
                               atol=1e-15)
  # Can fail: the plain STE on active weights, or the autodiff gradient of the
  # forward in Λ (B * Σ_t g), are different numbers.
  assert _differs(v3_np(x, w, lam_w, g, granularity, scale_active=False)["dw"],
                  want["dw"], 1e-6)
  dead = want["codes"] == 0
  assert _differs(np.where(dead, w, 0) * np.asarray(g).reshape(-1, D_OUT).sum(0),
                  want["dlam"], 1e-6)
  st = quant.ternary_state(jnp.asarray(w), cfg, {"lam_weight": jnp.asarray(lam_w)})
  np.testing.assert_array_equal(st.codes, want["codes"])
  np.testing.assert_allclose(st.c, want["c"], rtol=1e-12, atol=1e-15)


def test_v3_init(x64):
  w = jnp.asarray(np.random.default_rng(9).normal(size=(256, 64)) * 0.05)
  cfg = QuantConfig(method="tequila", granularity="per_group", group_size=64,
                    lam_mode="v3", lam_std=0.02)
  qp = quant.init_qparams(w, cfg, key=jax.random.PRNGKey(1))
  assert set(qp) == {"lam_weight"}
  lam_w = np.asarray(qp["lam_weight"])
  assert lam_w.shape == (256, 64)
  assert abs(lam_w.std() / 0.02 - 1) < 0.05 and abs(lam_w.mean()) < 0.02 * 0.05
  again = quant.init_qparams(w, cfg, key=jax.random.PRNGKey(1))
  other = quant.init_qparams(w, cfg, key=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(again["lam_weight"], lam_w)
  assert not np.array_equal(other["lam_weight"], lam_w)


def _adamw_np(p, grad, m, v, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
  m = b1 * m + (1 - b1) * grad
  v = b2 * v + (1 - b2) * grad * grad
  m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
  return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


@pytest.mark.parametrize("granularity", ["per_group", "per_channel"])
def test_v3_adamw_steps(x64, granularity):
  """The official training loop: the main optimizer (HF AdamW, wd 0) steps W
  with the task gradient and Λ with the gradient update_lambada_v3 left in
  Lambada.grad (the layer's own AdamW never steps)."""
  n_steps = 4
  rng = np.random.default_rng(11)
  w = rng.normal(size=(D_IN, D_OUT)) * 0.05
  xs = rng.normal(size=(n_steps, 2, 3, D_IN))
  gs = rng.normal(size=(n_steps, 2, 3, D_OUT))
  cfg = _cfg("tequila", granularity, lam_mode="v3", lam_std=0.01)
  lam_w = np.asarray(quant.init_qparams(jnp.asarray(w), cfg,
                                        key=jax.random.PRNGKey(3))["lam_weight"])
  assert lam_w.shape == (D_IN, D_OUT)

  params = {"w": jnp.asarray(w), "qp": {"lam_weight": jnp.asarray(lam_w)}}
  opt = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, g):
    grads = jax.grad(lambda p: _loss(cfg, x, p["w"], p["qp"], g))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  ref = {"w": w.copy(), "lam": lam_w.copy()}
  mom = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in ref.items()}
  ever_dead = np.zeros(w.shape, bool)
  for t in range(1, n_steps + 1):
    params, state = step(params, state, jnp.asarray(xs[t - 1]),
                         jnp.asarray(gs[t - 1]))
    want = v3_np(xs[t - 1], ref["w"], ref["lam"], gs[t - 1], granularity)
    ever_dead |= want["codes"] == 0
    for k, grad in (("w", want["dw"]), ("lam", want["dlam"])):
      ref[k], *mom[k] = _adamw_np(ref[k], grad, *mom[k], t)
    np.testing.assert_allclose(params["w"], ref["w"], rtol=1e-10, atol=1e-13,
                               err_msg=f"W after step {t}")
    np.testing.assert_allclose(params["qp"]["lam_weight"], ref["lam"],
                               rtol=1e-10, atol=1e-13,
                               err_msg=f"lam_weight after step {t}")
  # Both moved; Λ only where the weight was ever in the deadzone (B = 0
  # elsewhere, so its regression gradient is exactly 0).
  moved = ref["lam"] != lam_w
  assert 0.2 < ever_dead.mean() < 0.6 and np.all(moved == ever_dead)
  assert np.max(np.abs(ref["w"] - w)) > 1e-3
