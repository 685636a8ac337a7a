"""CPU inference speed: packed ternary kernels vs f32 / bf16 dense XLA.

    python -m experiments.bench_cpu_inference --out experiments/results/cpu_inference

Part 1, per layer, Llama-3.2-1B shapes (2048->8192, 8192->2048) at M = 1, 8,
128: `exact`, `lut` and `int8` ternary kernels (`tequila_jax.inference`,
jitted with PackedLlama's compiler options and held layouts) against `x @ W`
in f32 and bf16; medians of `--iters` (>= 20) after warm-up, all candidates
called round robin in one process. Part 2, end to end: greedy decode
tokens/s (median per-token time over >= 20 tokens) and weight memory of a
random-init model of `--decode_config`'s architecture (default Llama-3.2-1B)
exported as ternary vs the same weights in f32 and bf16. Ratios are dense
time / ternary time. Part 3: one decode step at position 128 with KV caches
of 256, 1,024 and 4,096 slots (the cost must not follow the capacity).
Part 4: against llama.cpp (llama-cpp-python) on the same exported weights,
per-channel (TQ2_0) and G=128 (Q4_0): prefill at 128 and 512 tokens (and
our bf16 DenseLlama), decode at 128, 1,024 and 4,096 positions (and ours
alone). Part 5: where a decode step's time goes, per op, beside each op's
bandwidth floor. Part 6: what PackedLlama holds per layout, strategy,
embedding and alpha dtype. Part 7: a decode step with a bf16 KV cache
against fp32 at 128, 1,024 and 4,096 positions. Writes `results.json` and `results.md` to
`--out`. Set
GLIBC_TUNABLES (e.g. glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=2000000000) yourself if wanted; the value in effect is
printed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax.inference import kernels
from tequila_jax.io import tqj


def time_side_by_side(fns: dict, iters: int, warmup: int = 3,
                      keep_all: bool = False) -> dict:
  """Median seconds of each `name -> (fn, args)` (every time if `keep_all`),
  calls interleaved round robin so that drift in the machine's speed hits
  every candidate alike."""
  for fn, args in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, (fn, args) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  if keep_all:
    return times
  return {name: statistics.median(t) for name, t in times.items()}


def bench_layers(iters: int, group: int = 128) -> list[dict]:
  """Llama-3.2-1B projection shapes; the kernels as PackedLlama runs them."""
  rng = np.random.default_rng(0)
  rows = []
  kernel_jit = functools.partial(  # as the inference decoders compile
      jax.jit, compiler_options=(kernels.CPU_COMPILER_OPTIONS
                                 if jax.default_backend() == "cpu" else None))
  layer = kernel_jit(lambda x, held, strategy: kernels.ternary_linear(
      x, held["packed"], held["alpha"], held["c"], strategy,
      held.get("codes"), held.get("lut")), static_argnames="strategy")
  for d_in, d_out in ((2048, 8192), (8192, 2048)):
    codes = rng.integers(-1, 2, (d_in, d_out)).astype(np.int8)
    held = dict(packed=jnp.asarray(tqj.pack_2bit(codes)),
                alpha=jnp.asarray(rng.uniform(0.5, 1.5, (d_in // group, d_out))
                                  .astype(np.float32)),
                c=jnp.asarray(rng.normal(size=d_out).astype(np.float32)))
    held["lut"] = kernels.lut_layout(held["packed"], d_in // group)
    held["codes"] = kernels.int8_layout(jnp.asarray(codes), d_in // group)
    w32 = jnp.asarray(rng.normal(size=(d_in, d_out)).astype(np.float32))
    w16 = w32.astype(jnp.bfloat16)
    for m in (1, 8, 128):
      x = jnp.asarray(rng.normal(size=(m, d_in)).astype(np.float32))
      # The dense matmul DenseLlama runs (one-row bf16 calls padded to two).
      fns = {"f32": (kernel_jit(kernels.dense), (x, w32)),
             "bf16": (kernel_jit(kernels.dense), (x, w16))}
      for s in ("exact", "lut", "int8"):
        if s == "lut" and m > 8:
          continue  # the table costs M x in/4 x 256: a decode kernel
        fns[s] = (functools.partial(layer, strategy=s), (x, held))
      ms = {k: v * 1e3 for k, v in time_side_by_side(fns, iters).items()}
      best = min((v, k) for k, v in ms.items() if k not in ("f32", "bf16"))
      row = dict(shape=f"{d_in}x{d_out}", m=m,
                 **{f"{k}_ms": v for k, v in ms.items()}, best=best[1],
                 vs_f32=ms["f32"] / best[0], vs_bf16=ms["bf16"] / best[0])
      # Memory-bandwidth floor: the ternary bytes (2-bit codes, alpha, c)
      # read at the bandwidth that the f32 matvec itself reaches.
      ternary_bytes = d_in * d_out / 4 + 4 * (d_in // group + 1) * d_out
      bandwidth = 4 * d_in * d_out / (ms["f32"] * 1e-3)
      row.update(f32_read_gbs=bandwidth / 1e9,
                 floor_ms=ternary_bytes / bandwidth * 1e3)
      row["best_vs_floor"] = best[0] / row["floor_ms"]
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def _token_times(model, prompt, tokens: int, runs: int) -> list[float]:
  """Seconds per generated token (every step of `runs` generations)."""
  from tequila_jax import sampling  # pylint: disable=g-import-not-at-top
  list(sampling.generate(model, prompt, max_new_tokens=2))  # compile
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    for i, _ in enumerate(sampling.generate(model, prompt,
                                            max_new_tokens=tokens)):
      t1 = time.perf_counter()
      if i:  # the first token's time includes the prefill
        times.append(t1 - t0)
      t0 = t1
  return times


def bench_decode(config: str, tokens: int, runs: int) -> list[dict]:
  """Greedy decode of a random-init model of `config`'s architecture: the
  ternary export (PackedLlama, `lut` kernels) vs the same float weights W in
  f32 and bf16 through the same decode loop (DenseLlama)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tequila_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from tequila_jax.inference import DenseLlama, PackedLlama  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  cfg = _model_config(config, max_seq_len=256)
  qat = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(qat, nnx.Param)
  with tempfile.TemporaryDirectory() as tmp:
    report = tqj.write_export(qat, f"{tmp}/m.tqj")
    base3 = tqj.size_report(tqj.export_tensors(qat, "base3"), cfg)
    del qat
    packed = PackedLlama.load(f"{tmp}/m.tqj", "lut")
    packed_i8 = PackedLlama.load(f"{tmp}/m.tqj", "lut", embed="int8")
  n_params = sum(x.size for x in jax.tree.leaves(params))
  sizes = dict(decode_config=config, params=n_params,
               **{k: v for k, v in report.items() if v},
               base3_ternary_bits_per_weight=base3["ternary_bits_per_weight"],
               base3_tensor_bytes=base3["tensor_bytes"])
  print(json.dumps(sizes), flush=True)
  rows = []

  def record(name, model, weight_bytes, n_tokens, n_runs, read_bytes=None):
    times = _token_times(model, list(range(1, 9)), n_tokens, n_runs)
    rows.append(dict(model=name, tokens_per_s=1 / statistics.median(times),
                     ms_per_token=1e3 * statistics.median(times),
                     samples=len(times), weight_mib=weight_bytes / 2**20,
                     read_mib_per_token=(read_bytes or weight_bytes) / 2**20))
    print(json.dumps(rows[-1]), flush=True)

  record("ternary (lut)", packed, packed.memory()["total"], tokens, runs)
  head_t = packed.params["head_t"]
  hidden = jax.random.normal(jax.random.key(0), (1, head_t.shape[1]))
  want = hidden @ head_t.T
  got = kernels.int8_dense(hidden, packed_i8.params["head_t"]["w_t"],
                           packed_i8.params["head_t"]["scale"])
  head_error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  del packed
  record("ternary (lut) + int8 embedding/head", packed_i8,
         packed_i8.memory()["total"], tokens, runs)
  rows[-1]["head_logits_rel_error"] = head_error  # on a random hidden state
  del packed_i8
  float_model = model_lib.abstract_model(
      cfg.replace(quant=cfg.quant.__class__("none")))
  nnx.update(float_model, params)
  del params
  for dtype, size in (("float32", 4), ("bfloat16", 2)):
    dense = DenseLlama(float_model, dtype)
    record(dtype, dense, n_params * size, tokens, runs)
    del dense
  # For reference: the training model's own decode (stacked weights under
  # lax.scan, which XLA:CPU copies out layer by layer).
  record("float32 (tequila_jax.model.Llama)", float_model, n_params * 4,
         tokens, 1)
  # Floor: the ternary model's bytes read per token at the bandwidth that the
  # f32 model's decode reaches (its weights / its time per token).
  f32_row = next(r for r in rows if r["model"] == "float32")
  bandwidth = n_params * 4 / (f32_row["ms_per_token"] * 1e-3)
  for r in rows:
    if r["model"].startswith("ternary"):
      r["floor_ms"] = r["read_mib_per_token"] * 2**20 / bandwidth * 1e3
      r["vs_floor"] = r["ms_per_token"] / r["floor_ms"]
  rows[0]["sizes"] = sizes
  return rows


