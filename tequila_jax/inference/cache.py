"""`PackedKVCache`: the KV cache of the inference decoders (`PackedLlama`,
`DenseLlama`), laid out for CPU decoding rather than as `model.KVCache`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tequila_jax.inference.settings import KV_DTYPES, check_choice
from tequila_jax.model import ModelConfig


class PackedKVCache(NamedTuple):
  """Rotated keys and values of the positions decoded so far.

  `k`, `v`: `[layers, batch, kv_heads, max_len, head_dim]`, heads before
  positions (`layers.attend_cache`'s `"bksd"` layout: attention reads each
  head's filled prefix without a transpose); slot s of every sequence holds
  position s. Their dtype is the storage of the `kv_dtype` (`KV_DTYPES`):
  float32 values, or for `bfloat16` uint16 holding the bf16 bit patterns
  (XLA:CPU widens a bf16 dynamic-update-slice to fp32, converting the whole
  cache in every layer; an integer one updates in place). `dtype` says
  which values are held; `read` returns them as such. `length`: an int32
  scalar, the positions written (the same for every sequence).
  """
  k: jax.Array
  v: jax.Array
  length: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int | None = None,
           kv_dtype: str = "float32") -> "PackedKVCache":
    """An empty cache of `max_len` positions (default `cfg.max_seq_len`)."""
    check_choice("kv_dtype", kv_dtype, KV_DTYPES)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads,
             max_len or cfg.max_seq_len, cfg.head_dim)
    zeros = lambda: _as_stored(  # noqa: E731
        jnp.zeros(shape), jnp.dtype(kv_dtype))
    return cls(zeros(), zeros(), jnp.zeros((), jnp.int32))

  @property
  def dtype(self):
    """The dtype of the values held (bf16 for uint16 storage)."""
    if self.k.dtype == jnp.uint16:
      return jnp.dtype(jnp.bfloat16)
    return self.k.dtype

  @property
  def capacity(self) -> int:
    return self.k.shape[3]

  def write(self, layer: int, k: jax.Array, v: jax.Array) -> "PackedKVCache":
    """The cache with keys/values `[batch, kv_heads, T, head_dim]` of layer
    `layer` written at positions `length ..` (in place when the cache is
    donated); `length` is unchanged (`advance` moves it)."""
    at = (layer, 0, 0, self.length, 0)
    store = lambda buf, x: jax.lax.dynamic_update_slice(  # noqa: E731
        buf, _as_stored(x[None], self.dtype), at)
    return self._replace(k=store(self.k, k), v=store(self.v, v))

  def read(self, layer: int, length: int) -> tuple[jax.Array, jax.Array]:
    """Keys and values `[batch, kv_heads, length, head_dim]` of layer
    `layer`'s first `length` slots, as `dtype` values."""
    return tuple(_from_stored(buf[layer, :, :, :length], self.dtype)
                 for buf in (self.k, self.v))

  def advance(self, t: int) -> "PackedKVCache":
    """The cache with `t` more positions counted as written."""
    return self._replace(length=self.length + t)


def _as_stored(x, dtype):
  """`x` as `dtype` values in the cache's storage (bf16 as uint16 bits)."""
  x = x.astype(dtype)
  return (jax.lax.bitcast_convert_type(x, jnp.uint16)
          if dtype == jnp.bfloat16 else x)


def _from_stored(x, dtype):
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x
