"""The pure training step and the train state it updates."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from tequila_jax import diagnostics, distill as distill_lib, losses


def new_state(params: dict, tx, diag) -> dict:
  """The train state around `params`: step, optimizer state, diagnostics."""
  state = dict(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=tx.init(params))
  if diag is not None:
    state["diag"] = diagnostics.init_state(params, diag)
  return state


def train_step(state: dict, batch: jax.Array, teacher: dict | None = None,
               *, graphdef, tx, lr_schedule: Callable, micro_batches: int,
               diag: diagnostics.DiagnosticsConfig | None = None,
               full_diagnostics: bool = False,
               loss_chunk: int = 0,
               quant_config=None,
               distill: distill_lib.DistillConfig | None = None,
               teacher_graphdef=None,
               arenas_schedule: Callable | None = None,
               axis_name: str | tuple[str, ...] | None = None
               ) -> tuple[dict, dict]:
  """One optimizer step on `batch[B, T + 1]`, averaged over `micro_batches`.

  Micro-batch k takes rows k, k + m, k + 2m, ... so that every device holds an
  equal share of every micro-batch. With `diag`, deadzone statistics are
  returned with the metrics (the expensive ones when `full_diagnostics`);
  with a learned λ in `quant_config`, its mean per layer type (`lam/<type>`).

  With `distill`, the loss is `distill.objective` against the float model
  `(teacher_graphdef, teacher)` (parameters that take no gradient and are
  not part of the state), and the metrics add its parts (`ce_loss`,
  `kd_loss`, `attention_loss`); without it, the next-token loss.

  With `arenas_schedule` (Sherry), every forward of this step runs at the
  Arenas ε `arenas_schedule(step)` (a function of the optimizer step, the
  same for each micro-batch), which is logged as `arenas_eps`.

  Under `shard_map`, `batch` is this device's rows and `axis_name` the mesh
  axes they are split over: each micro-batch's loss and gradients are
  averaged over them (`lax.pmean`), so that every device applies the same
  update to its replica of the state (what GSPMD derives from shardings).
  """
  params = state["params"]
  eps = (jnp.zeros((), jnp.float32) if arenas_schedule is None
         else arenas_schedule(state["step"]))
  arenas = {} if arenas_schedule is None else dict(arenas_eps=eps)
  if distill is None:
    value_and_grad = jax.value_and_grad(functools.partial(
        losses.next_token_loss, loss_chunk=loss_chunk, **arenas))

    def loss_and_grads(params, tokens):
      loss, grads = value_and_grad(params, graphdef, tokens)
      return (loss, {}), grads
  else:
    value_and_grad = jax.value_and_grad(functools.partial(
        distill_lib.objective, cfg=distill, loss_chunk=loss_chunk, **arenas),
        has_aux=True)

    def loss_and_grads(params, tokens):
      return value_and_grad(params, graphdef, teacher, teacher_graphdef,
                            tokens)

  def grad_fn(params, tokens):
    """`((loss, its parts), grads)` of one micro-batch."""
    values, grads = loss_and_grads(params, tokens)
    if axis_name is not None:
      values, grads = jax.lax.pmean((values, grads), axis_name)
    return values, grads

  want_gsnr = diag is not None and full_diagnostics and micro_batches >= 2
  if micro_batches == 1:
    (loss, parts), grads = grad_fn(params, batch)
  else:
    micro = batch.reshape(-1, micro_batches, batch.shape[-1]).swapaxes(0, 1)

    def accumulate(carry, xs):
      # Running mean of the gradients (Welford; with the sum of squared
      # deviations `m2` for the GSNR variant), numerically stable in fp32.
      k, tokens = xs
      sums, mean, m2 = carry
      values, g = grad_fn(params, tokens)
      delta = jax.tree.map(jnp.subtract, g, mean)
      mean = jax.tree.map(lambda m, d: m + d / (k + 1), mean, delta)
      if want_gsnr:
        m2 = jax.tree.map(lambda a, d, g_, m: a + d * (g_ - m), m2, delta, g,
                          mean)
      return (jax.tree.map(jnp.add, sums, values), mean, m2), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zero = jnp.zeros((), jnp.float32)
    sums = (zero, {k: zero for k in (distill.parts if distill else ())})
    carry = (sums, zeros, zeros if want_gsnr else ())
    (sums, grads, m2), _ = jax.lax.scan(
        accumulate, carry, (jnp.arange(micro_batches), micro))
    loss, parts = jax.tree.map(lambda v: v / micro_batches, sums)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  new = dict(step=state["step"] + 1, params=new_params, opt_state=opt_state)
  out = dict(loss=loss, grad_norm=optax.tree.norm(grads),
             lr=lr_schedule(state["step"]), **parts, **arenas)
  if quant_config is not None and quant_config.learned_lam:
    out.update(diagnostics.lam_metrics(new_params, quant_config))
  if diag is not None:
    new["diag"], per_step = diagnostics.update(state["diag"], new_params, diag)
    out.update(per_step)
    if full_diagnostics:
      grad_var = None
      if want_gsnr:
        grad_var = jax.tree.map(lambda a: a / (micro_batches - 1), m2)
      out.update(diagnostics.full_metrics(
          params, new_params, diag, grads if want_gsnr else None, grad_var))
  return new, out
