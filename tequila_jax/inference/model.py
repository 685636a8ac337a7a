"""LLaMA decoders for CPU inference with a KV cache: `PackedLlama` over a
packed `.tqj` export, and `DenseLlama`, the same decode loop over float
weights (the baseline the ternary model is measured against).

`PackedLlama(export, InferenceSettings(...))` holds, per strategy: `lut`
the 2-bit (or `sparse34`) bytes reordered for table lookup
(`kernels.lut_layout`, `lut34_layout`); `int8`
the codes unpacked to int8 (1 byte/weight, `kernels.int8_layout`); `auto`
both; `lean` the `lut` bytes alone (batched calls unpack them in-program);
`exact` / `q8k` the packing as exported.
Projections that read the same input (q/k/v, gate/up) are concatenated at
load and run as one kernel call, and every layer's weights are separate
arrays, so the unrolled decode step slices nothing.

Same architecture and numerics as `tequila_jax.model.Llama` (shared RMSNorm,
RoPE and attention from `tequila_jax.layers`). Activations are fp32. The KV
cache is a `PackedKVCache` (heads-major; bf16 held as bits).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tequila_jax.inference.cache import PackedKVCache
from tequila_jax.inference.kernels import (CPU_COMPILER_OPTIONS, dense,
                                           int8_dense, int8_layout,
                                           lut34_layout, lut_layout,
                                           quantize_int8,
                                           ternary_linear)
from tequila_jax.inference.settings import (KV_DTYPES, InferenceSettings,
                                            check_choice)
from tequila_jax.io import tqj as export_lib
from tequila_jax.layers import (apply_rope, attend_cache, rms_norm,
                                rope_frequencies)
from tequila_jax.model import PROJECTIONS, ModelConfig, projection_dims

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
  tied, no copy) and `linear(h, entry)`.
  """
  cfg: ModelConfig
  params: dict
  kv_dtype: str = "float32"

  def _init(self, cfg: ModelConfig, kv_dtype: str):
    check_choice("kv_dtype", kv_dtype, KV_DTYPES)
    self.cfg, self.kv_dtype = cfg.replace(dtype="float32"), kv_dtype

  def _compile(self):
    scaling = dict(self.cfg.rope_scaling) if self.cfg.rope_scaling else None
    self.inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta,
                                     scaling)
    options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    self._decode = jax.jit(functools.partial(_decode, cfg=self.cfg,
                                             linear=self.linear),
                           static_argnames=("attend_len", "last_only"),
                           donate_argnums=3,
                           compiler_options=options)

  def init_cache(self, batch: int, max_len: int | None = None
                 ) -> PackedKVCache:
    """An empty `PackedKVCache` of `max_len` positions (default the
    model's `max_seq_len`) in `kv_dtype`."""
    return PackedKVCache.init(self.cfg, batch, max_len, self.kv_dtype)

  def decode(self, tokens: jax.Array, cache: PackedKVCache,
             logits: str = "all"):
    """Logits of `tokens[B, T]` after the cache's positions (`[B, T, V]`;
    `logits="last"`: `[B, 1, V]`, the head run on the last position only, as
    a prompt's prefill needs), and the cache with them written. The cache is
    updated in place (it is donated: use the returned one) and attention
    reads only its filled prefix, rounded up to a power of two >=
    `ATTEND_MIN` (one compilation per size), so a step costs the same
    whatever the cache's capacity."""
    if logits not in ("all", "last"):
      raise ValueError(f"logits={logits!r}: choose 'all' or 'last'.")
    end, capacity = int(cache.length) + tokens.shape[1], cache.capacity
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

  def linear(self, h: jax.Array, entry: dict) -> jax.Array:
    """One (fused) projection as the decode step runs it: `h[..., in]`
    through `entry`, an item of `params["layers"][i]` (keyed `qkv`, `o`,
    `gate_up`, `down`) -> `[..., out]` in fp32. Public so that benchmarks
    time exactly the step's kernels."""
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


def _int8_rows(w: jax.Array) -> dict:
  """`[vocab, hidden]` as int8 with one fp32 scale per row (absmax / 127)."""
  w_t, scale = quantize_int8(w.astype(jnp.float32))
  return {"w_t": w_t, "scale": scale[:, 0]}


