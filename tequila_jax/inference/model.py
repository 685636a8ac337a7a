"""A LLaMA decoder over a packed `.tqj` export, with a KV cache.

With the `int8` or `auto` strategy the codes are also held unpacked as int8
(1 byte/weight) for batched calls; `lut` keeps the 2-bit bytes reordered for
table lookup (`kernels.lut_layout`), and `exact` the packing as exported.

Same architecture and numerics as `tequila_jax.model.Llama` (shared RMSNorm,
RoPE and attention from `tequila_jax.layers`); the seven projections run
`ternary_linear` on the packed codes. Everything is fp32 on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax import export as export_lib
from tequila_jax.inference.kernels import (CPU_COMPILER_OPTIONS, lut_layout,
                                           ternary_linear)
from tequila_jax.layers import attend, rms_norm, rope_frequencies
from tequila_jax.model import KVCache

# Projections that read the same input run as one kernel call (one table).
_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"),
          "gate_up": ("gate_proj", "up_proj"),
          "o": ("o_proj",), "down": ("down_proj",)}


class PackedLlama:
  """`logits, cache = model.decode(tokens, cache)`; `model.cfg` as in Llama."""

  def __init__(self, export: export_lib.Export, strategy: str = "auto"):
    if export.packing != "2bit":
      raise ValueError("the XLA kernels read the 2bit packing; re-export with "
                       "--packing 2bit (base3 is a storage format).")
    self.cfg = export.cfg.replace(dtype="float32")
    self.strategy = strategy
    t = export.tensors
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    cat = lambda key, parts: np.concatenate(  # noqa: E731
        [t[f"layers.{p}.{key}"] for p in parts], axis=-1)
    layers = {name: {"packed": jnp.asarray(cat("codes", parts)),
                     "alpha": f32(cat("alpha", parts)),
                     "c": f32(cat("c", parts))}
              for name, parts in _FUSED.items()}
    for name, layer in layers.items():
      if strategy in ("int8", "auto"):  # int8 codes for batched calls
        layer["codes"] = jnp.asarray(np.concatenate(
            [export.codes(p) for p in _FUSED[name]], axis=-1))
      if strategy in ("lut", "auto"):
        layer["lut"] = jax.vmap(lut_layout)(layer["packed"], layer["alpha"])
      if strategy in ("lut", "auto"):  # the two above replace the packing
        del layer["packed"]
    self.params = {
        "layers": layers,
        "attn_norm": f32(t["layers.attn_norm"]),
        "mlp_norm": f32(t["layers.mlp_norm"]),
        "embed": f32(t["embed"]), "final_norm": f32(t["final_norm"]),
        "head": f32(t["lm_head"]) if "lm_head" in t else f32(t["embed"]).T,
    }
    scaling = dict(self.cfg.rope_scaling) if self.cfg.rope_scaling else None
    self.inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta,
                                     scaling)
    options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    self._decode = jax.jit(functools.partial(_decode, cfg=self.cfg,
                                             strategy=strategy),
                           compiler_options=options)

  @classmethod
  def load(cls, path, strategy: str = "auto") -> "PackedLlama":
    return cls(export_lib.read_export(path), strategy)

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    return KVCache.init(self.cfg, batch, max_len)

  def decode(self, tokens: jax.Array, cache: KVCache):
    return self._decode(self.params, self.inv_freq, tokens, cache)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Full-sequence logits (a prefill into a fresh cache)."""
    cache = self.init_cache(tokens.shape[0], tokens.shape[1])
    return self.decode(tokens, cache)[0]


def _decode(params, inv_freq, tokens, cache: KVCache, *, cfg, strategy):
  b, t = tokens.shape
  positions = cache.length + jnp.broadcast_to(jnp.arange(t), tokens.shape)
  x = params["embed"][tokens]
  kv_size = cfg.num_kv_heads * cfg.head_dim

  def block(x, xs):
    layer, norms, k_cache, v_cache = xs
    lin = lambda name, h: ternary_linear(  # noqa: E731
        h, layer[name].get("packed"), layer[name]["alpha"], layer[name]["c"],
        strategy, layer[name].get("codes"), layer[name].get("lut"))
    h = rms_norm(x, norms[0], cfg.rms_eps)
    q_size = cfg.num_heads * cfg.head_dim
    q, k, v = jnp.split(lin("qkv", h), [q_size, q_size + kv_size], axis=-1)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    out, (k_cache, v_cache) = attend(q, k, v, positions, inv_freq,
                                     (k_cache, v_cache), cache.length)
    x = x + lin("o", out)
    h = rms_norm(x, norms[1], cfg.rms_eps)
    gate, up = jnp.split(lin("gate_up", h), 2, axis=-1)
    x = x + lin("down", jax.nn.silu(gate) * up)
    return x, (k_cache, v_cache)

  norms = jnp.stack([params["attn_norm"], params["mlp_norm"]], axis=1)
  x, (k, v) = jax.lax.scan(block, x, (params["layers"], norms, cache.k, cache.v),
                           unroll=True)
  x = rms_norm(x, params["final_norm"], cfg.rms_eps)
  return x @ params["head"], KVCache(k, v, cache.length + t)
