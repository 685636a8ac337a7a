"""Optimizer and learning-rate schedules (optax)."""

from __future__ import annotations

import optax

SCHEDULES = ("wsd", "cosine", "constant")


def schedule(name: str, *, lr: float, steps: int, warmup_fraction: float,
             decay_fraction: float = 0.2, final_fraction: float = 0.1
             ) -> optax.Schedule:
  """`wsd`: linear warmup, constant, linear decay to `final_fraction * lr`
  over the last `decay_fraction` of the steps; `cosine`: warmup then cosine
  to `final_fraction * lr`; `constant`: warmup then constant."""
  warmup = int(round(warmup_fraction * steps))
  if name == "wsd":
    decay = int(round(decay_fraction * steps))
    if warmup + decay > steps:
      raise ValueError(f"warmup_fraction {warmup_fraction} + decay_fraction "
                       f"{decay_fraction} exceed 1.")
    return optax.join_schedules([
        optax.linear_schedule(0.0, lr, max(warmup, 1)),
        optax.constant_schedule(lr),
        optax.linear_schedule(lr, final_fraction * lr, max(decay, 1)),
    ], [warmup, steps - decay])
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 1), max(steps, warmup + 1), final_fraction * lr)
  if name == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                 optax.constant_schedule(lr)], [warmup])
  raise ValueError(f"Unknown schedule {name!r}; choose one of {SCHEDULES}.")


def make_optimizer(opt, steps: int) -> tuple[optax.GradientTransformation,
                                             optax.Schedule]:
  """AdamW with global-norm clipping, from the `config.optim` ConfigDict."""
  lr = schedule(opt.schedule, lr=opt.lr, steps=steps,
                warmup_fraction=opt.warmup_fraction,
                decay_fraction=opt.decay_fraction,
                final_fraction=opt.final_fraction)
  parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm else []
  parts.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay))
  return optax.chain(*parts), lr
