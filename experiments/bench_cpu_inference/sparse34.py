"""Part 8: the `sparse34` packing (3:4 codes, 1.25 bits/weight) against
`2bit` on the same random 3:4 codes: what PackedLlama holds, decode and
prefill speed, side by side in one process."""

from __future__ import annotations

import json
import statistics

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from experiments import common
from experiments.bench_cpu_inference import models
from tequila_jax.inference import InferenceSettings, PackedLlama
from tequila_jax.io import tqj
from tequila_jax.model import PROJECTIONS, ModelConfig, projection_dims
from tequila_jax.quant import QuantConfig

TITLE = "part 8: sparse34 vs 2bit"
PACKINGS = ("2bit", "sparse34")


def random_34_exports(config: str, group: int = 128, seed: int = 0
                      ) -> dict[str, tqj.Export]:
  """`2bit` and `sparse34` exports of the same random 3:4 codes (one zero
  per 4 inputs, random signs) of `config`'s architecture, G = `group`,
  random alpha, c = 0, a random bf16 embedding (the memory part's export
  dtype); built directly, no model."""
  cfg = ModelConfig(models.model_config(
      config, max_seq_len=1024,
      quant=QuantConfig("absmean", "per_group", group_size=group)).arch)
  rng = np.random.default_rng(seed)
  tensors = {p: {} for p in PACKINGS}
  for name in PROJECTIONS:
    d_in, d_out = projection_dims(cfg, name)
    layers = {p: [] for p in PACKINGS}
    for _ in range(cfg.num_layers):
      codes = rng.choice(np.int8([-1, 1]), size=(d_in // 4, 4, d_out))
      np.put_along_axis(codes, rng.integers(0, 4, (d_in // 4, 1, d_out)), 0,
                        axis=1)
      codes = codes.reshape(d_in, d_out)
      for p in PACKINGS:
        layers[p].append(tqj.pack(codes, p))
    alpha = rng.uniform(0.01, 0.02, (cfg.num_layers, d_in // group, d_out))
    for p in PACKINGS:
      tensors[p].update({
          f"layers.{name}.codes": np.stack(layers[p]),
          f"layers.{name}.alpha": alpha.astype(np.float32),
          f"layers.{name}.c": np.zeros((cfg.num_layers, d_out), np.float32)})
  hidden = cfg.hidden_size
  shared = {
      "layers.attn_norm": np.ones((cfg.num_layers, hidden), ml_dtypes.bfloat16),
      "layers.mlp_norm": np.ones((cfg.num_layers, hidden), ml_dtypes.bfloat16),
      "final_norm": np.ones(hidden, ml_dtypes.bfloat16),
      "embed": (0.02 * rng.standard_normal((cfg.vocab_size, hidden),
                                           np.float32)).astype(
                                               ml_dtypes.bfloat16)}
  return {p: tqj.Export(cfg, p, {**tensors[p], **shared}, {"kind": "none"})
          for p in PACKINGS}


def bench_sparse34(config: str, rounds: int, prefill_rounds: int,
                   position: int = 128, prompt: int = 128) -> list[dict]:
  """Per packing, PackedLlama as the memory part's smallest 2bit variant
  holds it (`lean` = `lut`'s bytes alone, int8 embedding/head, fp16 alpha):
  `memory()`, one decode step at `position` (cache of 1,024; the `lut`
  kernel) and a `prompt`-token prefill (`logits="last"`; int8 codes
  unpacked in-program), each called round robin across the packings; also
  `auto`'s prefill (int8 codes held). Medians and ranges."""
  exports = random_34_exports(config)
  rows, models_ = [], {}
  for strategy in ("lean", "auto"):
    for p in PACKINGS:
      models_[strategy, p] = PackedLlama(
          exports[p], InferenceSettings(strategy, "int8", "float16"))
  del exports
  token = jnp.ones((1, 1), jnp.int32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(
      0, 1000, (1, prompt)), jnp.int32)
  filled, step_calls, prefill_calls = {}, {}, {}
  for (strategy, p), m in models_.items():
    if strategy == "lean":
      filled[p] = m.decode(tokens[:, :position], m.init_cache(1, 1024))[1]
      models.timed_step(m, token, filled[p])  # compile
      step_calls[p] = lambda m=m, p=p: models.timed_step(m, token,
                                                         filled[p])[0]

    def prefill(m=m):
      return m.decode(tokens, m.init_cache(1, 1024), logits="last")[0]
    jax.block_until_ready(prefill())  # compile
    prefill_calls[f"{p} ({strategy})"] = common.timed(prefill)
  load = _load()
  steps = common.round_robin(step_calls, rounds, warmup=2)
  prefills = common.round_robin(prefill_calls, prefill_rounds, warmup=1)
  for p in PACKINGS:
    mem = models_["lean", p].memory()
    t = steps[p]
    rows.append(dict(kind="decode", packing=p, strategy="lean",
                     position=position, tokens_per_s=1 / statistics.median(t),
                     ms=1e3 * statistics.median(t), min_ms=1e3 * min(t),
                     max_ms=1e3 * max(t), samples=len(t),
                     total_mib=mem["total"] / 2**20,
                     ternary_mib=mem["ternary"] / 2**20,
                     bits_per_ternary_weight=mem["bits_per_ternary_weight"]))
  for name, t in prefills.items():
    rows.append(dict(kind="prefill", packing=name.split()[0],
                     strategy=name.split()[1][1:-1], prompt=prompt,
                     tokens_per_s=prompt / statistics.median(t),
                     ms=1e3 * statistics.median(t), min_ms=1e3 * min(t),
                     max_ms=1e3 * max(t), samples=len(t)))
  # Ratios per round (the two packings were called back to back).
  for kind, times, names in (
      ("decode", steps, ("2bit", "sparse34")),
      ("prefill", prefills, ("2bit (lean)", "sparse34 (lean)")),
      ("prefill", prefills, ("2bit (auto)", "sparse34 (auto)"))):
    ratios = [a / b for a, b in zip(times[names[0]], times[names[1]])]
    rows.append(dict(kind=f"{kind} ratio", pair=" / ".join(names[::-1]),
                     speedup=statistics.median(ratios), min=min(ratios),
                     max=max(ratios), samples=len(ratios)))
  rows.append(dict(kind="load", **load, end=_load()))
  for r in rows:
    print(json.dumps(r), flush=True)
  return rows


def _load() -> dict:
  """The machine's 1-minute load average (others' processes included)."""
  import os  # pylint: disable=g-import-not-at-top
  return {"load_1min": os.getloadavg()[0]}


def add_flags(group) -> None:
  group.add_argument("--sparse34_rounds", type=int, default=0,
                     help="decode steps timed per packing (0: skip part 8)")
  group.add_argument("--sparse34_prefill_rounds", type=int, default=5)


def wanted(args) -> bool:
  return bool(args.sparse34_rounds)


def run(args) -> list[dict]:
  return bench_sparse34(args.decode_config, args.sparse34_rounds,
                        args.sparse34_prefill_rounds)


def render(results: dict, decode_config: str) -> list[str]:
  rows = results.get("sparse34", [])
  if not rows:
    return []
  del decode_config
  lines = ["sparse34 vs 2bit on the same random 3:4 codes (llama1b shape, "
           "G=128, int8 embedding/head, fp16 alpha; round robin, median "
           "(range)):", "",
           "| what | packing | strategy | tokens/s | ms | range ms | "
           "total MiB | bits/weight |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["kind"] in ("decode", "prefill"):
      lines.append(
          f"| {r['kind']} | {r['packing']} | {r['strategy']} | "
          f"{r['tokens_per_s']:.2f} | {r['ms']:.1f} | {r['min_ms']:.1f}–"
          f"{r['max_ms']:.1f} | "
          + (f"{r['total_mib']:.0f} | {r['bits_per_ternary_weight']:.3f} |"
             if "total_mib" in r else "- | - |"))
  lines += ["", "| ratio | pair | median | range | rounds |",
            "|---|---|---|---|---|"]
  lines += [f"| {r['kind']} | {r['pair']} | {r['speedup']:.3f}x | "
            f"{r['min']:.3f}–{r['max']:.3f} | {r['samples']} |"
            for r in rows if r["kind"].endswith("ratio")]
  load = next((r for r in rows if r["kind"] == "load"), None)
  if load:
    lines += ["", f"Load average (1 min) at start / end: "
              f"{load['load_1min']:.2f} / {load['end']['load_1min']:.2f}."]
  return lines
