"""Sherry (arXiv 2601.07892): a float64 numpy transcription of the official
3:4 ternary quantizer (`NMQuant`) and the Arenas layer (`Arenas`), used as
the oracle for `tequila_jax`'s `method="sherry"`.

Source read (transcribed, not copied): GitHub Tencent/AngelSlim, branch
`sherry` (commit efbee1bdd8bcf795f089b9e8fd4377d04e023a1c, "update Sherry
README (#212)"; the code came with b69f8b3 "add sherry (#200)"), file
`Sherry/models/utils_quant.py`, classes `NMQuant` and `Arenas`; run script
`Sherry/script/train_llama_1b.sh` (N=3, M=4, per_group, group_size 128,
gradient_accumulation_steps 1, gradient_checkpointing False).

The official code works on a torch weight `[out, in]`; the library's kernels
are `[in, out]`. Every function here takes and returns `[in, out]` arrays
(and the library's scale layout `[groups, out]`), transposing to `[out, in]`
at its boundary and following the official operations on `[out, in]` inside.

The official math (weight W `[out, in]`):

* N:M selection. Each row is cut into blocks of M = 4 consecutive inputs
  (`reshape(out, in // M, M)`); `torch.topk(|W|, N=3, dim=-1)` marks the 3
  largest |W| of each block as kept; W_s = W · mask.
* Ties. `torch.topk` does not define which of equal values it returns. The
  CUDA kernel (aten/src/ATen/native/cuda/TensorTopK.cu, `gatherTopK`) first
  writes every value strictly above the k-th value, then fills the rest with
  the values equal to it "in the first seen" (index) order: among equal
  smallest |W| the lower indices are kept, the highest index is pruned. On
  CPU (torch 2.13) the outcome follows its partial sort and is no index rule:
  |W| = [1, 2, 1, 3] prunes index 0, [1, 1, 2, 3] prunes index 1, [1, 3, 2, 1]
  prunes index 3. This reference (and the library) follows the CUDA rule:
  among equal smallest |W| of a block, the highest index is pruned. Any rule
  prunes one of the equal values, so the kept |W| and the scales agree.
* Scale. W_s is reshaped into rows of one group (`per_group`: `reshape(-1, G)`,
  G consecutive inputs of one output; `per_channel`: one row per output,
  G = in; `per_tensor`: one row, G = out·in);
  scale = Σ|W_s| / (G / M · N) = Σ|kept| / (0.75 G), the nominal kept
  count, even where a kept weight is 0.
* Codes = sign(W_s) (torch.sign(0) = 0: a kept weight that is exactly 0 has
  code 0, and a block with two or more zeros has fewer than 3 nonzero codes);
  Q = codes · scale.
* Backward of NMQuant: identity (straight-through), dL/dW = dL/dQ.
* Arenas forward: y = x Qᵀ + ε · x Wᵀ (+ bias): two `F.linear`s, the second
  on the latent weight, so dW = (1 + ε) gᵀx in `[out, in]` ((1+ε) xᵀg in
  `[in, out]`) and dx = g (Q + εW) (`[out, in]`) = g (Q + εW)ᵀ (`[in, out]`).
* ε schedule (`Arenas.forward`): the layer counts its forward calls
  (`self.steps += 1`, before ε is computed, in training and in eval alike);
  with c the count after the increment, w = warmup_step = total // 10
  (hard-coded `22111 // 10`, total_steps = 22111, max_eps = 1):
    training, c <= w:          ε = max_eps · c / w
    training, w < c < total:   ε = max_eps · ½(1 + cos(π (c - w) / (total - w)))
    training, c >= total:      the branch reads `self.step` (a typo for
                               `self.steps`): nn.Module has no such attribute,
                               so the forward raises AttributeError (the
                               evident intent, ε = 0, is never reached)
    eval:                      ε = 0 (the count still advances)
  With one forward per layer per optimizer step (no accumulation, no
  gradient checkpointing, as in the run script), 0-based optimizer step s
  sees c = s + 1; the last step of a `total`-step run (s = total - 1) has
  c = total: the typo branch. The script's `--eps 1e-3` reaches the layer as
  a keyword it ignores (`Arenas` sets `self.eps = 0`, max_eps = 1).
"""

import math

import numpy as np

N, M = 3, 4


def _group_rows(a_out_in, granularity, group_size):
  """The official reshape of a `[out, in]` array into one row per group."""
  if granularity == "per_tensor":
    return a_out_in.reshape(1, -1)
  if granularity == "per_channel":
    return a_out_in.reshape(a_out_in.shape[0], -1)
  if granularity == "per_group":
    return a_out_in.reshape(-1, group_size)
  raise ValueError(granularity)


