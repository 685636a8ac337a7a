"""A LLaMA-3 style decoder whose seven projections are `TernaryDense`.

Embeddings, the (tied) output head and the RMSNorms stay in float, as in
the paper. Decoder blocks are stored stacked along a leading layer axis and run
with `lax.scan` (or a Python loop when `scan_layers=False`), optionally under
`jax.checkpoint`. `Llama.__call__` is the training forward; `Llama.decode`
runs prefill and one-token steps against a `KVCache`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tequila_jax.layers import (RMSNorm, TernaryDense, attend, logical_axes,
                                rope_frequencies)
from tequila_jax import quant
from tequila_jax.quant import QuantConfig
from tequila_jax.quant.matmul import QUANT_NAMES

_cp = jax.checkpoint_policies
_KEEP_QUANTIZED = _cp.save_only_these_names(*QUANT_NAMES)
# The dots policies also keep the quantized kernels and Tequila biases, so the
# backward pass does not ternarize the weights a second time.
REMAT_POLICIES = {
    "none": None,  # no rematerialization
    "full": _cp.nothing_saveable,
    "dots": _cp.save_from_both_policies(_cp.checkpoint_dots, _KEEP_QUANTIZED),
    "dots_no_batch": _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _KEEP_QUANTIZED),
    "quantized": _KEEP_QUANTIZED,  # recompute all but Q and c(W)
}


# The seven ternary projections of a decoder block, in order, each with the
# sub-module ("attn" or "mlp") that holds it: the one list that diagnostics,
# exports, checkpoint I/O and inference iterate over.
PROJECTIONS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn",
               "o_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp",
               "down_proj": "mlp"}


def projection_dims(cfg: "ModelConfig", name: str) -> tuple[int, int]:
  """`(in, out)` of a ternary projection."""
  h, f = cfg.hidden_size, cfg.ffn_size
  heads, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q_proj": (h, heads), "k_proj": (h, kv), "v_proj": (h, kv),
          "o_proj": (heads, h), "gate_proj": (h, f), "up_proj": (h, f),
          "down_proj": (f, h)}[name]


def _checked_fields(cls, d) -> dict:
  """`d` (a dict or ConfigDict) with unknown keys refused by name."""
  d = dict(d)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"Unknown {cls.__name__} keys {unknown}; valid keys are "
                     f"{sorted(fields)}.")
  return d


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a checkpoint or an export stores: the model's shapes and math,
  its quantizer included (field names follow the LLaMA-3 config).

  `rope_scaling` is a tuple of `(key, value)` pairs (hashable) holding
  `factor`, `low_freq_factor`, `high_freq_factor` and
  `original_max_position_embeddings`, or None for plain RoPE.
  """
  vocab_size: int
  hidden_size: int
  ffn_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: tuple | None = None
  tie_embeddings: bool = True
  max_seq_len: int = 8192
  quant: QuantConfig = QuantConfig()

  def __post_init__(self):
    if isinstance(self.quant, dict) or hasattr(self.quant, "to_dict"):
      object.__setattr__(self, "quant", QuantConfig(**dict(self.quant)))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling,
                                                        tuple):
      items = (self.rope_scaling.items() if hasattr(self.rope_scaling, "items")
               else self.rope_scaling)  # a dict, or pairs from JSON
      object.__setattr__(self, "rope_scaling",
                         tuple(sorted((k, v) for k, v in items)))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (GQA).")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")

  @classmethod
  def from_dict(cls, d) -> "Architecture":
    return cls(**_checked_fields(cls, d))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "Architecture":
    return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """How this process runs the model; never stored with its weights."""
  dtype: str = "bfloat16"  # compute dtype (parameters stay fp32)
  scan_layers: bool = True
  remat: str = "none"  # REMAT_POLICIES
  attention: str = "auto"  # "xla", "cudnn", or "auto" (cuDNN on GPU in bf16)

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat policy {self.remat!r}; choose one of "
                       f"{tuple(REMAT_POLICIES)}.")
    jnp.dtype(self.dtype)  # fails clearly on a bad dtype name
    if self.attention not in ("auto", "xla", "cudnn"):
      raise ValueError(f"attention={self.attention!r}: use auto, xla or cudnn.")

  @classmethod
  def from_dict(cls, d) -> "RunSettings":
    return cls(**_checked_fields(cls, d))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def attention_impl(self) -> str:
    """The training-forward attention kernel `auto` resolves to."""
    if self.attention != "auto":
      return self.attention
    gpu = jax.default_backend() == "gpu"
    half = self.compute_dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if gpu and half else "xla"


