"""results.md and results.json of the benchmark: each part's table, in
`registry.TABLE_ORDER`; and several runs' results merged into one."""

from __future__ import annotations

import json
import pathlib

from experiments import common
from experiments.bench_cpu_inference import registry


def render(results: dict, decode_config: str) -> str:
  """The markdown tables of `results` (results.json's keys), a blank line
  between parts."""
  lines = []
  for name in registry.TABLE_ORDER:
    table = registry.PARTS[name].render(results, decode_config)
    if table:
      lines += [""] * bool(lines) + table
  return "\n".join(lines) + "\n"


def write(results: dict, decode_config: str, out: str = "") -> None:
  """Prints the tables; writes results.json and results.md to `out`."""
  text = render(results, decode_config)
  print(text)
  if out:
    common.write_results(
        out, results, f"Machine: {json.dumps(results['machine'])}\n\n" + text)


def merge(paths) -> dict:
  """One results dict from the results.json of several runs (parts run
  separately, e.g. on a machine short of memory); the first run's machine."""
  merged = {}
  for path in paths:
    for key, value in json.loads(pathlib.Path(path).read_text()).items():
      if key == "machine":
        merged.setdefault(key, value)
      elif value:
        merged[key] = value
  return merged