def _scale_layout(scale_rows, granularity, d_in, d_out, group_size):
  """The per-row scales `[rows, 1]` in the library's layout `[groups, out]`."""
  if granularity == "per_tensor":
    return scale_rows.reshape(1, 1)
  if granularity == "per_channel":
    return scale_rows.reshape(1, d_out)
  return scale_rows.reshape(d_out, d_in // group_size).T


def nm_mask(w_out_in, n=N, m=M):
  """Kept-weight mask `[out, in]` of the 3:4 selection: per block of `m`
  inputs, the `n` largest |W|; among equal |W| the lower index first (the
  CUDA top-k's rule: the highest index among equal smallest is pruned)."""
  d_out, d_in = w_out_in.shape
  a = np.abs(w_out_in).reshape(d_out, d_in // m, m)
  # Stable sort of -|W|: descending |W|, equal values in ascending index.
  order = np.argsort(-a, axis=-1, kind="stable")
  mask = np.zeros(a.shape, bool)
  np.put_along_axis(mask, order[..., :n], True, axis=-1)
  return mask.reshape(d_out, d_in)


def nm_quantize(w_in_out, granularity, group_size, n=N, m=M):
  """`(codes int8 [in, out], scales [groups, out], Q float64 [in, out])` of
  the official `NMQuant` forward (module doc), on `w_in_out` `[in, out]`
  (transposed to the official `[out, in]` here and back on return)."""
  w = np.asarray(w_in_out, np.float64).T  # official layout [out, in]
  d_out, d_in = w.shape
  if d_in % m:
    raise ValueError(f"in={d_in} is not a multiple of M={m}")
  sparse = w * nm_mask(w, n, m)
  rows = _group_rows(sparse, granularity, group_size)
  # scale = sum |kept| / (G / M * N): the nominal number of kept weights.
  scale = np.abs(rows).sum(-1, keepdims=True) / (rows.shape[-1] / m * n)
  codes_rows = np.sign(rows)  # sign(0) = 0
  q = (codes_rows * scale).reshape(d_out, d_in)
  codes = codes_rows.reshape(d_out, d_in).astype(np.int8)
  return (codes.T, _scale_layout(scale, granularity, d_in, d_out, group_size),
          q.T)


def threshold_ratio(w_in_out, n=N, m=M):
  """r = |W| / (the smallest kept |W| of its block of `m`), `[in, out]`: r >= 1
  for kept weights, r <= 1 for the pruned one (= 1 at a tie). Blocks whose
  smallest kept |W| is 0 give inf/nan (not compared)."""
  w = np.asarray(w_in_out, np.float64).T
  d_out, d_in = w.shape
  mask = nm_mask(w, n, m).reshape(d_out, d_in // m, m)
  a = np.abs(w).reshape(d_out, d_in // m, m)
  smallest = np.where(mask, a, np.inf).min(-1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    r = a / smallest
  return r.reshape(d_out, d_in).T


def arenas_forward(x, w_in_out, granularity, group_size, eps):
  """The official `Arenas` forward (no bias), `x[..., in] -> y[..., out]`:
  F.linear(x, Q) + eps · F.linear(x, W) in float64."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w_in_out, np.float64).T  # [out, in]
  _, _, q_in_out = nm_quantize(w_in_out, granularity, group_size)
  q = q_in_out.T
  return x @ q.T + eps * (x @ w.T)


def arenas_grads(x, w_in_out, g, granularity, group_size, eps):
  """`(dx [..., in], dW [in, out])` of `sum(arenas_forward(...) * g)`: the
  NMQuant backward is the identity, so dW_[out,in] = gᵀx (through Q) + ε gᵀx
  (through the latent path) and dx = g (Q + εW)."""
  x = np.asarray(x, np.float64)
  g = np.asarray(g, np.float64)
  w = np.asarray(w_in_out, np.float64).T
  _, _, q_in_out = nm_quantize(w_in_out, granularity, group_size)
  q = q_in_out.T
  dx = g @ q + eps * (g @ w)
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw_out_in = g2.T @ x2 + eps * (g2.T @ x2)
  return dx, dw_out_in.T


OFFICIAL_TOTAL = 22111  # Arenas.total_steps (hard-coded)


def arenas_eps_official(counter, total_steps=OFFICIAL_TOTAL, warmup=None,
                        max_eps=1.0, training=True, at_end="raise"):
  """ε of `Arenas.forward` after its forward counter reached `counter`
  (incremented before use: the first forward has counter 1). `warmup`
  defaults to the official `total_steps // 10`.

  At counter >= total_steps in training the official code reads the missing
  attribute `self.step` and raises AttributeError: `at_end="raise"` does the
  same, `at_end="zero"` returns the evident intent, 0.
  """
  if warmup is None:
    warmup = total_steps // 10
  if not training:
    return 0.0
  if counter <= warmup:
    return max_eps * counter / warmup
  if counter < total_steps:
    progress = (counter - warmup) / (total_steps - warmup)
    return max_eps * (0.5 * (1 + math.cos(math.pi * progress)))
  if at_end == "raise":
    raise AttributeError("'Arenas' object has no attribute 'step'")
  return 0.0
