"""Part 4: against llama.cpp (llama-cpp-python) on the same exported
weights: prefill and decode, alternating."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import common
from experiments.bench_cpu_inference import models
from tequila_jax import model as model_lib
from tequila_jax.inference import DenseLlama, InferenceSettings, PackedLlama
from tequila_jax.io import gguf, tqj
from tequila_jax.quant import QuantConfig

TITLE = "part 4: against llama.cpp"
MISSING = ("llama.cpp comparison skipped: pip install -e \".[llamacpp]\" "
           "(llama-cpp-python) to run it.")


def bench_llama_cpp(config: str, rounds: int, contexts=(128, 1024, 4096),
                    prompts=(128, 512),
                    layouts=(("per_channel", None), ("per_group", 128))
                    ) -> list[dict]:
  """Our `PackedLlama` (`auto`) and llama.cpp (llama-cpp-python, the
  `llamacpp` extra) on the same ternary weights: a random-init model of
  `config`'s architecture with the SmolLM2 vocabulary (so that the tokenizer
  embeds in the GGUF), per layout of `layouts`, exported by `write_export` +
  `write_gguf` (TQ2_0 where every 256-weight block has one scale, as
  per-channel 2048-wide rows; otherwise Q4_0, which holds codes x alpha
  exactly: G=128, or any layout of a 576-wide model). Prefill tokens/s at
  `prompts` (last position's logits, as llama.cpp's eval), with our bf16
  `DenseLlama` of the same shape in the rotation; one decode step at each of
  `contexts` filled positions; the runtimes alternating, and ours alone at
  the first context; medians and ranges over `rounds`."""
  import llama_cpp  # pylint: disable=g-import-not-at-top  (an optional extra)
  capacity = max(contexts) + 8
  ids = list(np.random.default_rng(0).integers(10, 40000, capacity))
  rows = []
  shape = dict(vocab_size=49152, max_seq_len=capacity, tie_embeddings=True)
  # The float baseline (weights' values do not matter), built before any
  # layout so that every layout runs in the same process state (built
  # after the first layout's model, that layout ran ~30% slower than the
  # same layout built second; the cause was not isolated).
  dense = DenseLlama(model_lib.Llama(models.model_config(
      config, quant=QuantConfig("none"), **shape), rngs=nnx.Rngs(0)),
                     "bfloat16")
  gc.collect()

  def prefill(model, n):  # the last position's logits, as llama.cpp's eval
    jax.block_until_ready(model.decode(jnp.asarray([ids[:n]]),
                                       model.init_cache(1, n), logits="last"))

  def step(model, n, filled):
    return models.timed_step(model, jnp.asarray([[ids[n]]]), filled)[0]

  def summary(kind, n, runtime, times, **extra):
    rows.append(dict(kind=kind, tokens=n, runtime=runtime,
                     tokens_per_s=(1 if kind == "decode" else n) /
                     statistics.median(times),
                     range=((1 if kind == "decode" else n) / max(times),
                            (1 if kind == "decode" else n) / min(times)),
                     **extra))
    print(json.dumps(rows[-1]), flush=True)

  for granularity, group in layouts:
    layout = f"G={group}" if group else granularity
    quant = QuantConfig("tequila", granularity, group_size=group or 128)
    with tempfile.TemporaryDirectory() as tmp:
      models.random_export(config, f"{tmp}/m.tqj", tokenizer=True,
                           quant=quant, **shape)
      ours = PackedLlama.load(f"{tmp}/m.tqj", InferenceSettings("auto"))
      types = gguf.write_gguf(tqj.read_export(f"{tmp}/m.tqj"),
                              f"{tmp}/m.gguf")["tensor_types"]
      theirs = llama_cpp.Llama(model_path=f"{tmp}/m.gguf", n_ctx=capacity,
                               n_batch=max(prompts), n_threads=os.cpu_count(),
                               verbose=False)
    fmt = "/".join(sorted(t for t in types if t.lower() not in ("f32", "f16")))
    # bf16 prefill in the first layout's rotation only (it is the same).
    runners = ({"bf16 DenseLlama": lambda n: prefill(dense, n)}
               if not rows else {})

    def theirs_prefill(n, theirs=theirs):
      theirs.reset()
      theirs.eval(ids[:n])

    def theirs_step(n, theirs=theirs):
      theirs.n_tokens = n  # drop the previous step's token, keep the prompt
      t0 = time.perf_counter()
      theirs.eval([ids[n]])
      return time.perf_counter() - t0

    runners = {"ours": lambda n, ours=ours: prefill(ours, n),
               "llama.cpp": theirs_prefill, **runners}
    for n in prompts:  # round 0 compiles / warms up
      times = common.round_robin({name: common.timed(fn, n)
                                  for name, fn in runners.items()},
                                 rounds, warmup=1)
      for name, t in times.items():
        summary("prefill", n, name, t, layout=layout, format=fmt)
    for i, n in enumerate(contexts):
      filled = ours.decode(jnp.asarray([ids[:n]]),
                           ours.init_cache(1, capacity))[1]
      theirs_prefill(n)
      times = common.round_robin(
          {"ours": lambda n=n, filled=filled, ours=ours: step(ours, n, filled),
           "llama.cpp": lambda n=n: theirs_step(n)}, rounds, warmup=1)
      if i == 0:  # ours alone: nothing else runs between its steps
        times.update(common.round_robin(
            {"ours alone": lambda n=n, filled=filled, ours=ours: step(
                ours, n, filled)},
            rounds, warmup=1))
      for name, t in times.items():
        summary("decode", n, name, t, layout=layout, format=fmt)
      del filled
    del ours, theirs
  return rows


def parse_layouts(names) -> tuple:
  """`per_channel` / `G=<n>` -> `(granularity, group)` pairs."""
  layouts = []
  for name in names:
    if name == "per_channel":
      layouts.append(("per_channel", None))
    elif name.startswith("G=") and name[2:].isdigit():
      layouts.append(("per_group", int(name[2:])))
    else:
      raise ValueError(f"layout {name!r}: use per_channel or G=<group size>.")
  return tuple(layouts)


def installed() -> bool:
  """Whether llama-cpp-python (the `llamacpp` extra) is there to compare."""
  try:
    import llama_cpp  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def add_flags(group) -> None:
  group.add_argument("--llama_cpp_layouts", nargs="+",
                     default=["per_channel", "G=128"], metavar="LAYOUT",
                     help="exports compared with llama.cpp: per_channel or "
                     "G=<group size> (e.g. G=64 for configs/smollm2_135m.py, "
                     "576 wide)")
  group.add_argument("--llama_cpp_rounds", type=int, default=10,
                     help="rounds of the llama.cpp comparison (0: skip; "
                     "skipped with a note without llama-cpp-python)")


def wanted(args) -> bool:
  return bool(args.llama_cpp_rounds) and installed()


def run(args) -> list[dict]:
  return bench_llama_cpp(args.decode_config, args.llama_cpp_rounds,
                         layouts=parse_layouts(args.llama_cpp_layouts))


def notes(args) -> dict:
  """results.json's `llama_cpp_note`: why the comparison did not run."""
  return dict(llama_cpp_note=MISSING if args.llama_cpp_rounds
              and not installed() else "")


