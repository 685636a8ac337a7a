"""What the experiments share: the round-robin timer of the benchmarks, the
machine a measurement ran on, the git commit a result came from, and the
results folder (results.json beside results.md).

jax is imported inside the functions that need it, so that a process which
only records a commit (the sweep's parent, which never loads jax) stays
light.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Hashable

ROOT = pathlib.Path(__file__).resolve().parent.parent


def command(main: Callable[[], object]) -> None:
  """Runs an experiment's `main()` as every `tequila_jax` command runs: an
  expected error (a bad flag value, a missing run, a failed sweep point) is
  one line on stderr, cause then fix, and exit status 2."""
  from tequila_jax import cli  # pylint: disable=g-import-not-at-top
  try:
    main()
  except cli.EXPECTED as e:
    print(f"error: {cli.message(e)}", file=sys.stderr)
    raise SystemExit(cli.EXIT_ERROR) from None


def timed(fn: Callable, *args) -> Callable[[], float]:
  """A call of `fn(*args)` that returns its own seconds, its result
  waited for (`jax.block_until_ready`)."""
  import jax  # pylint: disable=g-import-not-at-top

  def call() -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0
  return call


def round_robin(calls: dict[Hashable, Callable[[], float]], rounds: int,
                warmup: int = 0) -> dict[Hashable, list[float]]:
  """Seconds of every `rounds` call of each of `calls` (`name -> call`, a
  call returning the seconds it measured, as `timed`'s do): one call of
  each in turn, `warmup + rounds` rounds with the first `warmup` not
  recorded, so that drift in the machine's speed (noise, thermals) hits
  every candidate alike."""
  times = {name: [] for name in calls}
  for r in range(warmup + rounds):
    for name, call in calls.items():
      seconds = call()
      if r >= warmup:
        times[name].append(seconds)
  return times


def time_side_by_side(fns: dict, iters: int, warmup: int = 3,
                      keep_all: bool = False) -> dict:
  """Median seconds of each `name -> (fn, args)` (every time if
  `keep_all`), called round robin (`round_robin`) after `warmup` rounds."""
  times = round_robin({name: timed(fn, *args)
                       for name, (fn, args) in fns.items()}, iters, warmup)
  if keep_all:
    return times
  return {name: statistics.median(t) for name, t in times.items()}


def machine() -> dict:
  """The host a measurement ran on: CPUs, processor, platform, jax and its
  devices, and the XLA and glibc settings in effect."""
  import jax  # pylint: disable=g-import-not-at-top
  return dict(cpus=os.cpu_count(), processor=platform.processor(),
              platform=platform.platform(), jax=jax.__version__,
              devices=[str(d) for d in jax.devices()],
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))


def write_results(out, results, markdown: str) -> None:
  """`out`/results.json (`results`, indented) and `out`/results.md
  (`markdown`), `out` made if missing."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=2))
  (out / "results.md").write_text(markdown)


def git_commit() -> str:
  """The repository's HEAD commit, or "unknown" outside a git checkout."""
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