class PackedLlama(_Decoder):
  """A packed ternary export, projections by `ternary_linear` with
  `settings.strategy` (`InferenceSettings`; its defaults: `auto`, float
  embedding, fp32 scales and cache).

  `embed`: `float` keeps the embedding and head in the export's float dtype
  (bf16 exports stay bf16; compute is fp32); `int8` holds them as int8 with
  one scale per vocabulary row (one table when tied): lookups dequantize
  their rows, and the head is an int8 dot whose hidden state is quantized
  as value + residual (`int8_dense`), so the weights' per-row rounding is
  the error left (logits 2.2e-2 relative on SmolLM2; tests/test_export.py
  bounds it). `alpha_dtype="float16"` holds the group scales in fp16
  (rounded once at load; compute stays fp32). `kv_dtype="bfloat16"` holds
  the KV cache in bf16 (`PackedKVCache`). `memory()` says what each part
  holds.
  """

  def __init__(self, export: export_lib.Export,
               settings: InferenceSettings = InferenceSettings()):
    if not isinstance(settings, InferenceSettings):
      raise TypeError(f"settings {settings!r}: pass an InferenceSettings "
                      "(e.g. InferenceSettings(strategy='lut')).")
    self.settings = settings
    self._init(export.cfg, settings.kv_dtype)
    strategy = settings.strategy
    t = export.tensors
    cat = lambda key, parts: np.concatenate(  # noqa: E731
        [t[f"layers.{p}.{key}"] for p in parts], axis=-1)
    int8_codes = strategy in ("int8", "auto")  # for batched calls
    # The kernels read 2bit and sparse34; base3 is repacked to 2bit.
    self.packing = "sparse34" if export.packing == "sparse34" else "2bit"
    layers = {}
    for name, parts in _FUSED.items():
      codes = (np.concatenate([export.codes(p) for p in parts], axis=-1)
               if int8_codes or export.packing == "base3" else None)
      packed = (export_lib.pack_2bit(codes) if export.packing == "base3"
                else cat("codes", parts))  # outputs concatenate: same rows
      layer = layers[name] = {
          "alpha": jnp.asarray(cat("alpha", parts), settings.alpha_dtype),
          "c": jnp.asarray(cat("c", parts), jnp.float32)}
      if export.gamma(parts[0]) is not None:  # DLT
        layer["gamma"] = jnp.asarray(cat("gamma", parts), jnp.float32)
      groups = layer["alpha"].shape[1]
      if int8_codes:
        layer["codes"] = jax.vmap(functools.partial(
            int8_layout, groups=groups))(jnp.asarray(codes))
      if strategy in ("lut", "auto", "lean"):
        layout = lut34_layout if self.packing == "sparse34" else lut_layout
        layer["lut"] = jax.vmap(functools.partial(
            layout, groups=groups))(jnp.asarray(packed))
      if strategy in ("exact", "q8k"):  # `lut` / `codes` replace the packing
        layer["packed"] = jnp.asarray(packed)
    self.params = _float_params(t, layers, t["embed"].dtype)
    if settings.embed == "int8":
      tied = self.params["head_t"] is self.params["embed"]
      self.params["embed"] = _int8_rows(self.params["embed"])
      self.params["head_t"] = (self.params["embed"] if tied
                               else _int8_rows(self.params["head_t"]))
    self._compile()

  @classmethod
  def load(cls, path, settings: InferenceSettings = InferenceSettings()
           ) -> "PackedLlama":
    """The `.tqj` export at `path` (for any location, a ternary Hugging
    Face directory included: `inference.load`)."""
    return cls(export_lib.read_export(path), settings)

  def memory(self) -> dict:
    """Bytes held, by part (a tied head counts once): `ternary` (the
    projections' codes in every form held: `lut` / `packed` bytes (2bit or
    sparse34), `codes` int8, plus alpha and c), `embed_head`, `other`
    (norms); and `bits_per_ternary_weight` for the form one token reads
    (`lut`/`packed` or, for `int8` alone, the codes; alpha, c) and with
    everything the strategy holds."""
    n_weights = self.cfg.num_layers * sum(
        int(np.prod(projection_dims(self.cfg, p))) for p in PROJECTIONS)
    decode_bytes, all_bytes = 0, 0
    for layer in self.params["layers"]:
      for entry in layer.values():
        held = {k: v.nbytes for k, v in entry.items()}
        all_bytes += sum(held.values())
        packed = "lut" in entry or "packed" in entry
        decode_bytes += sum(v for k, v in held.items()
                            if k != "codes" or not packed)
    embed_head = {id(a): a.nbytes for a in jax.tree.leaves(
        [self.params["embed"], self.params["head_t"]])}
    other = sum(self.params[k].nbytes
                for k in ("attn_norm", "mlp_norm", "final_norm"))
    return {"ternary": all_bytes, "embed_head": sum(embed_head.values()),
            "other": other,
            "total": all_bytes + sum(embed_head.values()) + other,
            "ternary_weights": n_weights,
            "bits_per_ternary_weight": 8 * decode_bytes / n_weights,
            "bits_per_ternary_weight_all_held": 8 * all_bytes / n_weights}

  def linear(self, h: jax.Array, entry: dict) -> jax.Array:
    return ternary_linear(h, entry.get("packed"), entry["alpha"], entry["c"],
                          self.settings.strategy, entry.get("codes"),
                          entry.get("lut"), entry.get("gamma"),
                          self.cfg.quant.act_bits, self.packing)


class DenseLlama(_Decoder):
  """Float weights `W` (`y = x @ W`) in `dtype`, through the same decode loop
  as PackedLlama: the float baseline. `DenseLlama(model)` takes a `Llama`'s
  kernels as they are (not quantized)."""

  def __init__(self, model, dtype: str = "float32", kv_dtype: str = "float32"):
    self._init(model.cfg, kv_dtype)
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

  def linear(self, h: jax.Array, entry: dict) -> jax.Array:
    return dense(h, entry["w"])


def _decode(params, inv_freq, tokens, cache: PackedKVCache, *, cfg,
            linear: Callable, attend_len: int, last_only: bool):
  b, t = tokens.shape
  positions = cache.length + jnp.broadcast_to(jnp.arange(t), tokens.shape)
  embed = params["embed"]
  if isinstance(embed, dict):  # int8 rows, one scale each
    x = embed["w_t"][tokens].astype(jnp.float32) * embed["scale"][tokens][..., None]
  else:
    x = embed[tokens].astype(jnp.float32)
  q_size = cfg.num_heads * cfg.head_dim
  kv_size = cfg.num_kv_heads * cfg.head_dim
  for i, layer in enumerate(params["layers"]):
    h = rms_norm(x, params["attn_norm"][i], cfg.rms_eps)
    q, k, v = jnp.split(linear(h, layer["qkv"]), [q_size, q_size + kv_size],
                        axis=-1)
    q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions,
                   inv_freq)
    k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions,
                   inv_freq).transpose(0, 2, 1, 3)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(0, 2, 1, 3)
    # Only the new positions are written (in place: the cache is donated),
    # and only the filled prefix is read.
    cache = cache.write(i, k, v)
    out = attend_cache(q, *cache.read(i, attend_len), positions,
                       layout="bksd")
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
  return logits, cache.advance(t)

