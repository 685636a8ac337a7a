"""Sherry (3:4 ternary + Arenas) against the official code's math.

Part 1 checks the float64 numpy transcription (`tests/reference_sherry.py`)
against a torch transcription of the official `NMQuant` / `Arenas` classes
(AngelSlim branch `sherry`, `Sherry/models/utils_quant.py`, written out below
in float64 on CPU torch, `[out, in]` weights as the official): forward,
torch-autograd gradients, the ε schedule (typo included).

Part 2 compares the library's JAX implementation (`method="sherry"`,
`arenas_eps`) in float32 with the float64 reference. The reference takes
and returns `[in, out]` kernels (it transposes to the official `[out, in]`
internally). Tolerances follow from the computation (`tests/tolerances.py`):
the 3:4 selection compares exact fp32 values, so codes are exact in every
program; what rounding remains is the scale's sum over G weights and the
matmuls' sums, bounded by `sum_order_bound` with the reduction lengths.
"""

import math

import numpy as np
import pytest

from tests import reference_sherry as ref
from tests.tolerances import EPS32, assert_within, sum_order_bound

EPS64 = float(np.finfo(np.float64).eps)
D_IN, D_OUT = 64, 24
BATCH = (2, 4)  # 8 tokens
GRANS = (("per_group", 16), ("per_group", 32), ("per_channel", 16),
         ("per_tensor", 16))


def _data(seed, d_in=D_IN, d_out=D_OUT, batch=BATCH):
  """fp32-representable x, W [in, out], cotangent g; W tie-free per block."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((d_in, d_out)).astype(np.float32) * 0.05
  x = rng.standard_normal(batch + (d_in,)).astype(np.float32)
  g = rng.standard_normal(batch + (d_out,)).astype(np.float32)
  blocks = np.sort(np.abs(w.T.reshape(d_out, d_in // 4, 4)), -1)
  assert (np.diff(blocks, axis=-1) > 0).all() and (blocks > 0).all()
  return x, w, g


def _stat_len(granularity, group_size, d_in=D_IN, d_out=D_OUT):
  return {"per_group": group_size, "per_channel": d_in,
          "per_tensor": d_in * d_out}[granularity]


# ----------------------------------------------------------------------------
# Part 1: a torch transcription of the official classes (float64, CPU).
# ----------------------------------------------------------------------------

torch = pytest.importorskip("torch")


class _TorchNM(torch.autograd.Function):
  """The official NMQuant forward (top-k mask per block of M along `in`,
  Σ|kept| / (G/M·N) per group row, sign) with its identity backward."""

  @staticmethod
  def forward(ctx, w, granularity, group_size, n, m):
    d_out, d_in = w.shape
    blocks = w.reshape(d_out, d_in // m, m)
    _, top = torch.topk(blocks.abs(), n, dim=-1)
    keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
    kept = (blocks * keep).reshape(d_out, d_in)
    if granularity == "per_tensor":
      rows = kept.reshape(1, -1)
    elif granularity == "per_channel":
      rows = kept.reshape(d_out, -1)
    else:
      rows = kept.reshape(-1, group_size)
    scale = rows.abs().sum([-1], keepdim=True) / (rows.shape[-1] / m * n)
    return (torch.sign(rows) * scale).reshape(d_out, d_in)

  @staticmethod
  def backward(ctx, grad):
    return grad, None, None, None, None


class _TorchArenas(torch.nn.Linear):
  """The official Arenas layer: a forward counter, the warmup/cosine ε and
  its last branch as written (`self.step`, an attribute no Module has)."""

  def __init__(self, d_in, d_out, granularity, group_size,
               total_steps=ref.OFFICIAL_TOTAL):
    super().__init__(d_in, d_out, bias=False, dtype=torch.float64)
    self.granularity, self.group_size = granularity, group_size
    self.eps, self.steps, self.max_eps = 0, 0, 1
    self.total_steps, self.warmup_step = total_steps, total_steps // 10

  def forward(self, x):
    q = _TorchNM.apply(self.weight, self.granularity, self.group_size, 3,
                       4).to(x.dtype)
    self.steps += 1
    if self.training:
      if self.steps <= self.warmup_step:
        self.eps = self.max_eps * self.steps / self.warmup_step
      elif self.steps < self.total_steps:
        frac = (self.steps - self.warmup_step) / (self.total_steps -
                                                  self.warmup_step)
        self.eps = self.max_eps * (0.5 * (1 + math.cos(math.pi * frac)))
      elif self.step >= self.total_steps:  # official typo: self.step
        self.eps = 0
    else:
      self.eps = 0
    return (torch.nn.functional.linear(x, q) +
            self.eps * torch.nn.functional.linear(x, self.weight))


def _torch_layer(w_in_out, granularity, group_size, **kw):
  layer = _TorchArenas(w_in_out.shape[0], w_in_out.shape[1], granularity,
                       group_size, **kw)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(np.asarray(w_in_out, np.float64).T))
  return layer


@pytest.mark.parametrize("granularity,group_size", GRANS)
def test_numpy_quantizer_matches_torch_transcription(granularity, group_size):
  """Tie-free weights: the numpy N:M mask, scales and Q equal the torch
  top-k transcription's (float64; scales: one Σ of G terms, two orders)."""
  _, w, _ = _data(0)
  codes, alpha, q = ref.nm_quantize(w, granularity, group_size)
  qt = _TorchNM.apply(torch.from_numpy(w.T.astype(np.float64)), granularity,
                      group_size, 3, 4).numpy().T
  k = _stat_len(granularity, group_size) + 1
  assert_within(qt, q, sum_order_bound(np.abs(q), k, EPS64), "Q")
  np.testing.assert_array_equal(np.sign(qt), codes)
  # every block of 4 has exactly one zero code, the smallest |W|
  zeros = (codes.T.reshape(D_OUT, -1, 4) == 0)
  assert (zeros.sum(-1) == 1).all()
  smallest = np.abs(w.T.reshape(D_OUT, -1, 4)).argmin(-1)
  np.testing.assert_array_equal(zeros.argmax(-1), smallest)
  # scale = Σ|kept| / (0.75 G)
  gsz = _stat_len(granularity, group_size)
  kept = np.where(codes != 0, np.abs(w.astype(np.float64)), 0)
  rows = ref._group_rows(kept.T, granularity, group_size)
  want = ref._scale_layout(rows.sum(-1) / (0.75 * gsz), granularity, D_IN,
                           D_OUT, group_size)
  assert_within(alpha, want, sum_order_bound(want, gsz + 1, EPS64), "alpha")


