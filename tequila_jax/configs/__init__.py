"""The shipped training configs, each file its own recipe (`get_config(arg)`
over `config_lib.base_config`). They live inside the package so that an
installed wheel finds the CLI's default; `configs/` at the repository root
is a symbolic link to this directory, so that `--config configs/X.py` works
from a checkout."""

import pathlib

DIR = pathlib.Path(__file__).resolve().parent
# What `python -m tequila_jax.train` runs without --config.
DEFAULT = DIR / "smollm2_135m.py"
