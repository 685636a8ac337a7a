"""Part 3: one decode step at a position against the KV cache's capacity
(the cost must not follow the capacity)."""

from __future__ import annotations

import json
import statistics
import tempfile

import jax
import jax.numpy as jnp

from experiments import common
from experiments.bench_cpu_inference import models
from tequila_jax.inference import InferenceSettings, PackedLlama

TITLE = "part 3: KV cache capacity"


def bench_capacity(config: str, rounds: int, position: int = 128,
                   capacities=(256, 1024, 4096)) -> list[dict]:
  """Time of one decode step at `position` with caches of several
  capacities (same model, `lut`), called round robin; the filled part is
  the same, so the times should be too."""
  with tempfile.TemporaryDirectory() as tmp:
    models.random_export(config, f"{tmp}/m.tqj", max_seq_len=max(capacities))
    model = PackedLlama.load(f"{tmp}/m.tqj", InferenceSettings("lut"))
  prompt = jnp.ones((1, position), jnp.int32)
  token = jnp.ones((1, 1), jnp.int32)
  filled = {}
  for c in capacities:  # compile, and a cache filled to `position`
    filled[c] = model.decode(prompt, model.init_cache(1, c))[1]
    jax.block_until_ready(model.decode(token, filled[c])[0])
    filled[c] = model.decode(prompt, model.init_cache(1, c))[1]
  times = common.round_robin(
      {c: lambda c=c: models.timed_step(model, token, filled[c])[0]
       for c in capacities}, rounds)
  base = statistics.median(times[capacities[0]])
  rows = [dict(capacity=c, position=position,
               ms=1e3 * statistics.median(t), min_ms=1e3 * min(t),
               max_ms=1e3 * max(t), vs_smallest=statistics.median(t) / base,
               samples=len(t)) for c, t in times.items()]
  for r in rows:
    print(json.dumps(r), flush=True)
  return rows


def add_flags(group) -> None:
  group.add_argument("--capacity_rounds", type=int, default=30,
                     help="decode steps timed per cache capacity (0: skip)")


def wanted(args) -> bool:
  return bool(args.capacity_rounds)


def run(args) -> list[dict]:
  return bench_capacity(args.decode_config, args.capacity_rounds)


def render(results: dict, decode_config: str) -> list[str]:
  del decode_config  # the decode model's; the table names no architecture
  capacity = results.get("capacity", [])
  if not capacity:
    return []
  return [f"One decode step at position {capacity[0]['position']} "
          "against the KV cache's capacity (ternary `lut`, median of "
          f"{capacity[0]['samples']} steps, round robin):", "",
          "| cache slots | ms/step | range | vs smallest |",
          "|---|---|---|---|"] + [
              f"| {r['capacity']} | {r['ms']:.1f} | {r['min_ms']:.1f}–"
              f"{r['max_ms']:.1f} | {r['vs_smallest']:.2f}x |"
              for r in capacity]