def test_torch_cpu_ties_prune_one_of_the_equal():
  """On ties torch's CPU top-k keeps no fixed index order (e.g. |W| =
  [1, 2, 1, 3] prunes index 0 where the CUDA rule prunes 2), but it always
  prunes one of the equal smallest |W|: the kept |W|, hence the scales,
  are the reference's; the codes differ only at tied positions."""
  vals = np.array([[1, 2, 1, 3], [1, 1, 2, 3], [1, 3, 2, 1], [2, 2, 2, 2],
                   [3, 1, 2, 1], [0, 0, 1, 1], [0, 0, 0, 0], [2, 1, 1, 3]],
                  np.float64) * 0.25
  signs = np.where(np.arange(vals.size).reshape(vals.shape) % 3 == 0, -1, 1)
  w_out_in = (vals * signs).reshape(2, 16)  # 2 outputs, 4 blocks each
  codes, alpha, q = ref.nm_quantize(w_out_in.T, "per_group", 16)
  qt = _TorchNM.apply(torch.from_numpy(w_out_in), "per_group", 16, 3,
                      4).numpy()
  np.testing.assert_array_equal(np.abs(qt).sum(1), np.abs(q.T).sum(1))
  scale_t = np.abs(qt).max(1)
  np.testing.assert_array_equal(scale_t, alpha[0])
  # reference rule: the highest index among the equal smallest is pruned
  for blk, v in enumerate(vals):
    c = codes.T.reshape(-1, 4)[blk]
    pruned = [i for i in range(4) if v[i] == v.min()][-1]
    assert c[pruned] == 0
    kept = [i for i in range(4) if i != pruned]
    np.testing.assert_array_equal(c[kept], np.sign((v * signs.reshape(
        vals.shape)[blk])[kept]))
    # torch CPU: the pruned one is among the equal smallest
    ct = np.sign(qt.reshape(-1, 4)[blk])
    tpruned = [i for i in range(4) if ct[i] == 0 and v[i] != 0]
    assert all(v[i] == v.min() for i in tpruned)


