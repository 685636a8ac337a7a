"""Runs a `python -m tequila_jax.X` command as a user would: a subprocess
(absl flags are process-global), one CPU device."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def env() -> dict:
  return {**os.environ, "XLA_FLAGS": ""}  # one CPU device, like a laptop


def run_cli(command: str, *args, check: bool = True, timeout: int = 600
            ) -> subprocess.CompletedProcess:
  """`python -m tequila_jax.<command> ARGS`; fails with its stderr unless it
  exits 0 (or `check=False`)."""
  out = subprocess.run(
      [sys.executable, "-m", f"tequila_jax.{command}", *map(str, args)],
      capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out
