"""Hugging Face LLaMA checkpoints: `config.json` + (sharded) safetensors.

`load_hf(dir)` builds a `Llama` from a checkpoint directory; `save_hf(model,
dir)` writes one back in the hub schema (a load/save round trip is bit-exact
when saved in the dtype it was loaded from). Both `config.json` schemas are
accepted: the hub's (`rope_theta`, `rope_scaling`, `torch_dtype`) and
transformers 5.x's (`rope_parameters`, `dtype`). Every tensor is checked by
name and shape before a model is returned, so nothing is ever half-loaded.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from tequila_jax import quant
from tequila_jax.errors import ExpectedError
from tequila_jax.io import tokenizers, tqj
from tequila_jax.io.atomic import atomic_path
from tequila_jax.model import (PROJECTIONS, Llama, ModelConfig, abstract_model,
                               with_initial_qparams)
from tequila_jax.quant import QuantConfig

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
          "float16": np.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# (our path inside one decoder block) -> Hugging Face name inside the layer.
LAYER_NAMES = {
    **{(block, name, "kernel"):
       f"{'self_attn' if block == 'attn' else 'mlp'}.{name}.weight"
       for name, block in PROJECTIONS.items()},
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
}
GLOBAL_NAMES = {
    ("embed", "embedding"): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head",): "lm_head.weight",
}


class CheckpointError(ExpectedError, ValueError):
  """A checkpoint that does not fit the model or cannot be read."""


# --------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------

def config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
  """`ModelConfig` from a Hugging Face LLaMA `config.json` dict (either schema)."""
  if hf.get("model_type", "llama") != "llama":
    raise CheckpointError(f"model_type {hf.get('model_type')!r} is not "
                          "supported; tequila_jax loads LLaMA checkpoints.")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise CheckpointError(
          f"config.json sets {flag}=true; LLaMA-3 has no projection biases "
          "and tequila_jax trains none. A ternary export with biases "
          "(C(W)) is an inference model: open it with "
          "tequila_jax.inference.load, or convert it with `python -m "
          "tequila_jax.export --checkpoint DIR --out model.tqj`.")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported "
                          "(LLaMA uses silu).")
  rope = hf.get("rope_parameters")
  if rope is None:  # hub schema
    rope = dict(hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "llama3"):
    raise CheckpointError(f"rope type {rope_type!r} is not supported; "
                          "use 'default' or 'llama3'.")
  scaling = None
  if rope_type == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope]
    if missing:
      raise CheckpointError(f"llama3 rope scaling lacks {missing}.")
    scaling = tuple(sorted((k, rope[k]) for k in keys))
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      ffn_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope["rope_theta"]), rope_scaling=scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=hf.get("max_position_embeddings", 8192))
  # The checkpoint is the float model it records; `quant=` ternarizes it.
  fields.update({"quant": QuantConfig("none"), **overrides})
  return ModelConfig.from_dict(fields)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """The hub-schema `config.json` for `cfg`."""
  out = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.ffn_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
      "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype,
  }
  if cfg.rope_scaling:
    out["rope_scaling"] = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
  return out


# --------------------------------------------------------------------------
# Tensors <-> model state
# --------------------------------------------------------------------------

def _expected_tensors(cfg: ModelConfig):
  """Yields (our path, layer index or None, HF name, HF shape)."""
  _, state = nnx.split(abstract_model(cfg))
  for path, var in nnx.to_flat_state(state):
    if path[-1] in quant.QPARAM_NAMES:  # learned from the kernels, not stored
      continue
    shape = var.get_value().shape
    if path[0] == "layers":
      name = LAYER_NAMES[path[1:]]
      for i in range(cfg.num_layers):
        yield path, i, f"model.layers.{i}.{name}", _hf_shape(shape[1:])
    else:
      yield path, None, GLOBAL_NAMES[path], _hf_shape(shape, path)


def _hf_shape(shape, path=()):
  """HF stores linear weights `[out, in]`; embeddings as we do."""
  if len(shape) == 2 and path != ("embed", "embedding"):
    return tuple(reversed(shape))
  return tuple(shape)


def model_from_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                       source: str = "checkpoint") -> Llama:
  """Builds a `Llama` from Hugging Face-named tensors, validating all first;
  learned quantizer parameters (if `cfg.quant` has any) start from the
  loaded kernels."""
  expected = list(_expected_tensors(cfg))
  missing = [name for _, _, name, _ in expected if name not in tensors]
  if missing:
    raise CheckpointError(
        f"{source} lacks {len(missing)} tensor(s) the config needs, e.g. "
        f"{missing[:4]}. Does config.json (layers, tie_word_embeddings) "
        "describe these weights?")
  used = {name for _, _, name, _ in expected}
  extra = sorted(n for n in tensors if n not in used
                 and not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    hint = (" (the config ties embeddings but the checkpoint has an lm_head; "
            "set tie_word_embeddings=false)" if "lm_head.weight" in extra
            else "")
    raise CheckpointError(f"{source} has tensors the model does not use: "
                          f"{extra[:6]}{hint}.")
  for _, _, name, shape in expected:
    got = tuple(tensors[name].shape)
    if got != shape:
      raise CheckpointError(f"{source}: tensor {name} has shape {got} but the "
                            f"config implies {shape}.")
  by_path: dict[tuple, list] = {}
  for path, layer, name, _ in expected:
    arr = np.asarray(tensors[name]).astype(np.float32)
    if arr.ndim == 2 and path != ("embed", "embedding"):
      arr = arr.T
    by_path.setdefault(path, []).append(arr)
  pure = {}
  for path, arrs in by_path.items():
    node = pure
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.stack(arrs) if path[0] == "layers" else arrs[0]
  graphdef, state = nnx.split(abstract_model(cfg))
  nnx.replace_by_pure_dict(state, with_initial_qparams(pure, cfg))
  return nnx.merge(graphdef, state)


def model_to_tensors(model: Llama, dtype: str = "float32") -> dict:
  """Hugging Face-named numpy tensors of `model` in `dtype`."""
  np_dtype = DTYPES[dtype]
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  out = {}
  for path, layer, name, _ in _expected_tensors(model.cfg):
    arr = np.asarray(flat[path].get_value())
    if layer is not None:
      arr = arr[layer]
    if arr.ndim == 2 and path != ("embed", "embedding"):
      arr = arr.T
    out[name] = np.ascontiguousarray(arr.astype(np_dtype))
  return out


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def read_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a single-file or sharded (index.json) checkpoint."""
  single = directory / "model.safetensors"
  index = directory / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
  elif single.exists():
    files = [single.name]
  else:
    raise CheckpointError(f"{directory} has neither model.safetensors nor "
                          "model.safetensors.index.json.")
  tensors = {}
  for fname in files:
    path = directory / fname
    if not path.exists():
      raise CheckpointError(f"shard {path} named in the index is missing.")
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        dtype = f.get_slice(name).get_dtype()
        if dtype not in ("F32", "BF16", "F16"):
          raise CheckpointError(f"{path.name}: tensor {name} has dtype "
                                f"{dtype}; supported are F32, BF16 and F16.")
        tensors[name] = f.get_tensor(name)
  return tensors