def _cuda_topk_indices(v, k):
  """torch's CUDA top-k selection (TensorTopK.cu, gatherTopK), transcribed:
  the k-th largest value t; every value > t in index order, then values
  == t in index order until k are written."""
  t = np.sort(v)[::-1][k - 1]
  above = [i for i in range(len(v)) if v[i] > t]
  equal = [i for i in range(len(v)) if v[i] == t]
  return above + equal[:k - len(above)]


def test_reference_mask_is_the_cuda_rule():
  """nm_mask keeps what the CUDA top-k keeps, on every block with values in
  {0, 1, 2} (81 blocks, all tie patterns)."""
  import itertools  # pylint: disable=g-import-not-at-top
  blocks = np.array(list(itertools.product([0., 1., 2.], repeat=4)))
  mask = ref.nm_mask(blocks.reshape(1, -1)).reshape(-1, 4)
  for v, got in zip(blocks, mask):
    want = np.zeros(4, bool)
    want[_cuda_topk_indices(v, 3)] = True
    np.testing.assert_array_equal(got, want, err_msg=str(v))


@pytest.mark.parametrize("granularity,group_size", GRANS)
@pytest.mark.parametrize("counter", [1, 2211, 2212, 15000, 22110])
def test_numpy_arenas_matches_torch_autograd(granularity, group_size,
                                             counter):
  """y, dx and dW (torch autograd through the official STE) at the ε the
  official layer computes at its `counter`-th forward."""
  x, w, g = _data(1)
  layer = _torch_layer(w, granularity, group_size)
  layer.steps = counter - 1
  xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
  y = layer(xt)
  (y * torch.from_numpy(g.astype(np.float64))).sum().backward()
  eps = ref.arenas_eps_official(counter)
  assert layer.eps == eps
  y_np = ref.arenas_forward(x, w, granularity, group_size, eps)
  dx_np, dw_np = ref.arenas_grads(x, w, g, granularity, group_size, eps)
  _, _, q = ref.nm_quantize(w, granularity, group_size)
  aw, ax, ag = np.abs(w.astype(np.float64)), np.abs(x), np.abs(g)
  k_stat = _stat_len(granularity, group_size) + 3
  assert_within(y.detach().numpy(), y_np, sum_order_bound(
      ax @ (np.abs(q) + eps * aw), D_IN + k_stat, EPS64), "y")
  assert_within(xt.grad.numpy(), dx_np, sum_order_bound(
      ag @ (np.abs(q) + eps * aw).T, D_OUT + k_stat, EPS64), "dx")
  ax2, ag2 = ax.reshape(-1, D_IN), ag.reshape(-1, D_OUT)
  assert_within(layer.weight.grad.numpy().T, dw_np, sum_order_bound(
      (1 + eps) * ax2.T @ ag2, ax2.shape[0] + 3, EPS64), "dW")


def test_official_schedule_and_typo():
  """The torch layer's ε over its whole life on a short schedule (total 25,
  warmup 2): warmup, cosine, then AttributeError at counter = total (the
  `self.step` typo); eval gives 0 and still advances the counter."""
  total = 25
  _, w, _ = _data(2)
  layer = _torch_layer(w, "per_group", 16, total_steps=total)
  x = torch.zeros((1, D_IN), dtype=torch.float64)
  for c in range(1, total):
    layer(x)
    assert layer.steps == c
    assert layer.eps == ref.arenas_eps_official(c, total), c
  assert ref.arenas_eps_official(2, total) == 1.0
  assert 0 < ref.arenas_eps_official(total - 1, total) < 0.01
  with pytest.raises(AttributeError, match="step"):
    layer(x)
  with pytest.raises(AttributeError, match="step"):
    ref.arenas_eps_official(total, total)
  assert ref.arenas_eps_official(total, total, at_end="zero") == 0.0
  assert ref.arenas_eps_official(total + 7, total, at_end="zero") == 0.0
  layer.eval()
  layer(x)
  assert layer.eps == 0 and layer.steps == total + 1
  # the official constants
  layer = _torch_layer(w, "per_group", 16)
  assert (layer.total_steps, layer.warmup_step, layer.max_eps) == (22111,
                                                                   2211, 1)
  assert ref.arenas_eps_official(2211) == 1.0
  assert ref.arenas_eps_official(1) == 1 / 2211


