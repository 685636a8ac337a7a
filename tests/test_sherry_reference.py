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
