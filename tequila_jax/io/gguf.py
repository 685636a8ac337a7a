"""GGUF, llama.cpp's format: LLaMA models read (dequantized to float) and
ternary exports written (TQ2_0 / TQ1_0 plus bias tensors), with the
byte-level BPE vocabulary in both directions.

Reading: tensors are renamed to Hugging Face names and go through the same
validated assembly as safetensors checkpoints (`hf.model_from_tensors`).
llama.cpp permutes the rows of Q and K per head for its interleaved RoPE;
`load_gguf` undoes that so the model uses the half-split layout of Hugging
Face, and `write_gguf` applies it.

Writing: TQ2_0 stores 256 weights per block as 2-bit codes and one fp16
scale `d` (`value = code * d`), so an exact export needs one scale per 256
inputs of a row: `per_channel` models, or `per_group` with G = 256. Other
layouts are refused unless `refit_scales=True`, which keeps every code and
fits each block's scale by least squares (`d = mean alpha over its non-zero
codes`), reporting the relative error introduced. Scales are rounded to fp16
first (an error that is reported too). Tequila's `c(W)` becomes the llama
architecture's optional `blk.N.<proj>.bias` tensors, which stock llama.cpp
applies. Rows must be a multiple of 256 wide (Llama-3.2 1B/3B are;
SmolLM2's 576 is not).
"""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from tequila_jax.errors import ExpectedError
from tequila_jax.io import hf, tokenizers
from tequila_jax.io.atomic import atomic_path
from tequila_jax.io.tqj import Export
from tequila_jax.layers import rope_frequencies
from tequila_jax.model import PROJECTIONS, Llama, ModelConfig, projection_dims
from tequila_jax.quant import QuantConfig

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


# Our exports also record the llama3 parameters (llama.cpp reads the tensor).
ROPE_SCALING_KEY = "tequila_jax.rope_scaling"


def open_gguf(path):
  """A `gguf.GGUFReader`, with a clear error for missing or foreign files."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"GGUF file {path} not found.")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # gguf raises bare ValueError/struct errors
    raise hf.CheckpointError(f"{path} is not a readable GGUF file: {e}") from e


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
  recorded = reader.fields.get(ROPE_SCALING_KEY)
  candidates = ([json.loads(recorded.contents())] if recorded is not None
                else _LLAMA3_ROPE_CANDIDATES)
  for cand in candidates:
    scaled = np.asarray(rope_frequencies(cfg_head_dim, theta, cand), np.float64)
    if np.allclose(base / scaled, divisors, rtol=1e-4):
      return tuple(sorted(cand.items()))
  raise hf.CheckpointError(
      "rope_freqs.weight does not match llama3 rope scaling with factor 8, 16 "
      "or 32; load the Hugging Face checkpoint instead.")


def config_from_gguf(reader, **overrides) -> ModelConfig:
  meta = metadata(reader)
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise hf.CheckpointError(
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
  # The checkpoint is the float model it records; `quant=` ternarizes it.
  fields.update({"quant": QuantConfig("none"), **overrides})
  return ModelConfig.from_dict(fields)


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
  out = {}
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      continue
    name = hf_name(t.name)
    if name is None:
      raise hf.CheckpointError(f"GGUF tensor {t.name} has no place in a "
                                  "LLaMA model.")
    try:
      arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                       np.float32)
    except NotImplementedError as e:
      raise hf.CheckpointError(
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
  return hf.model_from_tensors(cfg, read_tensors(reader, cfg), str(path))


# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

def _gguf_pre_tokenizer(pre: str):
  """The `tokenizers` pre-tokenizer of a llama.cpp pre-tokenizer type."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "gpt2":
    return byte_level
  if pre == "smollm":
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre == "llama-bpe":
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizers.LLAMA3_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported "
                   f"({', '.join(PRE_TYPES)} are); pass a tokenizer.json "
                   "instead.")


PRE_TYPES = ("gpt2", "smollm", "llama-bpe")


def _ids_relevant(spec):
  """A pre-tokenizer's JSON without `trim_offsets` (offsets, not ids)."""
  if isinstance(spec, dict):
    return {k: _ids_relevant(v) for k, v in spec.items() if k != "trim_offsets"}
  if isinstance(spec, list):
    return [_ids_relevant(v) for v in spec]
  return spec


def llama_cpp_pre_type(tok: tokenizers.HFTokenizer) -> str:
  """The llama.cpp pre-tokenizer type (`tokenizer.ggml.pre`) that splits text
  as `tok` does; refused when llama.cpp would split it differently."""
  ours = _ids_relevant(json.loads(tok.to_json()).get("pre_tokenizer"))
  for pre in PRE_TYPES:
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = _gguf_pre_tokenizer(pre)
    if _ids_relevant(json.loads(raw.to_str())["pre_tokenizer"]) == ours:
      return pre
  raise GGUFExportError(
      "the tokenizer's pre-tokenizer matches none that llama.cpp implements "
      f"here ({', '.join(PRE_TYPES)}): llama.cpp would split text into other "
      "tokens than the model was trained on.")