# ----------------------------------------------------------------------------
# Part 2: the library's JAX implementation (float32) vs the reference.
# ----------------------------------------------------------------------------

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tequila_jax import quant  # noqa: E402
from tequila_jax.quant import QuantConfig  # noqa: E402

EPS_ARENAS = float(np.float32(0.3))  # an ε > 0, exact in fp32


def _cfg(granularity, group_size):
  return QuantConfig(method="sherry", granularity=granularity,
                     group_size=group_size)


def _arenas_eps():
  from tequila_jax.quant import arenas_eps  # pylint: disable=g-import-not-at-top
  return arenas_eps


def _layer(w, cfg):
  from tequila_jax.layers import TernaryDense  # pylint: disable=g-import-not-at-top
  layer = TernaryDense(w.shape[0], w.shape[1], quant_config=cfg,
                       dtype=jnp.float32, param_dtype=jnp.float32,
                       rngs=nnx.Rngs(0))
  layer.kernel[...] = jnp.asarray(w)
  return layer


def _tolerances(x, w, g, granularity, group_size, eps, tokens=None):
  """Per-entry bounds on |fp32 - exact| for (y, dx, dW): each entry is a dot
  product (k = its length) over terms |x|(|Q| + ε|W|) (y), |g|(|Q| + ε|W|)
  (dx), (1 + ε)|x||g| (dW); Q's scale carries the rounding of its Σ over the
  group (G_s terms) and a division; Q + εW (or two paths added) two more
  roundings: 2·γ_k·Σ|terms| with k = dot length + G_s + 3 (y, dx) and
  tokens + 3 (dW). The codes are exact (comparisons of exact fp32 values)."""
  _, _, q = ref.nm_quantize(w, granularity, group_size)
  d_in, d_out = w.shape
  aq, aw = np.abs(q), np.abs(np.asarray(w, np.float64))
  ax = np.abs(np.asarray(x, np.float64))
  ag = np.abs(np.asarray(g, np.float64))
  stat = _stat_len(granularity, group_size, d_in, d_out)
  ax2, ag2 = ax.reshape(-1, d_in), ag.reshape(-1, d_out)
  tokens = tokens or ax2.shape[0]
  return (sum_order_bound(ax @ (aq + eps * aw), d_in + stat + 3),
          sum_order_bound(ag @ (aq + eps * aw).T, d_out + stat + 3),
          sum_order_bound((1 + eps) * ax2.T @ ag2, tokens + 3))


def _check(got, x, w, g, granularity, group_size, eps, what, tokens=None):
  y, dx, dw = got
  tols = _tolerances(x, w, g, granularity, group_size, eps, tokens)
  want_y = ref.arenas_forward(x, w, granularity, group_size, eps)
  want_dx, want_dw = ref.arenas_grads(x, w, g, granularity, group_size, eps)
  for name, a, b, t in zip(("y", "dx", "dW"), (y, dx, dw),
                           (want_y, want_dx, want_dw), tols):
    assert_within(a, b, t, f"{what} {name}")