def load_hf(directory, **overrides) -> Llama:
  """Loads a Hugging Face LLaMA checkpoint directory into a `Llama`.

  `overrides` replace `ModelConfig` fields (e.g. `quant=`, `dtype=`).
  """
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise CheckpointError(f"{config_path} not found: a Hugging Face checkpoint "
                          "directory holds config.json and safetensors.")
  cfg = config_from_hf(json.loads(config_path.read_text()), **overrides)
  return model_from_tensors(cfg, read_safetensors(directory), str(directory))


def save_hf(model: Llama, directory, dtype: str = "float32",
            max_shard_bytes: int | None = None) -> pathlib.Path:
  """Writes `config.json` and safetensors (sharded above `max_shard_bytes`).

  The directory appears atomically: files are written to a temporary sibling
  that is renamed into place, so a failed save leaves nothing behind.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
  directory = pathlib.Path(directory)
  if directory.exists():
    raise FileExistsError(f"{directory} exists; save into a new directory.")
  _write_checkpoint(directory, model_to_tensors(model, dtype),
                    config_to_hf(model.cfg, dtype), max_shard_bytes)
  return directory


def _write_checkpoint(directory: pathlib.Path, tensors: dict, config: dict,
                      max_shard_bytes: int | None = None,
                      extra_files: Mapping[str, str] | None = None) -> None:
  """config.json + (sharded) safetensors (+ extra text files), atomically."""
  with atomic_path(directory, directory=True, replace=False) as tmp:
    shards, size = [{}], 0
    for name, arr in tensors.items():
      if max_shard_bytes and shards[-1] and size + arr.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = arr
      size += arr.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
      save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata=meta)
        weight_map.update({n: fname for n in shard})
      total = sum(a.nbytes for a in tensors.values())
      (tmp / "model.safetensors.index.json").write_text(json.dumps(
          {"metadata": {"total_size": total}, "weight_map": weight_map},
          indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
      (tmp / name).write_text(text)


# --------------------------------------------------------------------------
# Ternary models as standard LLaMA checkpoints with biases
# --------------------------------------------------------------------------

TERNARY_KEY = "tequila_jax_ternary"  # config.json: how the weights were made
_BIAS_NAMES = {p: LAYER_NAMES[(block, p, "kernel")].replace(".weight", ".bias")
               for p, block in PROJECTIONS.items()}


def is_ternary_hf(directory) -> bool:
  """A Hugging Face directory whose projections carry biases (the ternary
  export form, or a checkpoint tequila_jax cannot train from)."""
  path = pathlib.Path(directory) / "config.json"
  if not path.exists():
    return False
  hf = json.loads(path.read_text())
  return bool(hf.get("attention_bias") or hf.get("mlp_bias"))


def save_ternary_hf(export: tqj.Export, directory, *, dtype: str = "float32",
                    max_shard_bytes: int | None = None) -> pathlib.Path:
  """Writes a ternary export as a standard `LlamaForCausalLM` checkpoint that
  any runtime loads unchanged: each projection's weight is the dequantized
  Q = codes · α (in `dtype`), its bias C(W) (`attention_bias` and
  `mlp_bias` true; zero where λ = 0), plus the tokenizer files when the
  export carries a `tokenizer.json`. It runs at float speed: it is for
  compatibility and evaluation; `.tqj` and GGUF are the fast paths.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
  directory = pathlib.Path(directory)
  if directory.exists():
    raise FileExistsError(f"{directory} exists; save into a new directory.")
  cfg, t, np_dtype = export.cfg, export.tensors, DTYPES[dtype]
  tensors = {}
  cast = lambda a: np.ascontiguousarray(np.asarray(a, np.float32).astype(np_dtype))  # noqa: E731
  q = {p: export.quantized_kernel(p) for p in PROJECTIONS}
  for i in range(cfg.num_layers):
    layer = f"model.layers.{i}."
    for p in PROJECTIONS:
      tensors[layer + LAYER_NAMES[(PROJECTIONS[p], p, "kernel")]] = cast(q[p][i].T)
      tensors[layer + _BIAS_NAMES[p]] = cast(t[f"layers.{p}.c"][i])
    tensors[layer + "input_layernorm.weight"] = cast(t["layers.attn_norm"][i])
    tensors[layer + "post_attention_layernorm.weight"] = cast(
        t["layers.mlp_norm"][i])
  tensors["model.embed_tokens.weight"] = cast(t["embed"])
  tensors["model.norm.weight"] = cast(t["final_norm"])
  if "lm_head" in t:
    tensors["lm_head.weight"] = cast(np.asarray(t["lm_head"]).T)
  config = config_to_hf(cfg, dtype)
  config.update(attention_bias=True, mlp_bias=True, **{TERNARY_KEY: {
      "quant": dataclasses.asdict(cfg.quant), "packing": export.packing,
      "note": "weights are codes x alpha per group, biases C(W): convert "
              "back with `python -m tequila_jax.export --checkpoint DIR "
              "--out model.tqj`"}})
  if cfg.quant.act_bits:
    config[TERNARY_KEY]["activations"] = (
        f"trained with {cfg.quant.act_bits}-bit per-token activations "
        "(W1.58A8); runtimes that load this directory as a plain "
        "LlamaForCausalLM run it at 16-bit activations, which the model "
        "never saw in training (measured on a small trained model: logits "
        "2.2e-3 relative to the A8 forward, held-out loss change "
        "inconclusive; experiments/results/a8_agreement); the .tqj export "
        "and PackedLlama quantize them as trained")
  extra, kind = {}, export.tokenizer.get("kind")
  if kind in ("bytes", "none"):  # no Hugging Face form: recorded for us
    config[TERNARY_KEY]["tokenizer"] = {"kind": kind}
  if kind == "tokenizer.json":
    extra["tokenizer.json"] = export.tokenizer["json"]
    extra["tokenizer_config.json"] = json.dumps(
        export.load_tokenizer().hf_config(), indent=2)
  _write_checkpoint(directory, tensors, config, max_shard_bytes, extra)
  return directory


