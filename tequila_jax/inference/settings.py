"""`InferenceSettings`: how a `PackedLlama` holds and runs an export.

Run-time choices only: an export stores the architecture and the ternary
weights, never these. `python -m tequila_jax.generate` spells them
`--strategy`, `--embed`, `--alpha_dtype` and `--kv_dtype`.
"""

from __future__ import annotations

import dataclasses

from tequila_jax.inference.kernels import STRATEGIES

EMBEDS = ("float", "int8")
ALPHA_DTYPES = ("float32", "float16")
# How the KV cache may be held: bf16 halves what attention reads, as
# llama.cpp's default f16 cache does (decode 1.2x faster at 4,096 positions
# here; logits 2.5e-4 relative on a trained SmolLM2-135M).
KV_DTYPES = ("float32", "bfloat16")


def check_choice(name: str, value, allowed: tuple) -> None:
  """Refuses `value` of setting `name` unless it is one of `allowed`."""
  if value not in allowed:
    raise ValueError(f"{name} {value!r}: choose one of {allowed}.")


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """How a `PackedLlama` holds and runs an export (frozen, hashable).

  - `strategy`: the ternary kernel (`kernels.STRATEGIES`: `exact`, `lut`,
    `int8`, `q8k`, or `auto` = `lut` below 8 rows, else `int8`; `lean` =
    `auto` holding the packed bytes alone); it also decides which forms of
    the codes are held (`PackedLlama`).
  - `embed`: `float` keeps the embedding and head in the export's float
    dtype; `int8` holds them as int8 with one scale per vocabulary row
    (logits ~1e-2 relative).
  - `alpha_dtype`: `float32`, or `float16` for the group scales (half the
    bytes; rounded once at load, compute stays fp32).
  - `kv_dtype`: `float32`, or `bfloat16` for the KV cache (half the bytes
    attention reads; `PackedKVCache`).

  The defaults are the exact fp32 model with the fastest kernel per call.
  """
  strategy: str = "auto"
  embed: str = "float"
  alpha_dtype: str = "float32"
  kv_dtype: str = "float32"

  def __post_init__(self):
    check_choice("strategy", self.strategy, STRATEGIES)
    check_choice("embed", self.embed, EMBEDS)
    check_choice("alpha_dtype", self.alpha_dtype, ALPHA_DTYPES)
    check_choice("kv_dtype", self.kv_dtype, KV_DTYPES)