ARCH_FIELDS = frozenset(f.name for f in dataclasses.fields(Architecture))
RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunSettings))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """An `Architecture` and the `RunSettings` to run it with. Fields of
  either read as attributes of the config (`cfg.hidden_size`, `cfg.dtype`);
  training configs keep them in one flat `model` dict."""
  arch: Architecture
  run: RunSettings = RunSettings()

  def __getattr__(self, name):
    if name in ARCH_FIELDS:
      return getattr(self.arch, name)
    if name in RUN_FIELDS or name in ("compute_dtype", "attention_impl"):
      return getattr(self.run, name)
    raise AttributeError(name)

  @classmethod
  def from_dict(cls, d) -> "ModelConfig":
    """From a flat dict or ConfigDict of both halves' fields; unknown keys
    are an error."""
    d = dict(d)
    unknown = sorted(set(d) - ARCH_FIELDS - RUN_FIELDS)
    if unknown:
      raise ValueError(f"Unknown model config keys {unknown}; valid keys are "
                       f"{sorted(ARCH_FIELDS | RUN_FIELDS)}.")
    return cls(Architecture.from_dict({k: v for k, v in d.items()
                                       if k in ARCH_FIELDS}),
               RunSettings.from_dict({k: v for k, v in d.items()
                                      if k in RUN_FIELDS}))

  def replace(self, **kw) -> "ModelConfig":
    """A copy with fields of either half replaced."""
    unknown = sorted(set(kw) - ARCH_FIELDS - RUN_FIELDS)
    if unknown:
      raise ValueError(f"Unknown model config keys {unknown}.")
    arch = {k: v for k, v in kw.items() if k in ARCH_FIELDS}
    run = {k: v for k, v in kw.items() if k in RUN_FIELDS}
    return ModelConfig(dataclasses.replace(self.arch, **arch),
                       dataclasses.replace(self.run, **run))


class KVCache(NamedTuple):
  """`Llama.decode`'s cache: rotated keys/values `[layers, batch, max_len,
  kv_heads, head_dim]` (positions before heads: `layers.attend_cache`'s
  `"bskd"` layout) in the compute dtype, slot s holding position s; `length`
  is the number of positions already written (the same for every
  sequence)."""
  k: jax.Array
  v: jax.Array
  length: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int | None = None):
    max_len = max_len or cfg.max_seq_len
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return cls(jnp.zeros(shape, cfg.compute_dtype),  # two buffers: decoders
               jnp.zeros(shape, cfg.compute_dtype),  # update them in place
               jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dense = dict(quant_config=cfg.quant, dtype=cfg.compute_dtype, rngs=rngs)
    h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    into, out = ("embed", "heads"), ("heads", "embed")
    self.q_proj = TernaryDense(h, n * d, name="q_proj", kernel_axes=into, **dense)
    self.k_proj = TernaryDense(h, k * d, name="k_proj", kernel_axes=into, **dense)
    self.v_proj = TernaryDense(h, k * d, name="v_proj", kernel_axes=into, **dense)
    self.o_proj = TernaryDense(n * d, h, name="o_proj", kernel_axes=out, **dense)
    self.num_heads, self.num_kv_heads, self.head_dim = n, k, d
    self.attention_impl = cfg.attention_impl

  def projections(self, x, arenas_eps=0.0):
    """The query, key and value projections of `x`, `[B, T, heads * d]`,
    `[B, T, kv_heads * d]` twice (before RoPE)."""
    return (self.q_proj(x, arenas_eps), self.k_proj(x, arenas_eps),
            self.v_proj(x, arenas_eps))

  def __call__(self, x, positions, inv_freq, kv=None, cache_length=None,
               qkv=None, arenas_eps=0.0):
    """Attention of `x`, or of its projections `qkv` if they are given."""
    b, t, _ = x.shape
    q, k, v = self.projections(x, arenas_eps) if qkv is None else qkv
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    out, new_kv = attend(q, k, v, positions, inv_freq, kv, cache_length,
                         self.attention_impl)
    return self.o_proj(out, arenas_eps), new_kv


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dense = dict(quant_config=cfg.quant, dtype=cfg.compute_dtype, rngs=rngs)
    h, f = cfg.hidden_size, cfg.ffn_size
    into, out = ("embed", "mlp"), ("mlp", "embed")
    self.gate_proj = TernaryDense(h, f, name="gate_proj", kernel_axes=into,
                                  **dense)
    self.up_proj = TernaryDense(h, f, name="up_proj", kernel_axes=into, **dense)
    self.down_proj = TernaryDense(f, h, name="down_proj", kernel_axes=out,
                                  **dense)

  def __call__(self, x, arenas_eps=0.0):
    h = jax.nn.silu(self.gate_proj(x, arenas_eps)) * self.up_proj(x, arenas_eps)
    return self.down_proj(h, arenas_eps)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_eps)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, inv_freq, kv=None, cache_length=None, *,
               return_qkv: bool = False, arenas_eps=0.0):
    """`(output, new kv)`, or `(output, (q, k, v))` with `return_qkv`;
    `arenas_eps`: Sherry's Arenas ε for every projection (training only)."""
    y = self.attn_norm(x)
    qkv = self.attn.projections(y, arenas_eps)
    h, new_kv = self.attn(y, positions, inv_freq, kv, cache_length, qkv=qkv,
                          arenas_eps=arenas_eps)
    x = x + h
    return (x + self.mlp(self.mlp_norm(x), arenas_eps),
            qkv if return_qkv else new_kv)


