"""The shipped training configs, inside the package so that an installed
wheel finds the CLI's default. `configs/` at the repository root holds the
same files for users to read and copy (a test keeps them identical)."""

import pathlib

DIR = pathlib.Path(__file__).resolve().parent
# What `python -m tequila_jax.train` runs without --config.
DEFAULT = DIR / "smollm2_135m.py"
