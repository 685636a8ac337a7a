"""Distillation from a float teacher: its config, losses and objective.

The training objective with `config.distill` on (`DistillConfig`), per
sequence position and averaged over the batch:

    loss = ce_weight · CE(student) + weight · T² · D(teacher, student; T)
           + attention_weight · Σ_{A ∈ Q, K, V} relation KL of one layer

- `kind="kl"`: D = KL(p_T ‖ q_T) = Σ_v p_T(v) (log p_T(v) − log q_T(v)),
  the teacher's softened distribution p_T = softmax(z_teacher / T) against
  the student's q_T (forward KL, mode covering: LLM-QAT, BitDistill);
  `"reverse_kl"`: KL(q_T ‖ p_T) (mode seeking: MiniLLM). The T² factor keeps
  the gradient's scale independent of T (Hinton et al. 2015).
- Both models' logits are built `train.loss_chunk` positions at a time
  (`losses.chunked_mean`, the chunking of the cross-entropy): neither model's
  `[B, T, vocab]` logits ever exist whole, and the student's chunk serves
  both the cross-entropy and the KD term.
- The relation loss (MiniLMv2; BitDistill, arXiv 2510.13998, Eq. 11): the
  query, key and value projections `[B, T, n]` of block `attention_layer`
  (before RoPE) are concatenated over heads and re-split into `R` relation
  heads of `n / R` channels (as microsoft/BitNet PR 382 does); per head,
  R_A = softmax(A Aᵀ / √(n / R)) row-wise over all T positions (no causal
  mask, as the reference); the loss is Σ_A mean over batch, heads and rows
  of KL(R_A^teacher ‖ R_A^student). Rows are built `loss_chunk` at a time,
  so a chunk holds B·R·chunk·T scores (B·R·T² per relation unchunked).

The teacher takes no gradient (its parameters are a separate argument of
the step; see `train.build.Teacher`), and its outputs are `stop_gradient`ed
besides.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tequila_jax import losses

KINDS = ("kl", "reverse_kl")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """`config.distill` of a run that distills (see the module docstring);
  `attention_heads` is resolved (0 = the student's `num_kv_heads`, which
  divides its query, key and value widths)."""
  weight: float = 0.0
  ce_weight: float = 1.0
  temperature: float = 1.0
  kind: str = "kl"
  teacher: str = ""
  attention_weight: float = 0.0
  attention_layer: int = -1
  attention_heads: int = 0

  @classmethod
  def from_config(cls, d: ml_collections.ConfigDict, num_layers: int,
                  num_kv_heads: int) -> "DistillConfig | None":
    """The distillation of `config.distill`, or None when it is off
    (`weight` and `attention_weight` 0: the plain next-token step); refuses
    settings that cannot mean what they say."""
    cfg = cls(**d.to_dict())
    if cfg.weight < 0 or cfg.attention_weight < 0 or cfg.ce_weight < 0:
      raise ValueError("distill.weight, ce_weight and attention_weight must be "
                       ">= 0.")
    if not (cfg.weight or cfg.attention_weight):
      if cfg.ce_weight != 1.0:
        raise ValueError(
            f"distill.ce_weight={cfg.ce_weight} with distillation off "
            "(distill.weight = attention_weight = 0) would only rescale the "
            "learning rate: set distill.weight > 0, or leave ce_weight at 1.")
      return None
    if cfg.kind not in KINDS:
      raise ValueError(f"distill.kind={cfg.kind!r}: choose one of {KINDS}.")
    if not cfg.temperature > 0:
      raise ValueError(f"distill.temperature={cfg.temperature} must be > 0.")
    if not -num_layers <= cfg.attention_layer < num_layers:
      raise ValueError(f"distill.attention_layer={cfg.attention_layer} is not "
                       f"a layer of the {num_layers}-layer model.")
    return dataclasses.replace(
        cfg, attention_heads=cfg.attention_heads or num_kv_heads)

  @property
  def parts(self) -> tuple[str, ...]:
    """The names of the loss's parts that `objective` returns."""
    return ("ce_loss", "kd_loss") + (
        ("attention_loss",) if self.attention_weight else ())

  def check_teacher(self, student, teacher) -> None:
    """Refuses a teacher (`ModelConfig`) that cannot teach `student`: another
    vocabulary, or query/key/value widths the relation heads do not split."""
    if teacher.vocab_size != student.vocab_size:
      raise ValueError(
          f"the teacher {self.teacher or '(init.checkpoint)'} has a vocabulary "
          f"of {teacher.vocab_size} tokens, the student {student.vocab_size}: "
          "distill from a model of the student's tokenizer.")
    if not self.attention_weight:
      return
    for name, cfg in (("student", student), ("teacher", teacher)):
      if not -cfg.num_layers <= self.attention_layer < cfg.num_layers:
        raise ValueError(f"distill.attention_layer={self.attention_layer} is "
                         f"not a layer of the {cfg.num_layers}-layer {name}.")
      widths = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
      if any(w % self.attention_heads for w in widths):
        raise ValueError(
            f"distill.attention_heads={self.attention_heads} does not divide "
            f"the {name}'s query/key widths {widths}: choose a divisor of "
            "both (0 = the student's num_kv_heads).")