class Llama(nnx.Module):
  """LLaMA-3 decoder. `__call__(tokens) -> logits` (fp32, `[B, T, vocab]`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size,
                           embedding_init=init, rngs=rngs,
                           embedding_metadata=logical_axes("vocab", "embed"))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.layers = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_eps)
    self.lm_head = None if cfg.tie_embeddings else nnx.Param(
        init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), jnp.float32),
        **logical_axes("embed", "vocab"))

  def _inv_freq(self):
    scaling = dict(self.cfg.rope_scaling) if self.cfg.rope_scaling else None
    return rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, scaling)

  def _run_layers(self, x, positions, cache: KVCache | None,
                  capture: int | None = None, arenas_eps=0.0):
    """`(x, new kv)` through every block; with `capture` (training only, no
    cache) `(x, (q, k, v))` of block `capture` instead: the blocks before
    and after it run as two stacks around it."""
    graphdef, state = nnx.split(self.layers)
    inv_freq = self._inv_freq()
    length = None if cache is None else cache.length

    def body(x, xs):
      layer_state, kv = xs
      block = nnx.merge(graphdef, layer_state)
      return block(x, positions, inv_freq, kv, length, arenas_eps=arenas_eps)

    def captured(x, layer_state):
      block = nnx.merge(graphdef, layer_state)
      return block(x, positions, inv_freq, return_qkv=True,
                   arenas_eps=arenas_eps)

    if self.cfg.remat != "none":
      policy = REMAT_POLICIES[self.cfg.remat]
      body, captured = (jax.checkpoint(f, policy=policy, prevent_cse=False)
                        for f in (body, captured))
    if capture is None:
      kvs = None if cache is None else (cache.k, cache.v)
      return self._stack(body, x, state, kvs, self.cfg.num_layers)
    layers = lambda lo, hi: jax.tree.map(lambda a: a[lo:hi], state)  # noqa: E731
    x, _ = self._stack(body, x, layers(0, capture), None, capture)
    x, qkv = captured(x, jax.tree.map(lambda a: a[capture], state))
    rest = self.cfg.num_layers - capture - 1
    x, _ = self._stack(body, x, layers(capture + 1, None), None, rest)
    return x, qkv

  def _stack(self, body, x, state, kvs, n: int):
    """`body` over `n` stacked blocks: a `lax.scan`, or a Python loop when
    `scan_layers=False`; returns `(x, stacked new kv or None)`."""
    if self.cfg.scan_layers:
      return jax.lax.scan(body, x, (state, kvs))
    outs = []
    for i in range(n):
      x, kv = body(x, jax.tree.map(lambda a: a[i], (state, kvs)))
      outs.append(kv)
    return x, (None if kvs is None else jax.tree.map(
        lambda *a: jnp.stack(a), *outs))

  def head_matrix(self) -> jax.Array:
    """The output projection `[hidden, vocab]` in the compute dtype (the
    matmul accumulates in fp32 internally; asking for an fp32 result would
    turn its backward into slow fp32 matmuls)."""
    head = (self.embed.embedding[...].T if self.lm_head is None
            else self.lm_head[...])
    return head.astype(self.cfg.compute_dtype)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    *, arenas_eps=0.0) -> jax.Array:
    """Final-normed hidden states `[B, T, hidden]` (the head's input)."""
    return self._hidden(tokens, positions, arenas_eps=arenas_eps)[0]

  def hidden_states_and_qkv(self, tokens: jax.Array, layer: int, *,
                            arenas_eps=0.0) -> tuple[jax.Array, tuple]:
    """`hidden_states(tokens)` and the query, key and value projections of
    block `layer` (`Attention.projections`: before RoPE), e.g. for an
    attention-relation distillation loss."""
    return self._hidden(tokens, None, layer % self.cfg.num_layers,
                        arenas_eps=arenas_eps)

  def _hidden(self, tokens, positions, capture=None, arenas_eps=0.0):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed(tokens).astype(self.cfg.compute_dtype)
    x, qkv = self._run_layers(x, positions, None, capture, arenas_eps)
    return self.final_norm(x), qkv

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               *, arenas_eps=0.0):
    """Logits `[B, T, vocab]` in fp32. `arenas_eps` is Sherry's Arenas ε
    (`quant.arenas_eps`; training only: 0, the default, is the model)."""
    h = self.hidden_states(tokens, positions, arenas_eps=arenas_eps)
    return jnp.matmul(h, self.head_matrix()).astype(jnp.float32)

  def decode(self, tokens: jax.Array, cache: KVCache):
    """Appends `tokens[B, T]` at `cache.length`; returns (logits, new cache).

    T > 1 is a prefill, T == 1 a decode step. The caller keeps the total
    length within the cache's `max_len`.
    """
    t = tokens.shape[1]
    positions = cache.length + jnp.broadcast_to(jnp.arange(t), tokens.shape)
    x = self.embed(tokens).astype(self.cfg.compute_dtype)
    x, (k, v) = self._run_layers(x, positions, cache)
    logits = jnp.matmul(self.final_norm(x), self.head_matrix())
    return logits.astype(jnp.float32), KVCache(k, v, cache.length + t)

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    return KVCache.init(self.cfg, batch, max_len)


