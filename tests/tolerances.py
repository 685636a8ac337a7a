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



def code_margin(cfg, shape) -> float:
  """How far from 1 a weight's r = |W|/Δ must be for its code to be the
  same in every program: Δ comes from a mean of |W| over the weights of a
  group (G of them: the group, the input axis or the whole kernel), which
  two summation orders give within 2·γ_G of each other (relative), and r
  takes one more rounding: 2·γ_{G+2}, doubled for safety."""
  d_in, d_out = shape[-2:]
  g = {"per_group": cfg.group_size, "per_channel": d_in,
       "per_tensor": d_in * d_out}[cfg.granularity]
  return 4 * gamma(g + 2)


def settle_codes(model, rounds: int = 8):
  """Moves the few weights of a test `model` that lie within `code_margin`
  of their deadzone threshold away from it (|W| scaled by 1 ± 4·margin),
  so that every program, in any summation order of the group statistics,
  gives every weight the same code. Such a weight flips between two
  programs (one level, α·|x_i|, in one output, which no fp32 tolerance
  covers); test models are arbitrary, so they are chosen off the
  thresholds (ties themselves are tested in test_quant). Learned scales
  (Δ a parameter, r elementwise) and Sherry (codes from comparisons of |W|
  within a block of 4: no sum) need nothing. Returns `model`, updated."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tequila_jax import quant  # pylint: disable=g-import-not-at-top
  from tequila_jax.model import PROJECTIONS  # pylint: disable=g-import-not-at-top
  cfg = model.cfg.quant
  if not cfg.is_ternary or cfg.learned_scale or cfg.method == "sherry":
    return model
  state = nnx.state(model.layers, nnx.Param)
  pure = nnx.to_pure_dict(state)
  for name, block in PROJECTIONS.items():
    p = pure[block][name]
    qp = {k: v for k, v in p.items() if k != "kernel"}
    w = np.asarray(p["kernel"], np.float32)
    need = code_margin(cfg, w.shape)
    for _ in range(rounds):
      _, r = jax.vmap(lambda w, q: quant.threshold_stats(w, cfg, q))(
          jnp.asarray(w), qp)
      r = np.asarray(r, np.float64)
      near = np.abs(r - 1) <= need
      if not near.any():
        break
      w = np.where(near, w * np.where(r >= 1, 1 + 4 * need, 1 - 4 * need),
                   w).astype(np.float32)
    else:
      raise AssertionError(f"{name}: weights still at their threshold")
    p["kernel"] = jnp.asarray(w)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model.layers, state)
  return model



def assert_runs_close(params_a, params_b, rtol=1e-4, atol=1e-5,
                      max_off=1e-3, max_diff=1e-3):
  """Parameters of two short training runs that differ only in how they are
  computed (devices, processes, micro-batches: other summation orders).
  Entries agree to fp32 drift through a few Adam steps (`rtol`, `atol`),
  except where summation order moved a weight across its deadzone threshold
  on one side: its code, so its gradient (dead path vs active) and its
  updates, differ. Those isolated entries (< `max_off` of a leaf) may be
  off by a few Adam steps (`max_diff`); any systematic difference is not
  isolated. The form test_learned_methods' sharded test uses."""
  import jax  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    x, y = np.asarray(x), np.asarray(y)
    off = ~np.isclose(x, y, rtol=rtol, atol=atol)
    assert off.mean() < max_off and np.abs(x - y).max() < max_diff, (
        off.mean(), np.abs(x - y).max())


def matmul_tolerances(cfg, x, w, g, dtype):
  """Per entry of (y, dx, dW) of `quantized_matmul` under a static method:
  the tolerance of two evaluations on any processor, in any order.

  T: Σ|terms| of each entry, covering every method's paths (x·Q, the bias
  λ·Σ_D W, tequila_dynamic's λ·x·W_D, minima's ε·sign(x)·sign(W_D); their
  gradients, minima's unscaled Σ sign(x)·g), from the dot and α's mean
  (over G weights): 2·γ_k·T. bf16 adds two roundings of partial
  results to bf16 (2·2^-7·T). And a weight whose |W|/Δ lies within the
  statistics' rounding of 1 (`code_margin`) may take another code on
  another processor: one level α (+ its bias paths) more in the entries it
  feeds."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tequila_jax import quant  # pylint: disable=g-import-not-at-top
  xa = np.abs(np.asarray(x, np.float64)).reshape(-1, x.shape[-1])
  ga = np.abs(np.asarray(g, np.float64)).reshape(-1, g.shape[-1])
  wa = np.abs(np.asarray(w, np.float64))
  st = quant.ternary_state(w, cfg)
  level = np.asarray(quant.dequantize(jnp.ones_like(st.codes), st.alpha),
                     np.float64)
  _, r = quant.threshold_stats(w, cfg)
  near = np.abs(np.asarray(r, np.float64) - 1) <= code_margin(cfg, w.shape)
  lam, eps = cfg.lam, cfg.eps
  coef = np.abs(np.asarray(st.codes)) * level + lam * wa + eps
  flip = near * (level + lam * wa + eps)
  terms = (xa @ coef + lam * wa.sum(0),
           ga @ coef.T,
           (1 + lam) * (xa.T @ ga + ga.sum(0)))
  flips = (xa @ flip + lam * (near * wa).sum(0),
           ga @ flip.T,
           near * (1 + lam) * ga.sum(0))
  stat = {"per_group": cfg.group_size, "per_channel": w.shape[0],
          "per_tensor": w.size}[cfg.granularity]
  k = w.shape[0] + stat + 2
  out = []
  for t, f in zip(terms, flips):
    tol = sum_order_bound(t, k) + f
    if dtype == jnp.bfloat16:
      tol = tol + 2 * EPS_BF16 * t
    out.append(tol)
  return out[0].reshape(x.shape[:-1] + (w.shape[1],)), out[1].reshape(
      x.shape), out[2]



def bf16_mean_ambiguous(values):
  """Per group (the last axis) of bf16-valued `values`: True where the mean
  of |values|, accumulated in fp32 in some order and rounded to bf16, may
  land on either bf16 neighbour. bf16 values carry 8 significant bits: if
  every one is a multiple of the smallest one's last bit q and Σ|v| <
  2^24·q, every partial sum is exact in fp32, in any order, and the mean
  (a power-of-two division) too. Otherwise the sum is within γ_k of exact
  (relative, k terms) and may round either way if the exact mean lies that
  close to a bf16 rounding midpoint."""
  v = np.abs(np.asarray(values, np.float64))
  k = v.shape[-1]
  last_bit = np.where(v > 0, 2.0 ** (np.floor(np.log2(np.where(
      v > 0, v, 1.0))) - 7), np.inf)
  q = last_bit.min(-1)
  total = v.sum(-1)
  exact = total < 2.0 ** 24 * q
  m = total / k
  ulp = 2.0 ** (np.floor(np.log2(np.where(m > 0, m, 1.0))) - 7)
  mid = (np.floor(m / ulp) + 0.5) * ulp
  return ~exact & (m > 0) & (np.abs(m - mid) <= gamma(k + 1) * m)
