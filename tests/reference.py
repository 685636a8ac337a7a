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