def param_count(tree: Any) -> int:
  """Number of parameters in a (possibly abstract) pytree or module state."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def abstract_model(cfg: ModelConfig) -> Llama:
  """The model with `ShapeDtypeStruct` leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


def graphdef(cfg: ModelConfig):
  """The static structure to `nnx.merge` with a params dict of this model."""
  return nnx.graphdef(abstract_model(cfg))


def param_axes(cfg: ModelConfig) -> dict:
  """The logical axis names of every parameter, as declared on it (a params
  dict of tuples; stacked blocks lead with "layers")."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return nnx.to_pure_dict(jax.tree.map(
      lambda v: jax.sharding.PartitionSpec(*v.get_metadata()["out_sharding"]),
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """Freshly initialized parameters as a nested dict (traceable)."""
  return nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def with_initial_qparams(params: dict, cfg: ModelConfig, seed: int = 0
                         ) -> dict:
  """`params` for `cfg`'s model, with every projection's learned quantizer
  parameters started afresh from its kernel (`quant.init_qparams`: α = max|W|
  per group, γ = θ = 0, v3's Λ drawn from `seed`) and every other leaf kept.
  Runs and loaders call it once the starting weights are in place, so that a
  checkpoint of any method (or a float one) starts a run of another."""
  key = jax.random.key(seed)
  layers = {k: dict(v) for k, v in params["layers"].items()}
  for n, (name, block) in enumerate(PROJECTIONS.items()):
    proj = {k: v for k, v in layers[block][name].items()
            if k not in quant.QPARAM_NAMES}
    kernel = proj["kernel"]
    keys = jax.random.split(jax.random.fold_in(key, n), kernel.shape[0])
    proj.update(jax.vmap(lambda w, k: quant.init_qparams(w, cfg.quant, k))(
        kernel, keys))
    layers[block][name] = proj
  return {**params, "layers": layers}
