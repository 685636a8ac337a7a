"""Tolerances for comparing two float computations of one quantity.

Two programs that compute the same value may add its terms in a different
order: jit vs op by op, `scan` vs an unrolled loop, remat vs none, 8 devices
vs 1, and one program on two processors (XLA:CPU picks its vector width and
its libraries' blocking by CPU, so `--xla_cpu_max_isa` alone does not pin
the order). Their roundings differ, so a comparison between them needs a
tolerance that follows from the computation, not one read off one machine.
Bit-exact assertions stay for what is guaranteed: stored bytes round-tripped,
one elementwise expression, one program on one input.

Two bounds, both in units of the format's machine epsilon (fp32: 2^-23 =
2u, u the unit roundoff):

* `sum_order_bound` (rigorous): a sum or dot product of k terms, evaluated
  in any order, is within γ_k·Σ|terms| of the exact value, γ_k = k·u/(1-k·u)
  (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1,
  eq. 3.5); two evaluations differ by at most 2·γ_k·Σ|terms|. Used where
  the test can form Σ|terms| (one layer on given inputs).
* `chain_atol` (statistical): for a whole network the terms are out of reach.
  A k-term sum's rounding error is ~sqrt(k)·u in practice, a bound that
  holds with high probability (Higham & Mary, SIAM J. Sci. Comput. 41(5),
  2019: λ·sqrt(k)·u with probability 1 - 2·exp(-λ²/2)); `depth` chained
  reductions add theirs, counted here linearly (in practice they add in
  quadrature). Difference of two evaluations, with λ = 2 (eps = 2u, two
  evaluations: 2·λ·u·sqrt(k) = 2·eps·sqrt(k)) per stage, relative to the
  largest entry of the result, the magnitude the rounded terms have:
  atol = 2·depth·sqrt(k)·eps·max|want|.
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
EPS_BF16 = 2.0 ** -7


def gamma(k: int, eps: float = EPS32) -> float:
  """Higham's γ_k = k·u / (1 - k·u), u = eps / 2."""
  u = eps / 2
  assert k * u < 1, k
  return k * u / (1 - k * u)


def sum_order_bound(abs_terms, k: int, eps: float = EPS32):
  """The largest difference between two evaluations, in any order, of a sum
  (or dot product) of `k` terms whose magnitudes sum to `abs_terms`:
  2·γ_k·Σ|terms| (Higham §3.1)."""
  return 2 * gamma(k, eps) * np.asarray(abs_terms, np.float64)


def assert_within(got, want, tol, err_msg=""):
  """|got - want| <= tol elementwise (`tol` broadcasts), naming the worst
  element and how much of its tolerance it used."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  tol = np.broadcast_to(np.asarray(tol, np.float64), got.shape)
  diff = np.abs(got - want)
  bad = ~(diff <= tol)
  if bad.any():
    i = np.unravel_index(np.argmax(np.where(bad, diff - tol, -np.inf)),
                         got.shape)
    raise AssertionError(
        f"{err_msg}: {bad.sum()} of {bad.size} entries off by more than their "
        f"tolerance; worst at {i}: got {got[i]!r}, want {want[i]!r}, "
        f"|diff| {diff[i]:.3g} > tol {tol[i]:.3g}")


def chain_atol(want, k: int, depth: int, eps: float = EPS32) -> float:
  """Absolute tolerance for two evaluations of `want` by chains of `depth`
  reductions of at most `k` terms that may order their sums differently
  (the module docstring): 2·depth·sqrt(k)·eps·max|want|."""
  return 2 * depth * np.sqrt(k) * eps * float(np.abs(np.asarray(
      want, np.float64)).max())


def llama_depth(num_layers: int, backward: bool = False) -> int:
  """Chained reductions in a Llama forward (per layer: norm, q/k/v, scores,
  softmax, values, o, norm, gate/up, down: 9; then the final norm, the head
  and the loss's log-sum-exp), doubled for a backward pass."""
  forward = 9 * num_layers + 3
  return 2 * forward if backward else forward


def llama_k(cfg, tokens: int = 0) -> int:
  """The longest reduction in a Llama `cfg`'s forward or backward on
  `tokens` tokens: the widest contraction (hidden, MLP, vocabulary), the
  sequence, or the tokens a weight gradient sums over."""
  return max(cfg.hidden_size, cfg.ffn_size, cfg.vocab_size,
             cfg.num_heads * cfg.head_dim, cfg.max_seq_len, tokens)