@pytest.mark.parametrize("granularity,group_size", GRANS)
@pytest.mark.parametrize("eps", [0.0, EPS_ARENAS])
def test_layer_matches_reference(granularity, group_size, eps):
  """TernaryDense(..., method="sherry")(x, arenas_eps=ε) under jit and grad
  (ε traced): y, dx, dW against the float64 reference."""
  x, w, g = _data(3)
  layer = _layer(w, _cfg(granularity, group_size))
  graphdef, state = nnx.split(layer)

  def loss(state, x, eps):
    y = nnx.merge(graphdef, state)(x, arenas_eps=eps)
    return jnp.sum(y * g), y

  (_, y), (dstate, dx) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(state, jnp.asarray(x),
                                           jnp.float32(eps))
  dw = nnx.to_pure_dict(dstate)["kernel"]
  _check((y, dx, dw), x, w, g, granularity, group_size, eps, "layer jit")
  # eager, ε as a Python float (and the default ε = 0)
  y_eager = layer(jnp.asarray(x), arenas_eps=eps)
  assert_within(y_eager, ref.arenas_forward(x, w, granularity, group_size,
                                            eps),
                _tolerances(x, w, g, granularity, group_size, eps)[0],
                "layer eager y")
  if eps == 0.0:
    assert_within(layer(jnp.asarray(x)), y_eager,
                  2 * _tolerances(x, w, g, granularity, group_size, 0.)[0],
                  "default eps")


@pytest.mark.parametrize("granularity,group_size", GRANS[1:])
@pytest.mark.parametrize("eps", [0.0, EPS_ARENAS])
def test_pure_function_in_scan(granularity, group_size, eps):
  """quantized_matmul scanned over a stack of 3 inputs, differentiated
  through the scan: each slice's y and dx, and dW summed over the 3."""
  rng = np.random.default_rng(4)
  _, w, _ = _data(4)
  xs = rng.standard_normal((3, 8, D_IN)).astype(np.float32)
  gs = rng.standard_normal((3, 8, D_OUT)).astype(np.float32)
  cfg = _cfg(granularity, group_size)

  def loss(w, xs, eps):
    def body(total, xg):
      x, g = xg
      y = quant.quantized_matmul(x, w, cfg, None, arenas_eps=eps)
      return total + jnp.sum(y * g), y
    total, ys = jax.lax.scan(body, jnp.float32(0), (xs, jnp.asarray(gs)))
    return total, ys

  (_, ys), (dw, dxs) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(jnp.asarray(w), jnp.asarray(xs),
                                           jnp.float32(eps))
  want_dw = ref.arenas_grads(xs, w, gs, granularity, group_size, eps)[1]
  tol_dw = _tolerances(xs, w, gs, granularity, group_size, eps,
                       tokens=xs.shape[0] * xs.shape[1] + 3)[2]
  assert_within(dw, want_dw, tol_dw, "scan dW")
  for t in range(3):
    ty, tdx, _ = _tolerances(xs[t], w, gs[t], granularity, group_size, eps)
    assert_within(ys[t], ref.arenas_forward(xs[t], w, granularity,
                                            group_size, eps), ty, "scan y")
    want_dx = ref.arenas_grads(xs[t], w, gs[t], granularity, group_size,
                               eps)[0]
    assert_within(dxs[t], want_dx, tdx, "scan dx")


@pytest.mark.parametrize("granularity,group_size", GRANS)
def test_state_codes_and_scales(granularity, group_size):
  """ternary_state: codes equal the reference exactly (one zero per block of
  4 on tie-free weights, at the smallest |W|), α within its fp32 summation
  bound (Σ of G_s terms + one division: 2·γ_{G_s+1}·α), c = 0, gamma None;
  threshold_stats: the same codes, and for the pruned weight r = |W| /
  smallest kept |W| within the rounding of one division (2u, allowing a
  reciprocal multiply: EPS32)."""
  _, w, _ = _data(5)
  cfg = _cfg(granularity, group_size)
  st = quant.ternary_state(jnp.asarray(w), cfg)
  codes, alpha, _ = ref.nm_quantize(w, granularity, group_size)
  assert st.codes.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(st.codes), codes)
  zeros = np.asarray(st.codes).T.reshape(D_OUT, -1, 4) == 0
  assert (zeros.sum(-1) == 1).all()
  assert st.alpha.shape == alpha.shape
  stat = _stat_len(granularity, group_size)
  assert_within(st.alpha, alpha, sum_order_bound(alpha, stat + 1), "alpha")
  np.testing.assert_array_equal(np.asarray(st.c), 0)
  assert st.gamma is None
  tcodes, r = quant.threshold_stats(jnp.asarray(w), cfg)
  np.testing.assert_array_equal(np.asarray(tcodes), codes)
  r = np.asarray(r)
  # kept at or above 1, pruned below it, up to the division's rounding
  assert (r[codes != 0] >= 1 - EPS32).all()
  assert (r[codes == 0] <= 1 + EPS32).all()
  want_r = ref.threshold_ratio(w)
  pruned = codes == 0
  assert_within(r[pruned], want_r[pruned], EPS32 * want_r[pruned],
                "r of pruned weights")


