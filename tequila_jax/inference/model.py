"""LLaMA decoders for CPU inference with a KV cache: `PackedLlama` over a
packed `.tqj` export, and `DenseLlama`, the same decode loop over float
weights (the baseline the ternary model is measured against).

PackedLlama holds, per strategy: `lut` the 2-bit bytes reordered for table
lookup (`kernels.lut_layout`); `int8` the codes unpacked to int8 (1
byte/weight); `auto` both; `exact` / `q8k` the packing as exported.
Projections that read the same input (q/k/v, gate/up) are concatenated at
load and run as one kernel call, and every layer's weights are separate
arrays, so the unrolled decode step slices nothing.

Same architecture and numerics as `tequila_jax.model.Llama` (shared RMSNorm,
RoPE and attention from `tequila_jax.layers`). Activations are fp32.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tequila_jax.io import tqj as export_lib
from tequila_jax.inference.kernels import (CPU_COMPILER_OPTIONS, dense,
                                           int8_dense, lut_layout,
                                           quantize_int8, ternary_linear)
from tequila_jax.layers import (apply_rope, attend_cache, rms_norm,
                                rope_frequencies)
from tequila_jax.model import PROJECTIONS, KVCache, ModelConfig

# Attention reads the cache's filled prefix rounded up to a power of two of at
# least this many positions (a compilation per size).
ATTEND_MIN = 256
# Projections that read the same input run as one kernel call (one table).
_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"),
          "gate_up": ("gate_proj", "up_proj"),
          "o": ("o_proj",), "down": ("down_proj",)}


class _Decoder:
  """`logits, cache = model.decode(tokens, cache)`; `model.cfg` as in Llama.

  Subclasses set `params` (`layers`: a list of per-layer dicts keyed by the
  `_FUSED` names, plus `attn_norm` / `mlp_norm` `[L, hidden]`, `embed`,
  `final_norm`, `head_t` `[vocab, hidden]`: the embedding array itself when
  tied, no copy) and `_linear(h, entry)`.
  """
  cfg: ModelConfig
  params: dict

  def _compile(self):
    scaling = dict(self.cfg.rope_scaling) if self.cfg.rope_scaling else None
    self.inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta,
                                     scaling)
    options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    self._decode = jax.jit(functools.partial(_decode, cfg=self.cfg,
                                             linear=self._linear),
                           static_argnames=("attend_len", "last_only"),
                           donate_argnums=3,
                           compiler_options=options)

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    return KVCache.init(self.cfg, batch, max_len)

  def decode(self, tokens: jax.Array, cache: KVCache, logits: str = "all"):
    """Logits of `tokens[B, T]` after the cache's positions (`[B, T, V]`;
    `logits="last"`: `[B, 1, V]`, the head run on the last position only, as
    a prompt's prefill needs), and the cache with them written. The cache is
    updated in place (it is donated: use the returned one) and attention
    reads only its filled prefix, rounded up to a power of two >=
    `ATTEND_MIN` (one compilation per size), so a step costs the same
    whatever the cache's capacity."""
    if logits not in ("all", "last"):
      raise ValueError(f"logits={logits!r}: choose 'all' or 'last'.")
    end, capacity = int(cache.length) + tokens.shape[1], cache.k.shape[2]
    if end > capacity:
      raise ValueError(f"the KV cache holds {capacity} positions; decoding "
                       f"to position {end} would overrun it. Use "
                       "init_cache(batch, max_len) with a larger max_len.")
    attend_len = min(capacity, max(ATTEND_MIN, 1 << (end - 1).bit_length()))
    return self._decode(self.params, self.inv_freq, tokens, cache,
                        attend_len=attend_len, last_only=logits == "last")

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Full-sequence logits (a prefill into a fresh cache)."""
    cache = self.init_cache(tokens.shape[0], tokens.shape[1])
    return self.decode(tokens, cache)[0]

  @staticmethod
  def _linear(h, entry):
    raise NotImplementedError


def _unstack(layers: dict) -> list[dict]:
  n = jax.tree.leaves(layers)[0].shape[0]
  return [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]


def _float_params(t: dict, layers: dict, dtype) -> dict:
  """The decoder's params from stacked `layers` and export-named tensors
  (norms in fp32; embedding and head in `dtype`)."""
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
  embed = jnp.asarray(np.asarray(t["embed"], dtype))
  head_t = (jnp.asarray(np.asarray(t["lm_head"], dtype).T) if "lm_head" in t
            else embed)
  return {"layers": _unstack(layers), "attn_norm": f32(t["layers.attn_norm"]),
          "mlp_norm": f32(t["layers.mlp_norm"]), "embed": embed,
          "final_norm": f32(t["final_norm"]), "head_t": head_t}


HEADS = ("float", "int8")


class PackedLlama(_Decoder):
  """A packed ternary export, projections by `ternary_linear(strategy)`.

  `head="int8"` holds the output projection as int8 with one scale per
  vocabulary entry and **quantizes the final hidden state to int8** (logits
  ~1e-2 relative error; tests/test_export.py bounds it); the default keeps
  the export's float head (fp32 compute).
  """

  def __init__(self, export: export_lib.Export, strategy: str = "auto",
               head: str = "float"):
    if head not in HEADS:
      raise ValueError(f"head {head!r}: choose one of {HEADS}.")
    self.cfg = export.cfg.replace(dtype="float32")
    self.strategy = strategy
    t = export.tensors
    cat = lambda key, parts: np.concatenate(  # noqa: E731
        [t[f"layers.{p}.{key}"] for p in parts], axis=-1)
    int8_codes = strategy in ("int8", "auto")  # for batched calls
    layers = {}
    for name, parts in _FUSED.items():
      codes = (np.concatenate([export.codes(p) for p in parts], axis=-1)
               if int8_codes or export.packing != "2bit" else None)
      # The kernels read 2bit; base3 is repacked from the codes.
      packed = (cat("codes", parts) if export.packing == "2bit"
                else export_lib.pack_2bit(codes))
      layer = layers[name] = {
          "alpha": jnp.asarray(cat("alpha", parts), jnp.float32),
          "c": jnp.asarray(cat("c", parts), jnp.float32)}
      if int8_codes:
        layer["codes"] = jnp.asarray(codes)
      if strategy in ("lut", "auto"):  # `lut` and `codes` replace the packing
        layer["lut"] = jax.vmap(functools.partial(
            lut_layout, groups=layer["alpha"].shape[1]))(jnp.asarray(packed))
      else:
        layer["packed"] = jnp.asarray(packed)
    # The embedding and head stay in the export's float dtype (a bf16
    # export holds half the bytes at run time too); compute is fp32.
    self.params = _float_params(t, layers, t["embed"].dtype)
    if head == "int8":
      w_t, w_scale = quantize_int8(  # per vocab row
          self.params["head_t"].astype(jnp.float32))
      self.params["head_t"] = {"w_t": w_t, "scale": w_scale[:, 0]}
    self._compile()

  @classmethod
  def load(cls, path, strategy: str = "auto",
           head: str = "float") -> "PackedLlama":
    return cls(export_lib.read_export(path), strategy, head)

  def _linear(self, h, entry):
    return ternary_linear(h, entry.get("packed"), entry["alpha"], entry["c"],
                          self.strategy, entry.get("codes"), entry.get("lut"))


class DenseLlama(_Decoder):
  """Float weights `W` (`y = x @ W`) in `dtype`, through the same decode loop
  as PackedLlama: the float baseline. `DenseLlama(model)` takes a `Llama`'s
  kernels as they are (not quantized)."""

  def __init__(self, model, dtype: str = "float32"):
    self.cfg = model.cfg.replace(dtype="float32")
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kernel = lambda name: np.asarray(  # noqa: E731
        p["layers"][PROJECTIONS[name]][name]["kernel"])
    layers = {name: {"w": jnp.asarray(np.concatenate(
        [kernel(q) for q in parts], axis=-1), dtype)}
              for name, parts in _FUSED.items()}
    t = {"layers.attn_norm": p["layers"]["attn_norm"]["scale"],
         "layers.mlp_norm": p["layers"]["mlp_norm"]["scale"],
         "embed": p["embed"]["embedding"], "final_norm": p["final_norm"]["scale"]}
    if "lm_head" in p:
      t["lm_head"] = p["lm_head"]
    self.params = _float_params(t, layers, dtype)
    self._compile()

  @staticmethod
  def _linear(h, entry):
    return dense(h, entry["w"])


def _decode(params, inv_freq, tokens, cache: KVCache, *, cfg,
            linear: Callable, attend_len: int, last_only: bool):
  b, t = tokens.shape
  positions = cache.length + jnp.broadcast_to(jnp.arange(t), tokens.shape)
  x = params["embed"][tokens].astype(jnp.float32)
  q_size = cfg.num_heads * cfg.head_dim
  kv_size = cfg.num_kv_heads * cfg.head_dim
  k_all, v_all = cache.k, cache.v
  for i, layer in enumerate(params["layers"]):
    h = rms_norm(x, params["attn_norm"][i], cfg.rms_eps)
    q, k, v = jnp.split(linear(h, layer["qkv"]), [q_size, q_size + kv_size],
                        axis=-1)
    q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions,
                   inv_freq)
    k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions,
                   inv_freq)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    # Only the new positions are written (in place: the cache is donated),
    # and only the filled prefix is read.
    at = (i, 0, cache.length, 0, 0)
    k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
    v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
    out = attend_cache(q, k_all[i, :, :attend_len], v_all[i, :, :attend_len],
                       positions)
    x = x + linear(out, layer["o"])
    h = rms_norm(x, params["mlp_norm"][i], cfg.rms_eps)
    gate, up = jnp.split(linear(h, layer["gate_up"]), 2, axis=-1)
    x = x + linear(jax.nn.silu(gate) * up, layer["down"])
  if last_only:
    x = x[:, -1:]
  x = rms_norm(x, params["final_norm"], cfg.rms_eps)
  head = params["head_t"]
  if isinstance(head, dict):  # int8 head
    logits = int8_dense(x.reshape(-1, x.shape[-1]), head["w_t"], head["scale"])
    logits = logits.reshape(b, x.shape[1], -1)
  else:
    logits = dense(x, head, transposed=True)
  return logits, KVCache(k_all, v_all, cache.length + t)
