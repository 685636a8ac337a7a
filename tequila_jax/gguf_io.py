"""LLaMA models from GGUF files (llama.cpp's format), dequantized to float.

Tensors are renamed to Hugging Face names and go through the same validated
assembly as safetensors checkpoints (`hf_io.model_from_tensors`). llama.cpp
permutes the rows of Q and K per head for its interleaved RoPE; `load_gguf`
undoes that so the model uses the half-split layout of Hugging Face.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tequila_jax import hf_io
from tequila_jax.layers import rope_frequencies
from tequila_jax.model import Llama, ModelConfig

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Llama-3.x GGUFs store llama3 rope scaling only as a `rope_freqs` tensor of
# per-frequency divisors; these are the parameter sets that produce them.
_LLAMA3_ROPE_CANDIDATES = [
    {"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192} for f in (8.0, 16.0, 32.0)]


def open_gguf(path):
  """A `gguf.GGUFReader`, with a clear error for missing or foreign files."""
  import gguf  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"GGUF file {path} not found.")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # gguf raises bare ValueError/struct errors
    raise hf_io.CheckpointError(f"{path} is not a readable GGUF file: {e}") from e


def metadata(reader) -> dict:
  """All scalar and string metadata (arrays longer than 64 entries skipped)."""
  out = {}
  for key, field in reader.fields.items():
    if len(field.data) > 64:
      continue
    out[key] = field.contents()
  return out


def gguf_array(reader, key: str):
  field = reader.fields.get(key)
  return None if field is None else field.contents()


def _rope_scaling(reader, cfg_head_dim, theta):
  tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"),
                None)
  if tensor is None:
    return None
  divisors = np.asarray(tensor.data, np.float64)
  base = np.asarray(rope_frequencies(cfg_head_dim, theta), np.float64)
  for cand in _LLAMA3_ROPE_CANDIDATES:
    scaled = np.asarray(rope_frequencies(cfg_head_dim, theta, cand), np.float64)
    if np.allclose(base / scaled, divisors, rtol=1e-4):
      return tuple(sorted(cand.items()))
  raise hf_io.CheckpointError(
      "rope_freqs.weight does not match llama3 rope scaling with factor 8, 16 "
      "or 32; load the Hugging Face checkpoint instead.")


def config_from_gguf(reader, **overrides) -> ModelConfig:
  meta = metadata(reader)
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise hf_io.CheckpointError(
        f"GGUF architecture {arch!r} is not supported; expected 'llama'.")
  hidden = int(meta["llama.embedding_length"])
  heads = int(meta["llama.attention.head_count"])
  head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
  theta = float(meta.get("llama.rope.freq_base", 10000.0))
  vocab = meta.get("llama.vocab_size") or len(gguf_array(reader,
                                                         "tokenizer.ggml.tokens"))
  tied = not any(t.name == "output.weight" for t in reader.tensors)
  fields = dict(
      vocab_size=int(vocab), hidden_size=hidden,
      ffn_size=int(meta["llama.feed_forward_length"]),
      num_layers=int(meta["llama.block_count"]), num_heads=heads,
      num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
      head_dim=head_dim,
      rms_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=theta, rope_scaling=_rope_scaling(reader, head_dim, theta),
      tie_embeddings=tied,
      max_seq_len=int(meta.get("llama.context_length", 8192)))
  fields.update(overrides)
  return ModelConfig(**fields)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's per-head Q/K row permutation (interleaved RoPE)."""
  rows = w.shape[0]
  return (w.reshape(heads, rows // heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's Q/K row permutation (for export)."""
  rows = w.shape[0]
  return (w.reshape(heads, 2, rows // heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_name(gguf_name: str) -> str | None:
  if gguf_name in GLOBAL_NAMES:
    return GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".")
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
    return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
  return None


def read_tensors(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Dequantized float32 tensors under Hugging Face names."""
  import gguf  # pylint: disable=g-import-not-at-top
  out = {}
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      continue
    name = hf_name(t.name)
    if name is None:
      raise hf_io.CheckpointError(f"GGUF tensor {t.name} has no place in a "
                                  "LLaMA model.")
    try:
      arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                       np.float32)
    except NotImplementedError as e:
      raise hf_io.CheckpointError(
          f"GGUF tensor {t.name} has quantization type {t.tensor_type.name}, "
          "which the gguf package cannot dequantize; re-export it as F16, "
          "Q8_0 or Q4_x.") from e
    if name.endswith("q_proj.weight"):
      arr = _unpermute(arr, cfg.num_heads)
    elif name.endswith("k_proj.weight"):
      arr = _unpermute(arr, cfg.num_kv_heads)
    out[name] = arr
  return out


def load_gguf(path, **overrides) -> Llama:
  """A `Llama` from a GGUF file; `overrides` replace `ModelConfig` fields."""
  reader = open_gguf(path)
  cfg = config_from_gguf(reader, **overrides)
  return hf_io.model_from_tensors(cfg, read_tensors(reader, cfg), str(path))