def read_tokenizer(reader) -> tokenizers.HFTokenizer:
  """The BPE vocabulary embedded in a GGUF file (`tokenizer.ggml.*`)."""
  model = gguf_array(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"GGUF tokenizer model {model!r} is not supported; only "
                     "byte-level BPE ('gpt2') is.")
  tokens = gguf_array(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in
            gguf_array(reader, "tokenizer.ggml.merges")]
  types = gguf_array(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  tok = RawTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = _gguf_pre_tokenizer(
      gguf_array(reader, "tokenizer.ggml.pre") or "gpt2")
  tok.decoder = decoders.ByteLevel()
  control = 3  # llama.cpp token type CONTROL
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                          for i, t in enumerate(types) if t == control])
  token = lambda key: (None if (i := gguf_array(  # noqa: E731
      reader, f"tokenizer.ggml.{key}_token_id")) is None else tokens[i])
  return tokenizers.HFTokenizer(tok, token("bos"), token("eos"), dict(
      chat_template=gguf_array(reader, "tokenizer.chat_template"),
      add_bos=gguf_array(reader, "tokenizer.ggml.add_bos_token"),
      pad=token("padding"), unk=token("unknown")))


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

QK = 256  # weights per TQ2_0 block
# Our projection names -> llama.cpp's (LAYER_NAMES inverted, in its order).
GGUF_NAMES = {ours.split(".")[-1]: gguf_name
              for gguf_name, ours in LAYER_NAMES.items()
              if ours.split(".")[-1] in PROJECTIONS}


class GGUFExportError(ExpectedError, ValueError):
  pass


# gguf.quants packs the bytes: for values codes * d with d already fp16, its
# quantizer (d = max |w| of the block, code = round(w / d)) gives back exactly
# our codes and scales (tests/test_gguf_export.py checks the round trip).
TYPES = ("tq2_0", "tq1_0")


