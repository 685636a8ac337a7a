"""Optimizer and learning-rate schedules (optax)."""

from __future__ import annotations

import math

import jax
import optax

from tequila_jax.quant import QPARAM_NAMES

SCHEDULES = ("official", "wsd", "cosine", "constant")


def schedule(name: str, *, lr: float, steps: int, warmup_fraction: float,
             decay_fraction: float = 0.2, final_fraction: float = 0.1,
             initial_fraction: float = 0.0) -> optax.Schedule:
  """A learning-rate schedule over `steps`; every warmup is linear from
  `initial_fraction * lr` to `lr` over the first `warmup_fraction` of steps.

  - `official`: the official Tequila run (transformers' `warmup_stable_decay`
    with no stable phase): warmup, then a cosine decay to
    `final_fraction * lr` over the next `decay_fraction` of the steps, then
    held there. Warmup steps are `ceil(warmup_fraction * steps)`, as the
    Hugging Face Trainer counts them.
  - `wsd`: warmup, constant, linear decay to `final_fraction * lr` over the
    last `decay_fraction` of the steps.
  - `cosine`: warmup, then cosine to `final_fraction * lr` at the end.
  - `constant`: warmup, then constant.
  """
  warmup = (math.ceil(warmup_fraction * steps) if name == "official"
            else int(round(warmup_fraction * steps)))
  decay = int(round(decay_fraction * steps))
  if name in ("official", "wsd") and warmup + decay > steps:
    raise ValueError(f"warmup_fraction {warmup_fraction} + decay_fraction "
                     f"{decay_fraction} exceed 1.")
  start, end = initial_fraction * lr, final_fraction * lr
  if name == "cosine":
    decay = steps - warmup
  if name in ("official", "cosine") and decay > 0:
    # optax holds the end value after the decay (the official run's tail).
    return optax.warmup_cosine_decay_schedule(start, lr, warmup,
                                              warmup + decay, end_value=end)
  if name == "constant" and warmup > 0:
    return optax.warmup_constant_schedule(start, lr, warmup)
  # optax has no warmup-stable-decay; the rest are its degenerate cases.
  ramp = optax.linear_schedule(start, lr, max(warmup, 1))
  if name == "wsd":
    return optax.join_schedules([
        ramp, optax.constant_schedule(lr),
        optax.linear_schedule(lr, end, max(decay, 1)),
    ], [warmup, steps - decay])
  if name in ("official", "cosine"):  # no decay steps: straight to the end
    return optax.join_schedules([ramp, optax.constant_schedule(end)], [warmup])
  if name == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"Unknown schedule {name!r}; choose one of {SCHEDULES}.")


def make_optimizer(opt, steps: int) -> tuple[optax.GradientTransformation,
                                             optax.Schedule]:
  """AdamW with global-norm clipping, from the `config.optim` ConfigDict."""
  lr = schedule(opt.schedule, lr=opt.lr, steps=steps,
                warmup_fraction=opt.warmup_fraction,
                decay_fraction=opt.decay_fraction,
                final_fraction=opt.final_fraction,
                initial_fraction=opt.initial_fraction)
  parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm else []
  parts.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay,
                           mask=decay_mask if opt.weight_decay else None))
  return optax.chain(*parts), lr


def decay_mask(params):
  """Weight decay applies to every parameter but the learned quantizer
  parameters (scales, γ, λ: the references train them with none)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in QPARAM_NAMES,
      params)
