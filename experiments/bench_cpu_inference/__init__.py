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
against fp32 at 128, 1,024 and 4,096 positions. Part 8 (only with
`--sparse34_rounds N`): the `sparse34` packing against `2bit` on the same
random 3:4 codes: memory held, decode step and prefill, round robin.
Writes `results.json` and
`results.md` to `--out`. Set GLIBC_TUNABLES (e.g.
glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=2000000000) yourself if wanted; the value in
effect is printed.

One module per part (`layers`, `decode`, `capacity`, `versus_llama_cpp`,
`ops`, `memory`, `kv_cache`), each with its flags, its measurement and its
table; `registry.PARTS` lists them, `__main__` runs them, `report` writes
the tables.
"""

from experiments.bench_cpu_inference.capacity import bench_capacity
from experiments.bench_cpu_inference.decode import bench_decode
from experiments.bench_cpu_inference.kv_cache import bench_kv_cache
from experiments.bench_cpu_inference.layers import bench_layers
from experiments.bench_cpu_inference.memory import bench_memory
from experiments.bench_cpu_inference.ops import bench_decode_ops
from experiments.bench_cpu_inference.versus_llama_cpp import (
    bench_llama_cpp, parse_layouts)

__all__ = ["bench_capacity", "bench_decode", "bench_decode_ops",
           "bench_kv_cache", "bench_layers", "bench_llama_cpp", "bench_memory",
           "parse_layouts"]
