"""Independent numpy formulations of DESIGN.md §1 used as test oracles."""

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
