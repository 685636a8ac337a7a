"""QAT training: `run(config, workdir)` and the pieces it is made of.

- `step`: the pure `train_step` (gradient accumulation, AdamW, diagnostics).
- `build`: `build_train(config)`, everything but data (mesh, optimizer,
  shardings, initial state, compiled steps); `describe` sizes a config.
- `resume`: what a resumed run may change (`RUN_TIME_FIELDS`) and how the
  rest is refused (config, checkpoint layout, teacher, corpus).
- `loop`: `run`, the loop with checkpoints, metrics, evaluation and signals.

`python -m tequila_jax.train` is the command line (`__main__.py`).
"""

from tequila_jax.train.build import Train, build_train, describe
from tequila_jax.train.loop import (STOPPED_EXIT_CODES, TrainingError,
                                    exit_code, run)
from tequila_jax.train.step import new_state, train_step

__all__ = ["STOPPED_EXIT_CODES", "Train", "TrainingError", "build_train",
           "describe", "exit_code", "new_state", "run", "train_step"]