@pytest.mark.parametrize("granularity,group_size", GRANS)
def test_threshold_stats_kept_ratio(granularity, group_size):
  """The brief's r for a kept weight: |W| / (the smallest kept |W| of its
  block), as for the pruned one (one division: EPS32 relative)."""
  _, w, _ = _data(5)
  codes, _, _ = ref.nm_quantize(w, granularity, group_size)
  _, r = quant.threshold_stats(jnp.asarray(w), _cfg(granularity, group_size))
  want_r = ref.threshold_ratio(w)
  kept = codes != 0
  assert_within(np.asarray(r)[kept], want_r[kept], EPS32 * want_r[kept],
                "r of kept weights")


def _tie_kernel():
  """A [in=16, out=4] kernel (official rows = outputs) of tied blocks."""
  vals = np.array([[.5, .5, .5, .5], [.25, .75, .25, 1.], [.5, .5, .75, 1.],
                   [1., .75, .5, .5], [.75, .25, .5, .25], [1., 1., 1., .5],
                   [0., 0., .5, .75], [0., 0., 0., 0.], [.5, 0., 0., .25],
                   [.25, .5, .25, .25], [0., .5, 0., .5], [1., .5, .75, .25],
                   [.5, .25, .25, .25], [0., .25, .5, 0.], [.75, .75, .75, .75],
                   [.5, .5, .25, .25]], np.float32)
  signs = np.where(np.arange(vals.size).reshape(vals.shape) % 3 == 1, -1, 1)
  w_out_in = (vals * signs).reshape(4, 16)
  return w_out_in.T.astype(np.float32)


@pytest.mark.parametrize("granularity,group_size", [("per_group", 8),
                                                    ("per_channel", 8),
                                                    ("per_tensor", 8)])
def test_ties_and_zeros(granularity, group_size):
  """Among equal smallest |W| the highest index is pruned (the CUDA top-k's
  rule); a kept weight that is exactly 0 has code 0 (sign(0)); an all-zero
  block has four zero codes; scales keep the nominal divisor 0.75·G."""
  w = _tie_kernel()
  cfg = _cfg(granularity, group_size)
  codes, alpha, q = ref.nm_quantize(w, granularity, group_size)
  st = quant.ternary_state(jnp.asarray(w), cfg)
  np.testing.assert_array_equal(np.asarray(st.codes), codes)
  stat = _stat_len(granularity, group_size, *w.shape)
  assert_within(st.alpha, alpha, sum_order_bound(alpha, stat + 1), "alpha")
  blocks = codes.T.reshape(-1, 4)
  np.testing.assert_array_equal(blocks[0], [1, -1, 1, 0])  # [.5]*4, signs
  np.testing.assert_array_equal(np.abs(blocks[2]), [1, 0, 1, 1])
  np.testing.assert_array_equal(np.abs(blocks[6]), [0, 0, 1, 1])  # kept 0
  np.testing.assert_array_equal(blocks[7], [0, 0, 0, 0])
  tcodes, _ = quant.threshold_stats(jnp.asarray(w), cfg)
  np.testing.assert_array_equal(np.asarray(tcodes), codes)
  x = np.random.default_rng(6).standard_normal((5, 16)).astype(np.float32)
  g = np.ones((5, 4), np.float32)
  y = quant.quantized_matmul(jnp.asarray(x), jnp.asarray(w), cfg, None,
                             arenas_eps=0.0)
  assert_within(y, x.astype(np.float64) @ q,
                _tolerances(x, w, g, granularity, group_size, 0.0)[0], "y")