def kd_divergence(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: float, kind: str = "kl") -> jax.Array:
  """T² · KL(teacher ‖ student) (`kind="kl"`) or T² · KL(student ‖ teacher)
  (`"reverse_kl"`) of the softened distributions, per position `[...]`, in
  fp32."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
  p, log_p, log_q = (t, t, s) if kind == "kl" else (s, s, t)
  return temperature**2 * jnp.sum(jnp.exp(p) * (log_p - log_q), axis=-1)


def relation_kl(student: jax.Array, teacher: jax.Array, heads: int,
                chunk: int) -> jax.Array:
  """Mean over batch, relation heads and rows of KL(R_teacher ‖ R_student),
  R = softmax(A Aᵀ / √d) of states `A[B, T, n]` split into `heads` heads of
  `d = n / heads` channels (the two models' `n` may differ); rows `chunk`
  positions at a time."""
  def split(a):
    b, t, n = a.shape
    return a.astype(jnp.float32).reshape(b, t, heads, n // heads)

  s_all, t_all = split(student), split(teacher)

  def log_relation(rows, full):
    scores = jnp.einsum("bqhd,bkhd->bhqk", rows, full)
    return jax.nn.log_softmax(scores / math.sqrt(rows.shape[-1]), axis=-1)

  def rows_kl(s_rows, t_rows):
    log_s, log_t = log_relation(s_rows, s_all), log_relation(t_rows, t_all)
    return jnp.mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1))

  return losses.chunked_mean(rows_kl, (s_all, t_all), chunk)


def objective(params, graphdef, teacher_params, teacher_graphdef,
              tokens: jax.Array, cfg: DistillConfig, loss_chunk: int = 0,
              arenas_eps=0.0) -> tuple[jax.Array, dict]:
  """The distillation loss of the student `(graphdef, params)` on `[B, T + 1]`
  tokens, and its parts: `(loss, {"ce_loss", "kd_loss"[, "attention_loss"]})`
  (the module docstring's formula); the student runs at Sherry's Arenas ε
  `arenas_eps`. Differentiate it in `params` only."""
  student = nnx.merge(graphdef, params)
  teacher = nnx.merge(teacher_graphdef, teacher_params)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if cfg.attention_weight:
    h_s, qkv_s = student.hidden_states_and_qkv(inputs, cfg.attention_layer,
                                               arenas_eps=arenas_eps)
    h_t, qkv_t = teacher.hidden_states_and_qkv(inputs, cfg.attention_layer)
  else:
    h_s = student.hidden_states(inputs, arenas_eps=arenas_eps)
    h_t = teacher.hidden_states(inputs)
  h_t = jax.lax.stop_gradient(h_t)
  head_s = student.head_matrix()
  head_t = jax.lax.stop_gradient(teacher.head_matrix())
  t = inputs.shape[1]
  chunk = loss_chunk if loss_chunk and loss_chunk < t else t

  def per_chunk(hs, ht, tgt):
    logits = jnp.matmul(hs, head_s).astype(jnp.float32)
    teacher_logits = jnp.matmul(ht, head_t).astype(jnp.float32)
    return dict(ce_loss=losses.cross_entropy(logits, tgt),
                kd_loss=jnp.mean(kd_divergence(logits, teacher_logits,
                                               cfg.temperature, cfg.kind)))

  parts = losses.chunked_mean(per_chunk, (h_s, h_t, targets), chunk)
  loss = cfg.ce_weight * parts["ce_loss"] + cfg.weight * parts["kd_loss"]
  if cfg.attention_weight:
    parts["attention_loss"] = sum(
        relation_kl(s, jax.lax.stop_gradient(t_), cfg.attention_heads, chunk)
        for s, t_ in zip(qkv_s, qkv_t))
    loss = loss + cfg.attention_weight * parts["attention_loss"]
  return loss, parts
