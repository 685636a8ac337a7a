"""The parts of the benchmark: name (its rows' key in results.json) ->
`Part`, in the order they run; `TABLE_ORDER` is the order of their tables.

A new part is a module with `TITLE`, `add_flags`, `wanted`, `run` and
`render` (and `notes` where it records why it did not run), and a line
here.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

from experiments.bench_cpu_inference import (capacity, decode, kv_cache,
                                             layers, memory, ops, sparse34,
                                             versus_llama_cpp)


@dataclasses.dataclass(frozen=True)
class Part:
  """One part: its flags (an argument group titled `title`), whether they
  ask for it, its measurement (rows) and its table (markdown lines, none
  when it has no rows); `notes(args)` adds results.json entries beside the
  rows (why it was skipped)."""
  title: str
  add_flags: Callable[..., None]  # (an argparse argument group)
  wanted: Callable[[argparse.Namespace], bool]
  run: Callable[[argparse.Namespace], list[dict]]
  render: Callable[[dict, str], list[str]]
  notes: Callable[[argparse.Namespace], dict] = lambda args: {}


def _part(module, **extra) -> Part:
  return Part(module.TITLE, module.add_flags, module.wanted, module.run,
              module.render, **extra)


# Run order: memory-hungry parts release their models before the next
# (`__main__`); llama.cpp last, its float baseline built first of its own.
PARTS = {
    "layers": _part(layers),
    "decode": _part(decode),
    "capacity": _part(capacity),
    "ops": _part(ops),
    "memory": _part(memory),
    "kv_cache": _part(kv_cache),
    "sparse34": _part(sparse34),
    "llama_cpp": _part(versus_llama_cpp, notes=versus_llama_cpp.notes),
}
# The tables' order in results.md.
TABLE_ORDER = ("layers", "decode", "capacity", "llama_cpp", "ops",
               "kv_cache", "memory", "sparse34")