@pytest.mark.parametrize("granularity,group_size", GRANS)
def test_eps0_is_codes_times_alpha(granularity, group_size):
  """At ε = 0, y = x @ (codes · α) of ternary_state (same values, possibly
  another summation order: 2·γ_in·Σ|x||Q|)."""
  x, w, _ = _data(7)
  cfg = _cfg(granularity, group_size)
  st = quant.ternary_state(jnp.asarray(w), cfg)
  qd = np.asarray(quant.dequantize(st.codes, st.alpha), np.float64)
  y = quant.quantized_matmul(jnp.asarray(x), jnp.asarray(w), cfg, None,
                             arenas_eps=0.0)
  assert_within(y, x.astype(np.float64) @ qd,
                sum_order_bound(np.abs(x) @ np.abs(qd), D_IN), "y")


def test_shapes_must_be_multiples_of_4():
  """in and the group size must be multiples of M = 4 (ValueError)."""
  from tequila_jax.layers import TernaryDense  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError):
    TernaryDense(12, 8, quant_config=_cfg("per_group", 6), dtype=jnp.float32,
                 rngs=nnx.Rngs(0))
  for gran in ("per_channel", "per_tensor"):
    with pytest.raises(ValueError):
      TernaryDense(18, 8, quant_config=_cfg(gran, 16), dtype=jnp.float32,
                   rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
      quant.quantized_matmul(jnp.ones((2, 18)), jnp.ones((18, 8)),
                             _cfg(gran, 16), None, arenas_eps=0.0)


# ε schedule: for 0-based optimizer step s, the official ε at counter s + 1.
TOTALS = (100, 1234, 22111, 57, 7)


def _schedule_steps(total):
  w = total // 10
  return sorted({0, 1, max(w - 2, 0), max(w - 1, 0), w, w + 1,
                 (w + total) // 2, total - 3, total - 2, total - 1, total,
                 total + 5} - {-1})


def _eps_tol(value):
  """fp32 evaluation of the schedule against float64: the ratio c / w or
  (c - w) / (T - w) rounds once (integers are exact), π·p once, cos to a
  few ulp, 1 + cos and ·max_eps once each: |dε/dp| <= π/2, so about
  (π + 8)·u in all; 8·EPS32 (= 16u) covers it."""
  return 8 * EPS32 * max(1.0, abs(value))


@pytest.mark.parametrize("total", TOTALS)
def test_arenas_eps_matches_official(total):
  """arenas_eps(s, total) = official ε at counter s + 1 (warmup total // 10):
  0-based step 0 is 1/w, step w - 1 the peak 1.0, the last step (s = total
  - 1: the official typo's counter) and after are 0; eager and jit (traced
  step)."""
  arenas_eps = _arenas_eps()
  jitted = jax.jit(lambda s: arenas_eps(s, total))
  for s in _schedule_steps(total):
    want = ref.arenas_eps_official(s + 1, total, at_end="zero")
    got = float(arenas_eps(s, total))
    assert abs(got - want) <= _eps_tol(want), (total, s, got, want)
    got_jit = float(jitted(jnp.int32(s)))
    assert abs(got_jit - want) <= _eps_tol(want), (total, s, got_jit, want)
  w = total // 10
  if w:
    assert float(arenas_eps(w - 1, total)) == pytest.approx(1.0, abs=8 * EPS32)
  assert float(arenas_eps(total - 1, total)) == 0.0
  assert float(arenas_eps(total + 100, total)) == 0.0


def test_arenas_eps_max_eps_and_fraction():
  """max_eps scales the schedule; warmup_fraction sets w = total · fraction
  (0.1: the official total // 10)."""
  arenas_eps = _arenas_eps()
  for s in (0, 50, 99, 400, 998):
    want = ref.arenas_eps_official(s + 1, 1000, warmup=100, max_eps=0.5,
                                   at_end="zero")
    got = float(arenas_eps(s, 1000, warmup_fraction=0.1, max_eps=0.5))
    assert abs(got - want) <= _eps_tol(want), (s, got, want)
    want = ref.arenas_eps_official(s + 1, 1000, warmup=250, at_end="zero")
    got = float(arenas_eps(s, 1000, warmup_fraction=0.25))
    assert abs(got - want) <= _eps_tol(want), (s, got, want)
