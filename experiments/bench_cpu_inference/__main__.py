"""The command: `python -m experiments.bench_cpu_inference` (see the
package's docstring); it parses the flags, runs the wanted parts of
`registry.PARTS` and writes their tables (`report`)."""

from __future__ import annotations

import argparse
import gc
import json

import jax

from experiments import bench_cpu_inference, common
from experiments.bench_cpu_inference import registry, report


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments.bench_cpu_inference",
      description=bench_cpu_inference.__doc__.split("\n")[0])
  p.add_argument("--out", default="")
  p.add_argument("--decode_config",
                 default=str(common.ROOT / "configs/llama1b.py"),
                 help="architecture of the end-to-end model (random init)")
  p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                 help="measure nothing: tables from these runs' results.json "
                 "(parts run separately), written to --out")
  for part in sorted(registry.PARTS.values(), key=lambda part: part.title):
    part.add_flags(p.add_argument_group(part.title))
  return p


def run(args: argparse.Namespace) -> dict:
  """results.json: the machine, then each part's rows (empty when its flags
  skip it) and notes."""
  results = dict(machine=common.machine())
  print(json.dumps(results["machine"]))
  for name, part in registry.PARTS.items():
    results[name] = part.run(args) if part.wanted(args) else []
    results.update(part.notes(args))
    # Each part's models should die with it: collect them and drop the
    # compiled steps that reference them. (All parts in one process were
    # OOM-killed at 24 GB in part 3 before this; on a small machine run
    # parts separately.)
    gc.collect()
    jax.clear_caches()
  return results


def main(argv=None):
  args = parser().parse_args(argv)
  if args.merge:
    report.write(report.merge(args.merge), args.decode_config, args.out)
    return
  report.write(run(args), args.decode_config, args.out)


if __name__ == "__main__":
  common.command(main)
