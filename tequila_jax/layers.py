"""Flax NNX layers: `TernaryDense` (a thin module over `tequila_jax.quant`),
`RMSNorm` and rotary embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tequila_jax import quant
from tequila_jax.quant import QuantConfig

default_kernel_init = nnx.initializers.lecun_normal()


def logical_axes(*names: str | None) -> dict:
  """Param metadata naming each axis logically ("embed", "mlp", ...); the
  mesh axes they map to come from `sharding.RULES` when a run is laid out
  (not at creation: `eager_sharding=False`)."""
  return dict(out_sharding=names, eager_sharding=False)


class TernaryDense(nnx.Module):
  """`y = x @ Q(W) [+ c(W)] [+ b]` with an fp32 latent kernel `[in, out]`.

  The quantized matmul runs in `dtype` (bf16 by default); quantizer statistics
  and the Tequila bias stay in fp32. `quant.method == "none"` is a float Dense.
  Methods with learned quantizer parameters (`lsq`, `seq`, `dlt`, a learned
  `lam_mode`) hold them as `nnx.Param`s named as in `quant.QPARAM_NAMES`
  (the others are None), started from the initial kernel
  (`quant.init_qparams`: α = max|W| per group, γ = θ = 0, Λ ~ N(0, std²)).
  """

  def __init__(self, in_features: int, out_features: int, *,
               quant_config: QuantConfig = QuantConfig(),
               use_bias: bool = False,
               dtype=jnp.bfloat16,
               param_dtype=jnp.float32,
               kernel_init=default_kernel_init,
               kernel_axes: tuple[str | None, str | None] = (None, None),
               name: str = "TernaryDense",
               rngs: nnx.Rngs):
    shape = (in_features, out_features)
    quant_config.check_kernel_shape(shape, name=name)
    self.in_features, self.out_features = in_features, out_features
    self.quant_config = quant_config
    self.dtype = dtype
    self.name = name
    key = rngs.params()
    self.kernel = nnx.Param(kernel_init(key, shape, param_dtype),
                            **logical_axes(*kernel_axes))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype))
                 if use_bias else None)
    # v3's Λ from the kernel's key (folded), so that the random stream, and
    # with it every other layer's weights, is the same for every method.
    qparams = quant.init_qparams(self.kernel[...], quant_config,
                                 jax.random.fold_in(key, 1))
    for qname in quant.QPARAM_NAMES:
      setattr(self, qname, nnx.Param(qparams[qname], **logical_axes(
          *quant.qparam_axes(qname, quant_config, kernel_axes)))
              if qname in qparams else None)

  def qparams(self) -> dict:
    """The learned quantizer parameters' values (empty for static methods)."""
    return {k: getattr(self, k)[...] for k in quant.QPARAM_NAMES
            if getattr(self, k) is not None}

  def __call__(self, x: jax.Array, arenas_eps=0.0) -> jax.Array:
    """`x[..., in] -> [..., out]`; `arenas_eps` is Sherry's Arenas ε (a
    float or traced scalar; `sherry` only, 0 at inference)."""
    if x.ndim < 1 or x.shape[-1] != self.in_features:
      raise ValueError(
          f"{self.name} [in={self.in_features}, out={self.out_features}]: "
          f"input of shape {x.shape} must end in {self.in_features} features.")
    y = quant.quantized_matmul(jnp.asarray(x, self.dtype), self.kernel[...],
                               self.quant_config, self.qparams(),
                               arenas_eps=arenas_eps)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def ternary_state(self) -> quant.TernaryState:
    """Codes, scales and `c(W)` of the current kernel (diagnostics, export)."""
    if not self.quant_config.is_ternary:
      raise ValueError(f"{self.name} has quant method 'none': no ternary state.")
    return quant.ternary_state(self.kernel[...], self.quant_config,
                               self.qparams())


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: statistics in fp32, output in the input dtype, then scaled."""

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype),
                           **logical_axes("embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Statistics in fp32, normalized value cast back to `x.dtype`, then scaled
  (the order of Hugging Face's LlamaRMSNorm)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return normed.astype(x.dtype) * scale.astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float,
                     scaling: dict | None = None) -> jax.Array:
  """Inverse frequencies `[head_dim // 2]`, with Llama-3 scaling when given.

  `scaling` holds `factor`, `low_freq_factor`, `high_freq_factor` and
  `original_max_position_embeddings` (Hugging Face's `rope_type: llama3`).
  """
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv = np.where(medium, smoothed, scaled)
  return jnp.asarray(inv, jnp.float32)


def apply_rope(x: jax.Array, positions: jax.Array,
               inv_freq: jax.Array) -> jax.Array:
  """Rotates `x[B, T, heads, head_dim]` at `positions[B, T]` (half-split layout,
  as Hugging Face LLaMA; GGUF's interleaved rows are undone at load time)."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
           inv_freq: jax.Array, kv=None, cache_length=None,
           implementation: str = "xla"):
  """Rotary, causal, grouped-query attention of `q[B, T, N, D]` over
  `k, v[B, T, K, D]`; with `kv = (k_cache, v_cache)` the new keys/values are
  written at `cache_length` and attended together with the cached ones.
  Returns `(out[B, T, N * D], new kv or None)`."""
  b, t = q.shape[:2]
  q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
  if kv is None:
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=implementation)
    return out.reshape(b, t, -1), None
  k_all = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype),
                                              cache_length, 1)
  v_all = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype),
                                              cache_length, 1)
  return attend_cache(q, k_all, v_all, positions), (k_all, v_all)


# How a KV cache orders its axes (batch, positions/slots, kv heads, head dim):
# `Llama`'s cache is positions-major; the inference decoders' is heads-major,
# so that attention reads each head's filled prefix without a transpose.
CACHE_LAYOUTS = ("bskd", "bksd")


def attend_cache(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 positions: jax.Array, layout: str = "bskd") -> jax.Array:
  """Causal grouped-query attention of rotated `q[B, T, N, D]` at
  `positions[B, T]` over cached (rotated) keys/values laid out as `layout`
  says (`"bskd"`: `[B, S, K, D]`; `"bksd"`: `[B, K, S, D]`), whose slot s
  holds position s; any prefix of the cache that covers the positions gives
  the same result. The cache is read in its own dtype (queries and
  probabilities rounded to it; scores, softmax and sums in fp32). Returns
  `out[B, T, N * D]` in `q`'s dtype."""
  if layout not in CACHE_LAYOUTS:
    raise ValueError(f"layout {layout!r}: choose one of {CACHE_LAYOUTS}.")
  b, t, n, d = q.shape
  heads = k_cache.shape[layout.index("k")]
  slots = k_cache.shape[layout.index("s")]
  per = n // heads
  # Queries of one KV head, [B, K, G * T, D]: row r is group r // T, token
  # r % T.
  qg = q.reshape(b, t, heads, per, d).transpose(0, 2, 3, 1, 4)
  qg = qg.reshape(b, heads, per * t, d).astype(k_cache.dtype)
  scores = jnp.einsum(f"bkqd,{layout}->bkqs", qg, k_cache,
                      preferred_element_type=jnp.float32) / np.sqrt(d).astype(
                          np.float32)
  rows = jnp.tile(positions, (1, per))  # [B, G * T]
  mask = jnp.arange(slots) <= rows[:, None, :, None]
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  out = jnp.einsum(f"bkqs,{layout}->bkqd", probs.astype(v_cache.dtype),
                   v_cache, preferred_element_type=jnp.float32)
  return out.reshape(b, heads, per, t, d).transpose(0, 3, 1, 2, 4).reshape(
      b, t, n * d).astype(q.dtype)