def timed_step(model, token, filled) -> tuple[float, jax.Array]:
  """Seconds and logits of one `model.decode(token, cache)` on a copy of
  the `filled` cache, made beforehand (the step donates its cache)."""
  cache = jax.tree.map(jnp.copy, filled)
  jax.block_until_ready(cache)
  t0 = time.perf_counter()
  logits = jax.block_until_ready(model.decode(token, cache)[0])
  return time.perf_counter() - t0, logits


def bench_capacity(config: str, rounds: int, position: int = 128,
                   capacities=(256, 1024, 4096)) -> list[dict]:
  """Time of one decode step at `position` with caches of several
  capacities (same model, `lut`), called round robin; the filled part is
  the same, so the times should be too."""
  from tequila_jax.inference import PackedLlama  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    _random_export(config, f"{tmp}/m.tqj", max_seq_len=max(capacities))
    model = PackedLlama.load(f"{tmp}/m.tqj", "lut")
  prompt = jnp.ones((1, position), jnp.int32)
  token = jnp.ones((1, 1), jnp.int32)
  filled = {}
  for c in capacities:  # compile, and a cache filled to `position`
    filled[c] = model.decode(prompt, model.init_cache(1, c))[1]
    jax.block_until_ready(model.decode(token, filled[c])[0])
    filled[c] = model.decode(prompt, model.init_cache(1, c))[1]
  times = {c: [] for c in capacities}
  for _ in range(rounds):
    for c in capacities:
      times[c].append(timed_step(model, token, filled[c])[0])
  base = statistics.median(times[capacities[0]])
  rows = [dict(capacity=c, position=position,
               ms=1e3 * statistics.median(t), min_ms=1e3 * min(t),
               max_ms=1e3 * max(t), vs_smallest=statistics.median(t) / base,
               samples=len(t)) for c, t in times.items()]
  for r in rows:
    print(json.dumps(r), flush=True)
  return rows


