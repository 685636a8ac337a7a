"""Optimizer and learning-rate schedules (optax)."""

from __future__ import annotations

import math

import optax

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
  ramp = optax.linear_schedule(initial_fraction * lr, lr, max(warmup, 1))
  decay = int(round(decay_fraction * steps))
  if name in ("official", "wsd") and warmup + decay > steps:
    raise ValueError(f"warmup_fraction {warmup_fraction} + decay_fraction "
                     f"{decay_fraction} exceed 1.")
  if name == "official":
    return optax.join_schedules([
        ramp,
        optax.cosine_decay_schedule(lr, max(decay, 1), alpha=final_fraction),
        optax.constant_schedule(final_fraction * lr),
    ], [warmup, warmup + decay])
  if name == "wsd":
    return optax.join_schedules([
        ramp, optax.constant_schedule(lr),
        optax.linear_schedule(lr, final_fraction * lr, max(decay, 1)),
    ], [warmup, steps - decay])
  if name == "cosine":
    return optax.join_schedules([ramp, optax.cosine_decay_schedule(
        lr, max(steps - warmup, 1), alpha=final_fraction)], [warmup])
  if name == "constant":
    return optax.join_schedules([ramp, optax.constant_schedule(lr)], [warmup])
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
                           weight_decay=opt.weight_decay))
  return optax.chain(*parts), lr