def render(results: dict, decode_config: str) -> list[str]:
  versus = results.get("llama_cpp", [])
  note = results.get("llama_cpp_note", "")
  if not (versus or note):
    return []
  lines = [f"Against llama.cpp on the same ternary weights "
           f"({pathlib.Path(decode_config).name} architecture, SmolLM2 "
           "vocabulary; ours `auto`), alternating, tokens/s median "
           "(range); prefill also against our bf16 DenseLlama, decode also "
           "ours alone:", ""]
  if note:
    return lines + [note]
  lines += ["| layout (llama.cpp type) | | tokens | ours | llama.cpp | "
            "ours / llama.cpp | bf16 DenseLlama | ours / bf16 | ours alone |",
            "|---|---|---|---|---|---|---|---|---|"]
  by = {(r["layout"], r["kind"], r["tokens"], r["runtime"]): r
        for r in versus}
  cell = lambda r: (f"{r['tokens_per_s']:.1f} ({r['range'][0]:.1f}–"  # noqa: E731
                    f"{r['range'][1]:.1f})" if r else "-")
  keys = dict.fromkeys((r["layout"], r["kind"], r["tokens"]) for r in versus)
  dense = {r["tokens"]: r for r in versus
           if r["runtime"] == "bf16 DenseLlama"}
  for layout, kind, n in keys:
    ours, theirs = (by[(layout, kind, n, k)] for k in ("ours", "llama.cpp"))
    bf16 = dense.get(n) if kind == "prefill" else None
    alone = by.get((layout, kind, n, "ours alone"))
    vs_bf16 = (f"{ours['tokens_per_s'] / bf16['tokens_per_s']:.2f}x"
               if bf16 else "-")
    lines.append(
        f"| {layout} ({ours['format']}) | {kind} | {n} | {cell(ours)} | "
        f"{cell(theirs)} | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
        f" | {cell(bf16)} | {vs_bf16} | {cell(alone)} |")
  return lines
