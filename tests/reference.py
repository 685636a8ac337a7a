"""Independent numpy formulations of the Tequila math used as test oracles."""

import numpy as np


def quantize_np(w, method="absmean", granularity="per_group", group_size=128):
  """Loop-based reference quantizer: returns (codes, Q) for a [in, out] kernel."""
  w = np.asarray(w, np.float64)
  d_in, d_out = w.shape
  codes = np.zeros(w.shape, np.int8)
  q = np.zeros_like(w)
  if granularity == "per_tensor":
    blocks = [(slice(None), slice(None))]
  else:
    g = group_size if granularity == "per_group" else d_in
    blocks = [(slice(s, s + g), slice(j, j + 1))
              for j in range(d_out) for s in range(0, d_in, g)]
  for rows, cols in blocks:
    block = w[rows, cols]
    mean_abs = np.abs(block).mean()
    delta = (0.75 if method == "twn" else 0.5) * mean_abs
    t = np.where(block >= delta, 1, np.where(block <= -delta, -1, 0))
    if method == "twn":
      active = t != 0
      alpha = np.abs(block)[active].mean() if active.any() else 0.0
    else:
      alpha = mean_abs
    codes[rows, cols] = t
    q[rows, cols] = t * alpha
  return codes, q


def decode_in_steps(model, tokens, prefill: int, max_len: int):
  """Logits of `tokens[B, T]` from a prefill of `prefill` tokens followed by
  one-token decode steps through the KV cache; returns (logits, cache)."""
  cache = model.init_cache(tokens.shape[0], max_len)
  logits, cache = model.decode(tokens[:, :prefill], cache)
  steps = [np.asarray(logits)]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = model.decode(tokens[:, t:t + 1], cache)
    steps.append(np.asarray(logits))
  return np.concatenate(steps, 1), cache


def official_ultraquant_np(x, w_out_in, g, group_size, eps):
  """The official `ultraquant` ("minima") layer, transcribed in float64 from
  AngelSlim's `StaticQuaternaryQuant` + `UltraQuantLinear` (PyTorch `[out, in]`
  weight, per-group rows of `group_size`):

    A = t · alpha, B = +eps on D where W >= 0, -eps on D where W < 0
    y = x Aᵀ + sign(x) Bᵀ
    backward: dW = dA + dB on D (dB = gᵀ sign(x), added unscaled), no dx
    through the sign(x) path.

  Returns `(y, dx, dW [out, in])` for the cotangent `g`.
  """
  x, w, g = (np.asarray(a, np.float64) for a in (x, w_out_in, g))
  rows = w.reshape(-1, group_size)
  alpha = np.abs(rows).mean(-1, keepdims=True)
  delta = alpha / 2
  a = np.where(rows >= delta, 1.0, np.where(rows <= -delta, -1.0, 0.0)) * alpha
  b_pos = (rows >= 0) & (a == 0)
  b_neg = (rows < 0) & (a == 0)
  b = np.where(b_pos, eps, np.where(b_neg, -eps, 0.0))
  a, b = a.reshape(w.shape), b.reshape(w.shape)
  xf, gf = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  y = x @ a.T + np.sign(x) @ b.T
  grad_a, grad_b = gf.T @ xf, gf.T @ np.sign(xf)
  dead = (b_pos | b_neg).reshape(w.shape)
  return y, g @ a, grad_a + np.where(dead, grad_b, 0.0)


def official_ultraquantv2_stats_bf16(w_out_in, group_size, eps):
  """Codes, scales and bias of the official `ultraquantv2` (Tequila) layer
  as it runs on bf16 weights, in torch exactly as the official code does
  (`absmean` then the masks, all in bf16; `ones @ Bᵀ` summed in fp32 here).
  Returns numpy `(codes [out, in] int8, alpha [out, in // G] fp32, c [out])`.
  """
  import torch  # pylint: disable=g-import-not-at-top
  w = torch.as_tensor(np.asarray(w_out_in, np.float32)).to(torch.bfloat16)
  x = w.reshape(-1, group_size)
  scale = x.abs().mean([-1], keepdim=True)
  delta = scale / 2
  a = torch.zeros_like(x)
  a[x >= delta] = 1
  a[x <= -delta] = -1
  b = torch.zeros_like(x)
  mask_b = a == 0
  b[mask_b] = torch.tensor(eps, dtype=torch.bfloat16) * x[mask_b]
  codes = a.reshape(w.shape).to(torch.int8).numpy()
  alpha = scale.float().reshape(w.shape[0], -1).numpy()
  c = b.float().reshape(w.shape).sum(-1).numpy()
  return codes, alpha, c