def _model_config(config: str, **changes):
  """`config`'s ModelConfig with `changes`, activations fp32."""
  from tequila_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.to_model_config(config_lib.load_config_file(
      config).model).replace(dtype="float32", **changes)


def _random_export(config: str, path, tokenizer: bool = False,
                   float_dtype: str = "float32", **changes):
  """Writes a random-init ternary export of `config`'s architecture with
  `changes` (ModelConfig fields; activations fp32), with the SmolLM2
  tokenizer if `tokenizer` (a GGUF needs one); returns its cfg."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tequila_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from tequila_jax.io import locations  # pylint: disable=g-import-not-at-top
  cfg = _model_config(config, **changes)
  tqj.write_export(model_lib.Llama(cfg, rngs=nnx.Rngs(0)), path,
                   float_dtype=float_dtype, tokenizer=locations.load_tokenizer(
                       "asset:smollm2_gguf") if tokenizer else None)
  return cfg


def read_bandwidth(mib: int = 512, iters: int = 10) -> float:
  """Bytes/s that a jitted sum over a `mib` MiB fp32 array reads (median)."""
  a = jnp.ones((mib * 2**18,), jnp.float32)
  t = time_side_by_side({"sum": (jax.jit(jnp.sum), (a,))}, iters)["sum"]
  return a.nbytes / t


def bench_decode_ops(config: str, rounds: int, position: int = 128,
                     layouts=(("per_channel", None), ("per_group", 128))
                     ) -> list[dict]:
  """Where a decode step's time goes: one step at `position` (cache of
  1,024) and each op of it timed alone with the model's own arrays (layer
  fused projections through `ternary_linear` over every layer's arrays in
  one executable, attention over the attended prefix likewise, the head),
  all round robin; `rest` is the step minus
  the ops (norms, RoPE, cache writes, embedding, dispatch). Floor: the
  bytes an op reads at the best read rate seen (`read_bandwidth`'s sum, or
  the head's dot where faster). 1B-class shape with the SmolLM2
  vocabulary (tied fp32 embedding), `auto` (= `lut` at one token)."""
  from tequila_jax.inference import PackedLlama, model as inf_model  # pylint: disable=g-import-not-at-top
  from tequila_jax.quant import QuantConfig  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  bandwidth = read_bandwidth()
  kernel_jit = functools.partial(jax.jit,
                                 compiler_options=kernels.CPU_COMPILER_OPTIONS)
  rows = []
  for granularity, group in layouts:
    quant = QuantConfig("tequila", granularity, group_size=group or 128)
    with tempfile.TemporaryDirectory() as tmp:
      cfg = _random_export(config, f"{tmp}/m.tqj", vocab_size=49152,
                           max_seq_len=1024, tie_embeddings=True, quant=quant)
      model = PackedLlama.load(f"{tmp}/m.tqj", "auto")
    layers = model.params["layers"]
    rng = np.random.default_rng(0)
    vec = lambda n: jnp.asarray(rng.normal(size=(1, n)), jnp.float32)  # noqa: E731
    # Each op over all layers' own arrays in one executable, as in the step
    # (no per-call dispatch; each layer's weights read from memory).
    every_layer = lambda op: kernel_jit(  # noqa: E731
        lambda x, per_layer: sum(op(x, a) for a in per_layer))
    fns, reads = {}, {}
    for name, entry in layers[0].items():
      d_in = entry["lut"].shape[0] * entry["lut"].shape[2] * 4
      fns[name] = (every_layer(model._linear),  # pylint: disable=protected-access
                   (vec(d_in), [layer[name] for layer in layers]))
      reads[name] = cfg.num_layers * sum(entry[k].nbytes
                                         for k in ("lut", "alpha", "c"))
    attend = max(inf_model.ATTEND_MIN, 1 << position.bit_length())
    # The decoders' own attention over their heads-major cache's prefix.
    kv = [jnp.asarray(rng.normal(size=(2, 1, cfg.num_kv_heads, attend,
                                       cfg.head_dim)), jnp.float32)
          for _ in range(cfg.num_layers)]
    q = jnp.asarray(rng.normal(size=(1, 1, cfg.num_heads, cfg.head_dim)),
                    jnp.float32)
    fns["attention"] = (every_layer(lambda q, kv: inf_model._attend(  # pylint: disable=protected-access
        q, kv[0], kv[1], jnp.full((1, 1), position))), (q, kv))
    reads["attention"] = sum(a.nbytes for a in kv)
    head = model.params["head_t"]
    fns["head"] = (kernel_jit(functools.partial(kernels.dense,
                                                transposed=True)),
                   (vec(cfg.hidden_size), head))
    reads["head"] = head.nbytes
    filled = model.decode(jnp.ones((1, position), jnp.int32),
                          model.init_cache(1, 1024))[1]
    token = jnp.ones((1, 1), jnp.int32)

    def step(filled=filled, model=model):  # a copy: the step donates it
      cache = jax.tree.map(jnp.copy, filled)
      return model.decode(token, cache)[0]
    fns["step"] = (step, ())
    times = time_side_by_side(fns, rounds, keep_all=True)
    step_ms = 1e3 * statistics.median(times.pop("step"))
    # The head is a pure streaming read: where it beats the sum, its rate is
    # the better estimate of what the memory gives.
    rate = max(bandwidth, reads["head"] / statistics.median(times["head"]))
    parts = {}
    for name, t in times.items():
      parts[name] = dict(op=name, ms=1e3 * statistics.median(t),
                         min_ms=1e3 * min(t), max_ms=1e3 * max(t),
                         floor_ms=reads[name] / rate * 1e3)
    rest = step_ms - sum(r["ms"] for r in parts.values())
    label = granularity if not group else f"G={group}"
    for r in [*parts.values(), dict(op="rest", ms=rest),
              dict(op="step", ms=step_ms,
                   floor_ms=sum(r["floor_ms"] for r in parts.values()))]:
      r.update(layout=label, share=r["ms"] / step_ms,
               read_gbs=rate / 1e9, sum_read_gbs=bandwidth / 1e9,
               position=position)
      rows.append(r)
      print(json.dumps(r), flush=True)
  return rows


def bench_kv_cache(config: str, rounds: int, positions=(128, 1024, 4096)
                   ) -> list[dict]:
  """One decode step at each of `positions` with an fp32 and a bf16 KV cache
  (same per-channel model, SmolLM2 vocabulary, `auto`), round robin: the
  median time of each, the per-round ratio's median and range, and the
  logits' relative difference."""
  from tequila_jax.inference import PackedLlama  # pylint: disable=g-import-not-at-top
  from tequila_jax.quant import QuantConfig  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  capacity = max(positions) + 8
  with tempfile.TemporaryDirectory() as tmp:
    _random_export(config, f"{tmp}/m.tqj", vocab_size=49152,
                   max_seq_len=capacity, tie_embeddings=True,
                   quant=QuantConfig("tequila", "per_channel"))
    export = tqj.read_export(f"{tmp}/m.tqj")
  models = {k: PackedLlama(export, "auto", kv_dtype=k)
            for k in ("float32", "bfloat16")}
  del export
  ids = np.random.default_rng(0).integers(10, 40000, capacity)
  rows = []
  for n in positions:
    filled = {k: m.decode(jnp.asarray([ids[:n]]), m.init_cache(1, capacity))[1]
              for k, m in models.items()}
    token = jnp.asarray([[ids[n]]])
    logits = {k: timed_step(m, token, filled[k])[1] for k, m in models.items()}
    times = {k: [] for k in models}
    for _ in range(rounds):
      for k, m in models.items():
        times[k].append(timed_step(m, token, filled[k])[0])
    ratios = sorted(a / b for a, b in zip(times["float32"], times["bfloat16"]))
    rows.append(dict(
        position=n, f32_ms=1e3 * statistics.median(times["float32"]),
        bf16_ms=1e3 * statistics.median(times["bfloat16"]),
        speedup_median=statistics.median(ratios),
        speedup_range=(ratios[0], ratios[-1]),
        logits_rel_error=float(jnp.linalg.norm(
            logits["bfloat16"] - logits["float32"]) / jnp.linalg.norm(
                logits["float32"]))))
    print(json.dumps(rows[-1]), flush=True)
    del filled
  return rows


MEMORY_VARIANTS = (  # strategy, embed, alpha_dtype
    ("lut", "float", "float32"), ("lut", "float", "float16"),
    ("int8", "float", "float32"), ("auto", "float", "float32"),
    ("lut", "int8", "float16"), ("auto", "int8", "float16"))


def bench_memory(config: str,
                 layouts=(("per_group", 128), ("per_group", 256),
                          ("per_channel", None))) -> list[dict]:
  """What `PackedLlama` holds (`memory()`) for a random-init bf16 export of
  `config`'s architecture, per layout and `MEMORY_VARIANTS`."""
  from tequila_jax.inference import PackedLlama  # pylint: disable=g-import-not-at-top
  from tequila_jax.quant import QuantConfig  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  rows = []
  for granularity, group in layouts:
    quant = QuantConfig("tequila", granularity, group_size=group or 128)
    with tempfile.TemporaryDirectory() as tmp:
      _random_export(config, f"{tmp}/m.tqj", float_dtype="bfloat16",
                     quant=quant)
      for strategy, embed, alpha_dtype in MEMORY_VARIANTS:
        m = PackedLlama.load(f"{tmp}/m.tqj", strategy, embed, alpha_dtype)
        rows.append(dict(layout=f"G={group}" if group else granularity,
                         strategy=strategy, embed=embed if embed == "int8"
                         else "bf16", alpha=alpha_dtype, **m.memory()))
        del m  # a model and its compiled step form a cycle: collect it now
        gc.collect()
        print(json.dumps(rows[-1]), flush=True)
  return rows


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
  exactly: G=128, or any layout of a 576-wide model). Prefill tokens/s at `prompts` (last position's logits, as
  llama.cpp's eval), with our bf16 `DenseLlama` of the same shape in the
  rotation; one decode step at each of `contexts` filled positions; the
  runtimes alternating, and ours alone at the first context; medians and
  ranges over `rounds`."""
  import llama_cpp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tequila_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from tequila_jax.inference import DenseLlama, PackedLlama  # pylint: disable=g-import-not-at-top
  from tequila_jax.io import gguf  # pylint: disable=g-import-not-at-top
  from tequila_jax.quant import QuantConfig  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  capacity = max(contexts) + 8
  ids = list(np.random.default_rng(0).integers(10, 40000, capacity))
  rows = []
  shape = dict(vocab_size=49152, max_seq_len=capacity, tie_embeddings=True)
  # The float baseline (weights' values do not matter), built before any
  # layout so that every layout runs in the same process state (built
  # after the first layout's model, that layout ran ~30% slower than the
  # same layout built second; the cause was not isolated).
  dense = DenseLlama(model_lib.Llama(_model_config(
      config, quant=QuantConfig("none"), **shape), rngs=nnx.Rngs(0)),
                     "bfloat16")
  gc.collect()

  def prefill(model, n):  # the last position's logits, as llama.cpp's eval
    jax.block_until_ready(model.decode(jnp.asarray([ids[:n]]),
                                       model.init_cache(1, n), logits="last"))

  def step(model, n, filled):
    return timed_step(model, jnp.asarray([[ids[n]]]), filled)[0]

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
      _random_export(config, f"{tmp}/m.tqj", tokenizer=True, quant=quant,
                     **shape)
      ours = PackedLlama.load(f"{tmp}/m.tqj", "auto")
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
    for n in prompts:
      times = {name: [] for name in runners}
      for r in range(rounds + 1):  # round 0 compiles / warms up
        for name, fn in runners.items():
          t0 = time.perf_counter()
          fn(n)
          if r:
            times[name].append(time.perf_counter() - t0)
      for name, t in times.items():
        summary("prefill", n, name, t, layout=layout, format=fmt)
    for i, n in enumerate(contexts):
      filled = ours.decode(jnp.asarray([ids[:n]]),
                           ours.init_cache(1, capacity))[1]
      theirs_prefill(n)
      times = {"ours": [], "llama.cpp": []}
      for r in range(rounds + 1):
        t_ours, t_theirs = step(ours, n, filled), theirs_step(n)
        if r:
          times["ours"].append(t_ours)
          times["llama.cpp"].append(t_theirs)
      if i == 0:  # ours alone: nothing else runs between its steps
        step(ours, n, filled)
        times["ours alone"] = [step(ours, n, filled) for _ in range(rounds)]
      for name, t in times.items():
        summary("decode", n, name, t, layout=layout, format=fmt)
      del filled
    del ours, theirs
  return rows


def render(results: dict, decode_config: str) -> str:
  """The markdown tables of `results` (results.json's keys)."""
  layers, decode = results.get("layers", []), results.get("decode", [])
  capacity, ops = results.get("capacity", []), results.get("ops", [])
  memory, versus = results.get("memory", []), results.get("llama_cpp", [])
  versus_note = results.get("llama_cpp_note", "")
  lines = ["| layer | M | f32 ms | bf16 ms | exact ms | lut ms | int8 ms | "
           "best vs f32 | best vs bf16 | floor ms (f32 GB/s) | best / floor |",
           "|---|---|---|---|---|---|---|---|---|---|---|"] if layers else []
  for r in layers:
    get = lambda k, r=r: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    lines.append(f"| {r['shape']} | {r['m']} | {get('f32_ms')} | "
                 f"{get('bf16_ms')} | {get('exact_ms')} | {get('lut_ms')} | "
                 f"{get('int8_ms')} | {r['vs_f32']:.2f}x ({r['best']}) | "
                 f"{r['vs_bf16']:.2f}x | {r['floor_ms']:.3f} "
                 f"({r['f32_read_gbs']:.0f}) | {r['best_vs_floor']:.1f}x |")
  if decode:
    tern = decode[0]["tokens_per_s"]
    best = {r["model"]: r["tokens_per_s"] for r in decode}
    tern_i8 = best["ternary (lut) + int8 embedding/head"]
    lines += ["", f"End to end, {pathlib.Path(decode_config).name} "
              "architecture (random init), greedy decode, median per token:", "",
              "| model | tokens/s | ms/token | samples | weights MiB | "
              "ternary (f32 head) speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['tokens_per_s']:.2f} | "
              f"{r['ms_per_token']:.1f} | {r['samples']} | "
              f"{r['weight_mib']:.0f} | {tern / r['tokens_per_s']:.2f}x |"
              for r in decode]
    sizes = decode[0]["sizes"]
    lines += ["", f"Linear-layer weights: {sizes['ternary_bits_per_weight']:.2f} "
              f"bits each in the 2bit export, "
              f"{sizes['base3_ternary_bits_per_weight']:.2f} in base3 (codes, "
              "fp32 alpha per group and c). Floor (the weights a token reads, "
              "at the bandwidth the f32 decode reaches): "
              + "; ".join(f"{r['model']} {r['floor_ms']:.1f} ms, measured "
                          f"{r['vs_floor']:.1f}x it" for r in decode
                          if "floor_ms" in r) + "."]
    lines += ["", f"Ternary vs f32: {tern / best['float32']:.2f}x; "
              f"vs bf16: {tern / best['bfloat16']:.2f}x. With the int8 embedding/head "
              f"(int8 dot, hidden state as value + residual; head logits rel. "
              f"error {decode[1]['head_logits_rel_error']:.1e} on a random "
              "hidden state, nan: not recorded): "
              f"{tern_i8 / best['float32']:.2f}x f32, "
              f"{tern_i8 / best['bfloat16']:.2f}x bf16."]
  if capacity:
    lines += ["", f"One decode step at position {capacity[0]['position']} "
              "against the KV cache's capacity (ternary `lut`, median of "
              f"{capacity[0]['samples']} steps, round robin):", "",
              "| cache slots | ms/step | range | vs smallest |",
              "|---|---|---|---|"]
    lines += [f"| {r['capacity']} | {r['ms']:.1f} | {r['min_ms']:.1f}–"
              f"{r['max_ms']:.1f} | {r['vs_smallest']:.2f}x |" for r in capacity]
  if versus or versus_note:
    lines += ["", f"Against llama.cpp on the same ternary weights "
              f"({pathlib.Path(decode_config).name} architecture, SmolLM2 "
              "vocabulary; ours `auto`), alternating, tokens/s median "
              "(range); prefill also against our bf16 DenseLlama, decode also "
              "ours alone:", ""]
    if versus_note:
      lines.append(versus_note)
    else:
      lines += ["| layout (llama.cpp type) | | tokens | ours | llama.cpp | "
                "ours / llama.cpp | bf16 DenseLlama | ours / bf16 | ours alone |",
                "|---|---|---|---|---|---|---|---|---|"]
      by = {(r["layout"], r["kind"], r["tokens"], r["runtime"]): r
            for r in versus}
      cell = lambda r: (f"{r['tokens_per_s']:.1f} ({r['range'][0]:.1f}–"  # noqa: E731
                        f"{r['range'][1]:.1f})" if r else "-")
      keys = dict.fromkeys((r["layout"], r["kind"], r["tokens"])
                           for r in versus)
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
  if ops:
    lines += ["", f"Where a decode step's time goes (position "
              f"{ops[0]['position']}, SmolLM2 vocabulary, fp32 tied head; "
              "each op over every layer in one executable, median (range) "
              "of rounds; floor: the bytes it reads at "
              f"{ops[0]['read_gbs']:.1f} GB/s, the best of a jitted sum's and the "
              "head's read rates):", "",
              "| layout | op | ms per token | range | share | floor ms | "
              "x floor |", "|---|---|---|---|---|---|---|"]
    for r in ops:
      rng_ = (f"{r['min_ms']:.1f}–{r['max_ms']:.1f}" if "min_ms" in r else "-")
      floor = r.get("floor_ms")
      lines.append(f"| {r['layout']} | {r['op']} | {r['ms']:.1f} | {rng_} | "
                   f"{r['share']:.0%} | "
                   + (f"{floor:.1f} | {r['ms'] / floor:.1f}x |" if floor
                      else "- | - |"))
  if results.get("kv_cache"):
    lines += ["", "One decode step with a bf16 KV cache against fp32 (`kv_dtype`"
              "; per-channel, SmolLM2 vocabulary; median ms, fp32 / bf16 per "
              "round: median and range; logits' relative difference):", "",
              "| position | fp32 ms | bf16 ms | speed-up | range | logits |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['position']} | {r['f32_ms']:.1f} | {r['bf16_ms']:.1f} | "
              f"{r['speedup_median']:.2f}x | {r['speedup_range'][0]:.2f}–"
              f"{r['speedup_range'][1]:.2f}x | {r['logits_rel_error']:.1e} |"
              for r in results["kv_cache"]]
  if memory:
    lines += ["", f"What PackedLlama holds, {pathlib.Path(decode_config).name}"
              " architecture, bf16 export (MiB; bits per ternary weight: the "
              "decode form = 2-bit bytes + alpha + c; all held adds `int8`/"
              "`auto`'s int8 codes for batched calls):", "",
              "| layout | strategy | embedding/head | alpha | ternary MiB | "
              "embedding/head MiB | total MiB | bits/weight (decode) | "
              "bits/weight (all held) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['strategy']} | {r['embed']} | {r['alpha']} "
              f"| {r['ternary'] / 2**20:.0f} | {r['embed_head'] / 2**20:.0f} | "
              f"{r['total'] / 2**20:.0f} | {r['bits_per_ternary_weight']:.3f} | "
              f"{r['bits_per_ternary_weight_all_held']:.3f} |" for r in memory]
  return "\n".join(lines) + "\n"


def parse_layouts(names) -> tuple:
  """`per_channel` / `G=<n>` -> `(granularity, group)` pairs."""
  layouts = []
  for name in names:
    if name == "per_channel":
      layouts.append(("per_channel", None))
    elif name.startswith("G=") and name[2:].isdigit():
      layouts.append(("per_group", int(name[2:])))
    else:
      raise SystemExit(f"layout {name!r}: use per_channel or G=<group size>.")
  return tuple(layouts)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--out", default="")
  p.add_argument("--skip_decode", action="store_true")
  p.add_argument("--decode_config", default=str(
      pathlib.Path(__file__).resolve().parent.parent / "configs/llama1b.py"),
                 help="architecture of the end-to-end model (random init)")
  p.add_argument("--tokens", type=int, default=33,
                 help="tokens per generation; per-token times are medianed")
  p.add_argument("--runs", type=int, default=2, help="generations per model")
  p.add_argument("--skip_layers", action="store_true")
  p.add_argument("--capacity_rounds", type=int, default=30,
                 help="decode steps timed per cache capacity (0: skip)")
  p.add_argument("--skip_ops", action="store_true",
                 help="skip the per-op profile of a decode step")
  p.add_argument("--ops_rounds", type=int, default=20)
  p.add_argument("--skip_memory", action="store_true")
  p.add_argument("--kv_rounds", type=int, default=8,
                 help="rounds of the fp32 vs bf16 KV cache steps (0: skip)")
  p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                 help="measure nothing: tables from these runs' results.json "
                 "(parts run separately), written to --out")
  p.add_argument("--llama_cpp_layouts", nargs="+",
                 default=["per_channel", "G=128"], metavar="LAYOUT",
                 help="exports compared with llama.cpp: per_channel or G=<group "
                 "size> (e.g. G=64 for configs/smollm2_135m.py, 576 wide)")
  p.add_argument("--llama_cpp_rounds", type=int, default=10,
                 help="rounds of the llama.cpp comparison (0: skip; skipped "
                 "with a note without llama-cpp-python)")
  args = p.parse_args()
  if args.merge:
    write(merge(args.merge), args.decode_config, args.out)
    return
  machine = dict(cpus=os.cpu_count(), processor=platform.processor(),
                 platform=platform.platform(), jax=jax.__version__,
                 xla_flags=os.environ.get("XLA_FLAGS", ""),
                 glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
  print(json.dumps(machine))
  # Each part's models should die with it: collect them and drop the compiled
  # steps that reference them. (All parts in one process were OOM-killed at
  # 24 GB in part 3 before this; on a small machine run parts separately.)
  released = lambda rows: (gc.collect(), jax.clear_caches(), rows)[-1]  # noqa: E731
  layers = [] if args.skip_layers else released(bench_layers(args.iters))
  decode = [] if args.skip_decode else released(bench_decode(
      args.decode_config, args.tokens, args.runs))
  capacity = (released(bench_capacity(args.decode_config, args.capacity_rounds))
              if args.capacity_rounds else [])
  ops = ([] if args.skip_ops else
         released(bench_decode_ops(args.decode_config, args.ops_rounds)))
  memory = ([] if args.skip_memory else
            released(bench_memory(args.decode_config)))
  kv_cache = (released(bench_kv_cache(args.decode_config, args.kv_rounds))
              if args.kv_rounds else [])
  versus, versus_note = [], ""
  if args.llama_cpp_rounds:
    try:
      import llama_cpp  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      versus_note = ("llama.cpp comparison skipped: pip install -e "
                     "\".[llamacpp]\" (llama-cpp-python) to run it.")
    else:
      versus = bench_llama_cpp(args.decode_config, args.llama_cpp_rounds,
                               layouts=parse_layouts(args.llama_cpp_layouts))
  results = dict(machine=machine, layers=layers, decode=decode,
                 capacity=capacity, ops=ops, memory=memory,
                 kv_cache=kv_cache, llama_cpp=versus,
                 llama_cpp_note=versus_note)
  write(results, args.decode_config, args.out)


def write(results: dict, decode_config: str, out: str = ""):
  """Prints the tables; writes results.json and results.md to `out`."""
  text = render(results, decode_config)
  print(text)
  if out:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(
        f"Machine: {json.dumps(results['machine'])}\n\n" + text)


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


if __name__ == "__main__":
  main()