def block_scales(codes: np.ndarray, alpha: np.ndarray, refit: bool
                 ) -> tuple[np.ndarray, float]:
  """Per-256-block scales `[out, in/256]` for a `[in, out]` kernel with group
  scales `alpha [groups, out or 1]`, and the relative error of `codes * d`
  against the exact `Q` (0 when every block lies inside one group)."""
  d_in, d_out = codes.shape
  full = np.broadcast_to(np.repeat(alpha, d_in // alpha.shape[0], axis=0),
                         (d_in, d_out)).astype(np.float64)
  blocks = full.reshape(d_in // QK, QK, d_out)
  if np.all(blocks == blocks[:, :1, :]):
    return blocks[:, 0, :].T.astype(np.float32), 0.0
  if not refit:
    raise GGUFExportError(
        f"TQ2_0 holds one scale per {QK} weights but this model's scales "
        f"change inside {QK}-weight blocks; export per_channel or "
        "group_size=256 models, or pass refit_scales=True (--refit_scales) to "
        "fit block scales, which changes the weights and reports the error.")
  cb = codes.reshape(d_in // QK, QK, d_out).astype(np.float64)
  qb = cb * blocks
  d = np.sum(cb * qb, axis=1) / np.maximum(np.sum(cb * cb, axis=1), 1)
  err = np.linalg.norm(cb * d[:, None, :] - qb) / max(np.linalg.norm(qb), 1e-30)
  return d.T.astype(np.float32), float(err)


Q4 = 32  # weights per Q4_0 block
BITS = {"tq2_0": 66 * 8 / 256, "tq1_0": 54 * 8 / 256, "q4_0": 18 * 8 / 32,
        "q4_1": 20 * 8 / 32}


def _one_scale_per_block(alpha: np.ndarray, d_in: int, block: int) -> bool:
  """Whether every `block`-weight run of a row lies inside one scale group."""
  group = d_in // alpha.shape[0]
  return d_in % block == 0 and (group % block == 0 or alpha.shape[0] == 1)


def pack_q4_0(rows: np.ndarray, d: np.ndarray) -> np.ndarray:
  """ggml Q4_0 bytes `[out, in/32 * 18]` holding `rows * d` exactly for
  ternary `rows` `[out, in]` (int) and fp16-representable block scales `d`
  `[out, in/32]`: per block the fp16 scale, then 16 bytes whose low nibbles
  are weights 0-15 and high nibbles 16-31, stored as code + 8 (ggml reads
  (q - 8) * d). The `gguf` package's Q4_0 quantizer would map -α to -0.875α."""
  return _pack_q4(np.asarray(rows, np.int16) + 8, [d])


def pack_q4_1(rows: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
  """ggml Q4_1 bytes `[out, in/32 * 20]` holding `(rows + 1) * d + m` for
  ternary `rows` `[out, in]` and fp16 block scales `d` and offsets `m`
  (`[out, in/32]`; ggml reads q * d + m): with d = α and m = γ - α the
  levels are DLT's γ - α, γ, γ + α."""
  return _pack_q4(np.asarray(rows, np.int16) + 1, [d, m])


def _pack_q4(q: np.ndarray, scales: list) -> np.ndarray:
  """Per 32-weight block: the fp16 `scales`, then the 4-bit `q` (low
  nibbles weights 0-15, high nibbles 16-31)."""
  out, d_in = q.shape
  q = q.astype(np.uint8).reshape(out, -1, Q4)
  qs = q[..., :Q4 // 2] | (q[..., Q4 // 2:] << 4)
  heads = [np.ascontiguousarray(s.astype(np.float16)).view(np.uint8).reshape(
      out, d_in // Q4, 2) for s in scales]
  return np.concatenate([*heads, qs], axis=-1).reshape(out, -1)


def rope_freq_factors(cfg) -> np.ndarray:
  """llama.cpp's `rope_freqs.weight` for Llama-3 rope scaling: per frequency,
  the factor it divides the unscaled frequency by (ggml_rope_ext's
  freq_factors), i.e. unscaled / scaled inverse frequency of our RoPE."""
  plain = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta), np.float64)
  scaled = np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta,
                                       dict(cfg.rope_scaling)), np.float64)
  return (plain / scaled).astype(np.float32)


def write_gguf(ex: Export, path, *, refit_scales: bool = False,
               float_type: str = "f32", ternary_type: str = "tq2_0") -> dict:
  """Writes a llama.cpp GGUF for an export; returns the errors introduced and
  the weights per tensor type. A projection whose 256-weight blocks each
  have one scale (per-channel, or G a multiple of 256) is written as
  `ternary_type` (TQ2_0 2.06 / TQ1_0 1.69 bits per weight); any other whose
  32-weight blocks do (G = 32, 64, 128, ...; widths such as 576) as Q4_0,
  which holds codes × α exactly at 4.5 bits; `refit_scales` forces the
  ternary type with fitted block scales instead. DLT projections (γ + codes
  × α) are written as Q4_1 (d = α, m = γ - α; 5 bits per weight; the dead
  level's fp16 error relative to α is `fp16_offset_rel_error`)."""
  cfg = ex.cfg
  if ternary_type not in TYPES:
    raise ValueError(f"ternary_type {ternary_type!r}: choose one of {TYPES}.")
  for name in PROJECTIONS:
    d_in, _ = projection_dims(cfg, name)
    if d_in % Q4:
      raise GGUFExportError(
          f"{name} rows are {d_in} wide, not a multiple of {Q4}: no llama.cpp "
          f"type holds them exactly (TQ2_0/TQ1_0 need {QK}, Q4_0 {Q4}).")
  tok = ex.load_tokenizer()
  if not isinstance(tok, tokenizers.HFTokenizer):
    raise GGUFExportError("GGUF export needs a BPE tokenizer (tokenizer.json "
                          "or GGUF vocabulary) embedded in the export.")
  errors = {"refit_rel_error": 0.0, "fp16_scale_rel_error": 0.0,
            "tensor_types": {}}
  with atomic_path(path) as tmp:
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    # llama.cpp assumes hidden / heads unless told (head_dim may differ).
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(w, tok, cfg.vocab_size)
    fdt = np.float16 if float_type == "f16" else np.float32
    t = ex.tensors
    w.add_tensor("token_embd.weight", np.asarray(t["embed"], fdt))
    w.add_tensor("output_norm.weight", np.asarray(t["final_norm"], np.float32))
    if cfg.rope_scaling:
      w.add_tensor("rope_freqs.weight", rope_freq_factors(cfg))
      w.add_string(ROPE_SCALING_KEY, json.dumps(dict(cfg.rope_scaling)))
    if "lm_head" in t:
      w.add_tensor("output.weight", np.ascontiguousarray(
          np.asarray(t["lm_head"], fdt).T))
    for layer in range(cfg.num_layers):
      w.add_tensor(f"blk.{layer}.attn_norm.weight",
                   np.asarray(t["layers.attn_norm"][layer], np.float32))
      w.add_tensor(f"blk.{layer}.ffn_norm.weight",
                   np.asarray(t["layers.mlp_norm"][layer], np.float32))
      for name, gname in GGUF_NAMES.items():
        codes = ex.codes(name)[layer]  # [in, out]
        alpha = t[f"layers.{name}.alpha"][layer]
        gamma = ex.gamma(name)
        bias = np.asarray(t[f"layers.{name}.c"][layer], np.float32)
        d_in = codes.shape[0]
        kind = (ternary_type if refit_scales or _one_scale_per_block(
            alpha, d_in, QK) else "q4_0")
        if gamma is not None:  # DLT: three levels around γ, only Q4_1
          if refit_scales:
            raise GGUFExportError(
                "DLT models are written as Q4_1 (d = α, m = γ - α): there "
                "is no ternary type to refit into; drop --refit_scales.")
          if not _one_scale_per_block(alpha, d_in, Q4):
            raise GGUFExportError(
                f"{name}: DLT's levels γ ± α change inside {Q4}-weight "
                "blocks; export a group size that is a multiple of 32.")
          kind = "q4_1"
        if kind in ("q4_0", "q4_1"):  # exact: one α per 32-weight block
          per_block = lambda a: np.broadcast_to(np.repeat(  # noqa: E731
              a, d_in // a.shape[0], axis=0)[::Q4],
              (d_in // Q4, codes.shape[1])).T.astype(np.float32)
          d = per_block(alpha)
        else:
          d, err = block_scales(codes, alpha, refit_scales)
          errors["refit_rel_error"] = max(errors["refit_rel_error"], err)
        d16 = d.astype(np.float16).astype(np.float32)
        errors["fp16_scale_rel_error"] = max(
            errors["fp16_scale_rel_error"],
            float(np.max(np.abs(d16 - d) / np.maximum(np.abs(d), 1e-30))))
        rows = codes.T  # [out, in], ggml's row-major layout
        heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name)
        if heads:
          rows, d16 = permute(rows, heads), permute(d16, heads)
          bias = permute(bias, heads)
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        if kind == "q4_1":
          # m = γ - α in fp16; the dead level m + d is γ up to that rounding.
          g = per_block(gamma[layer])
          if heads:
            g = permute(g, heads)
          m16 = (g - d16).astype(np.float16).astype(np.float32)
          errors["fp16_offset_rel_error"] = max(
              errors.get("fp16_offset_rel_error", 0.0), float(np.max(
                  np.abs(m16 + d16 - g) / np.maximum(np.abs(d16), 1e-30))))
          data = pack_q4_1(rows, d16, m16)
        elif kind == "q4_0":
          data = pack_q4_0(rows, d16)
        else:
          values = rows.astype(np.float32) * np.repeat(d16, QK, axis=1)
          data = gguf.quants.quantize(values, qtype)
        w.add_tensor(f"blk.{layer}.{gname}.weight", data,
                     raw_shape=data.shape, raw_dtype=qtype)
        w.add_tensor(f"blk.{layer}.{gname}.bias", bias)
        types = errors["tensor_types"]
        types[kind] = types.get(kind, 0) + codes.size
    # The file's type names the type that holds most projection weights.
    main = max(errors["tensor_types"], key=errors["tensor_types"].get)
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main.upper()}"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  return errors


def _add_tokenizer(w, tok, vocab_size: int) -> None:
  """The `tokenizer.*` keys llama.cpp reads: vocabulary, merges, token types,
  pre-tokenizer type, special tokens, BOS policy and chat template."""
  spec = json.loads(tok.to_json())
  model = spec["model"]
  if model.get("type") != "BPE":
    raise GGUFExportError("only byte-level BPE tokenizers export to GGUF.")
  pre = llama_cpp_pre_type(tok)
  vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
  tokens = [t for t, _ in vocab]
  added = {a["id"]: a for a in spec.get("added_tokens", [])}
  for i, a in sorted(added.items()):
    if i >= len(tokens):
      tokens += [f"[PAD{j}]" for j in range(len(tokens), i)] + [a["content"]]
  tokens += [f"[PAD{j}]" for j in range(len(tokens), vocab_size)]
  def token_type(i):  # llama.cpp's; the [PADj] fillers are unused
    if i in added:
      special = added[i].get("special")
      return gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL if i < len(vocab) else gguf.TokenType.UNUSED

  types = [token_type(i) for i in range(len(tokens))]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_add_space_prefix(False)
  w.add_add_bos_token(bool(tok.settings.get("add_bos", False)))
  ids = dict(bos=tok.bos_id, eos=tok.eos_id)
  for key in ("pad", "unk"):
    if tok.settings.get(key) in tokens:
      ids[key] = tokens.index(tok.settings[key])
  for key, i in ids.items():
    if i is not None:
      getattr(w, f"add_{key}_token_id")(i)
  if "chat_template" in tok.settings:
    w.add_chat_template(tok.settings["chat_template"])