def read_ternary_hf(directory, quant: QuantConfig | None = None) -> tqj.Export:
  """The `.tqj` export of a ternary Hugging Face directory (as
  `save_ternary_hf` writes): codes = sign(Q), α = |Q| per group, c = the
  bias, exactly. The latent weights are gone, so this is an inference
  model, not a training start. `quant` is needed only when config.json does
  not record the group layout."""
  directory = pathlib.Path(directory)
  hf = json.loads((directory / "config.json").read_text())
  recorded = hf.get(TERNARY_KEY, {}).get("quant")
  if quant is None and recorded is None:
    raise CheckpointError(
        f"{directory} has projection biases but records no ternary layout "
        f"({TERNARY_KEY} in config.json); pass --quant.method and "
        "--quant.group_size (or --quant.granularity=per_channel).")
  quant = quant or QuantConfig(**recorded)
  if quant.method == "dlt":
    raise CheckpointError(
        f"{directory} holds a DLT model, whose Q = codes·α + γ need not hold "
        "0 and one α per group: open or convert its .tqj export instead.")
  plain = {k: v for k, v in hf.items() if k not in ("attention_bias",
                                                    "mlp_bias")}
  cfg = config_from_hf(plain, quant=quant)
  tensors = read_safetensors(directory)
  out = {}
  for p in PROJECTIONS:
    weight = LAYER_NAMES[(PROJECTIONS[p], p, "kernel")]
    names = [f"model.layers.{i}.{weight}" for i in range(cfg.num_layers)]
    biases = [f"model.layers.{i}.{_BIAS_NAMES[p]}" for i in range(cfg.num_layers)]
    missing = [n for n in names + biases if n not in tensors]
    if missing:
      raise CheckpointError(f"{directory} lacks {missing[:3]}: not a ternary "
                            "export with biases.")
    q = np.stack([np.asarray(tensors[n], np.float32).T for n in names])
    d_in = q.shape[1]
    group = d_in if quant.granularity == "per_channel" else quant.group_size
    if d_in % group:
      raise CheckpointError(f"{p}: {d_in} inputs are not a multiple of the "
                            f"group size {group}.")
    grouped = q.reshape(q.shape[0], d_in // group, group, q.shape[2])
    alpha = np.abs(grouped).max(axis=2)
    codes = np.sign(grouped).astype(np.int8)
    if not np.array_equal(np.abs(grouped), np.abs(codes) * alpha[:, :, None]):
      raise CheckpointError(
          f"{directory}: {p} is not ternary with groups of {group} (a group "
          "holds magnitudes other than 0 and one α); check --quant.group_size.")
    out[f"layers.{p}.codes"] = tqj.pack_2bit(codes.reshape(q.shape))
    out[f"layers.{p}.alpha"] = alpha.astype(np.float32)
    out[f"layers.{p}.c"] = np.stack(
        [np.asarray(tensors[n], np.float32) for n in biases])
  per_layer = lambda name: np.stack([  # noqa: E731
      tensors[f"model.layers.{i}.{name}"] for i in range(cfg.num_layers)])
  out["layers.attn_norm"] = per_layer("input_layernorm.weight")
  out["layers.mlp_norm"] = per_layer("post_attention_layernorm.weight")
  out["embed"] = tensors["model.embed_tokens.weight"]
  out["final_norm"] = tensors["model.norm.weight"]
  if not cfg.tie_embeddings:
    out["lm_head"] = np.ascontiguousarray(tensors["lm_head.weight"].T)
  tok = directory / "tokenizer.json"
  tokenizer = hf.get(TERNARY_KEY, {}).get("tokenizer", {"kind": "none"})
  if tok.exists():
    tokenizer = json.loads(tqj.tokenizer_metadata(tokenizers.from_file(tok)))
  return tqj.Export(ModelConfig(cfg.arch), "2bit",
                    {k: np.ascontiguousarray(v) for k, v in out.items()},
                    tokenizer)
