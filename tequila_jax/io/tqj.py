"""Packed ternary exports (`.tqj`): safetensors + JSON metadata.

Written by `python -m tequila_jax.export --checkpoint runs/x --out model.tqj`.

Container invariant. For every ternary projection P in {q,k,v,o,gate,up,down}
and decoder block l, with `codes = unpack(P.codes[l])` (int8 `[in, out]`,
values in {-1, 0, 1}) and `G = in // P.alpha.shape[1]`:

    Q[l][i, j] = codes[i, j] * P.alpha[l, i // G, j]        (exactly, fp32)
                 (+ P.gamma[l, i // G, j]: DLT only)
    y = x @ Q[l] + P.c[l]                                   (c = λ Σ_{i∈D} W_ij)

which is bit-for-bit the QAT model's quantized kernel and Tequila bias, for
every method with an inference form: absmean, twn, tequila (any `lam_mode`:
c holds the learned λ, or v3's Σ_{i∈D} Λ_ij W_ij), lsq, seq (alpha holds
the level 2α/3) and dlt (whose offset γ adds γ_gj · Σ_{i∈g} x_i to y_j).
Codes
are packed along the input axis:

- `2bit` (default, 2 bits/weight): `u = code + 1` in {0, 1, 2}; byte
  `[k, j]` holds inputs 4k..4k+3 of column j as `u0 | u1<<2 | u2<<4 | u3<<6`.
- `base3` (1.6 bits/weight): byte `[k, j]` holds inputs 5k..5k+4 as
  `u0 + 3 u1 + 9 u2 + 27 u3 + 81 u4`; the input axis is padded with code 0 to
  a multiple of 5 and cut back on unpacking.
- `sparse34` (1.25 bits/weight; 3:4 codes only, e.g. Sherry's: every block
  of 4 consecutive inputs of a column holds exactly one zero, in % 32 == 0).
  A block is 5 bits: a pattern n (4 bits) and a sign s (1 bit), the paper's
  mirror symmetry (32 blocks = 16 patterns x a global sign flip):
  n = z | r1 << 2 | r2 << 3, z the zero's position, r1 / r2 set when the
  second / third nonzero differs in sign from the first; s = 1 when the
  first nonzero is -1 (`SPARSE34_PATTERNS[n]` is the block with s = 0).
  Stored as two power-of-two planes, rows concatenated: first in/8 pattern
  rows, byte `[k, j]` = `n(block 2k) | n(block 2k+1) << 4`, then in/32 sign
  rows, bit b of byte `[in/8 + t, j]` = s(block 8t + b). Why planes, not
  5-bit fields: every field is byte-aligned, so XLA unpacks with shifts and
  masks, and a pattern byte with its two sign bits (bits 2q, 2q+1 of sign
  byte k // 4, q = k % 4) is a 10-bit index into a 1024-entry table of 8
  inputs' partial sums, which the `lut` kernel gathers from (one gather per
  8 inputs). Blocks that are not 3:4 (a kept weight exactly 0 gives two
  zeros) are refused on export, naming the layer and the count: `2bit` and
  `base3` hold any codes. The check is on the codes, not the method: any
  model whose codes happen to be 3:4 packs.

Tensors (stacked over blocks): `layers.P.codes` uint8 `[L, rows, out]` (rows
= in/4, ceil(in/5) or in/8 + in/32), `layers.P.alpha` fp32 `[L, groups,
out]` (one group for per-channel and per-tensor scales, repeated across
outputs), `layers.P.gamma` (DLT only, like alpha), `layers.P.c` fp32
`[L, out]`,
`layers.attn_norm` / `layers.mlp_norm` `[L, hidden]`, `embed` `[vocab,
hidden]`, `final_norm` `[hidden]`, and `lm_head` `[hidden, vocab]` if untied.
Metadata (`__metadata__`, strings): `format` = "tequila_jax", `version`,
`model` (the `Architecture` as JSON: shapes, RoPE, quantizer; no run-time
settings), `packing`, `tokenizer` (how to rebuild it), `checksums` (sha256
of every tensor's bytes, checked on reading) and, since version 4,
`header_checksum` (sha256 of every other metadata entry and each tensor's
name, dtype and shape: `header_checksum`), so that an edited header (rms_eps,
RoPE, λ, the tokenizer...) is refused like a flipped tensor byte. A file of
version 3 or later without its checksums is refused; version 3 files (no
header checksum) load with a warning, as do version 1 and 2 files (no
checksums at all; version 1's `model` also held
dtype/remat/scan/attention, which are ignored).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import pathlib
import tempfile

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from tequila_jax import quant
from tequila_jax.errors import ExpectedError
from tequila_jax.io import tokenizers
from tequila_jax.io.atomic import atomic_path
from tequila_jax.model import (ARCH_FIELDS, PROJECTIONS, Architecture, Llama,
                               ModelConfig, projection_dims)

log = logging.getLogger("tequila_jax")
FORMAT = "tequila_jax"
VERSION = "5"
# Version 1 also recorded run-time settings; versions 1-2 carry no checksums;
# version 3 carries tensor checksums only. Version 4 adds the header's
# checksum and the learned-quantizer methods (lsq, seq, dlt's `gamma`
# tensors, learned λ in `c`, act_bits in the quantizer). Version 5 adds
# `sherry` (the quantizer's Arenas fields) and the `sparse34` packing. Older
# files hold none of them and load at their defaults.
READABLE = ("1", "2", "3", "4", "5")
HEADER_CHECKSUM = "header_checksum"  # the metadata entry that covers the rest
PACKINGS = ("2bit", "base3", "sparse34")
FLOAT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                "float16": np.float16}


class ExportError(ExpectedError, ValueError):
  """A file that is not a valid export for this version of tequila_jax."""


# --------------------------------------------------------------------------
# Packing (numpy; along axis -2, the input axis of `[..., in, out]`)
# --------------------------------------------------------------------------

# The `2bit` byte layout, written here once (`inference.kernels` unpacks and
# tabulates bytes with it): input 4k + j of column c is the field
# `code + 1` in bits TWO_BIT_SHIFTS[j] .. +1 of byte [k, c].
TWO_BIT_SHIFTS = np.asarray([0, 2, 4, 6], np.uint8)


def pack_2bit(codes: np.ndarray) -> np.ndarray:
  """int8 codes `[..., in, out]` (in % 4 == 0) -> uint8 `[..., in/4, out]`."""
  u = (np.asarray(codes, np.int16) + 1).astype(np.uint8)
  if u.shape[-2] % 4:
    raise ValueError(f"2-bit packing needs in % 4 == 0, got in={u.shape[-2]}.")
  u = u.reshape(*u.shape[:-2], u.shape[-2] // 4, 4, u.shape[-1])
  return np.bitwise_or.reduce(u << TWO_BIT_SHIFTS[:, None], axis=-2)


def unpack_2bit(packed, xp=np):
  """uint8 `[..., in/4, out]` -> int8 codes `[..., in, out]`. `xp=jax.numpy`
  unpacks a jax array (traceable under jit)."""
  p = xp.asarray(packed, xp.uint8)
  fields = (p[..., :, None, :] >> xp.asarray(TWO_BIT_SHIFTS)[:, None]) & 3
  codes = fields.astype(xp.int8) - 1  # [..., in/4, 4, out]
  return codes.reshape(*p.shape[:-2], p.shape[-2] * 4, p.shape[-1])


def pack_base3(codes: np.ndarray) -> np.ndarray:
  """int8 codes `[..., in, out]` -> uint8 `[..., ceil(in/5), out]`."""
  u = np.asarray(codes, np.int16) + 1
  pad = (-u.shape[-2]) % 5
  if pad:
    widths = [(0, 0)] * u.ndim
    widths[-2] = (0, pad)
    u = np.pad(u, widths, constant_values=1)
  u = u.reshape(*u.shape[:-2], u.shape[-2] // 5, 5, u.shape[-1])
  weights = np.array([1, 3, 9, 27, 81], np.int16)[:, None]
  return np.sum(u * weights, axis=-2).astype(np.uint8)


def unpack_base3(packed: np.ndarray, d_in: int) -> np.ndarray:
  p = np.asarray(packed, np.int16)
  parts = []
  for _ in range(5):
    parts.append((p % 3).astype(np.int8) - 1)
    p = p // 3
  out = np.stack(parts, axis=-2)
  out = out.reshape(*packed.shape[:-2], packed.shape[-2] * 5, packed.shape[-1])
  return out[..., :d_in, :]


# The `sparse34` layout (module docstring). A 3:4 block is its zero's
# position z and the signs of its three nonzeros; 16 patterns with the first
# nonzero +1, times a sign. SPARSE34_PATTERNS[n] is pattern n = z | r1 << 2 |
# r2 << 3 (r: the second / third nonzero is negative); s = 1 negates it.
SPARSE34_PATTERNS = np.asarray(
    [np.insert([1, 1 - 2 * ((n >> 2) & 1), 1 - 2 * (n >> 3)], n & 3, 0)
     for n in range(16)], np.int8)
# The 5-bit field `n | s << 4` of each 4-code block by its base-3 key
# sum_j (code_j + 1) 3^j; 255 for the 49 blocks that are not 3:4.
_SPARSE34_FIELD = np.full(81, 255, np.uint8)
for _n in range(16):
  for _s in range(2):
    _SPARSE34_FIELD[np.dot(SPARSE34_PATTERNS[_n] * (1 - 2 * _s) + 1,
                           [1, 3, 9, 27])] = _n | _s << 4
SPARSE34_ROWS = 32  # inputs per sign byte: `in` must be a multiple of it


def sparse34_rows(d_in: int) -> int:
  """Rows of a `sparse34` codes tensor for `d_in` inputs: in/8 + in/32."""
  return d_in // 8 + d_in // 32


def not_sparse34(codes: np.ndarray) -> np.ndarray:
  """Blocks of 4 consecutive inputs (per output) that do not hold exactly
  one zero, counted per leading index (`codes [..., in, out]` ->
  `[...]`)."""
  c = np.asarray(codes)
  blocks = c.reshape(*c.shape[:-2], c.shape[-2] // 4, 4, c.shape[-1])
  return np.sum(np.sum(blocks == 0, axis=-2) != 1, axis=(-2, -1))


def pack_sparse34(codes: np.ndarray) -> np.ndarray:
  """3:4 int8 codes `[..., in, out]` (in % 32 == 0) -> uint8
  `[..., in/8 + in/32, out]`: the pattern nibbles, then the sign bits."""
  c = np.asarray(codes, np.int16)
  d_in = c.shape[-2]
  if d_in % SPARSE34_ROWS:
    raise ValueError(f"sparse34 packing needs in % {SPARSE34_ROWS} == 0, got "
                     f"in={d_in}; use --packing 2bit or base3.")
  blocks = (c + 1).reshape(*c.shape[:-2], d_in // 4, 4, c.shape[-1])
  field = _SPARSE34_FIELD[np.sum(blocks * np.asarray([1, 3, 9, 27])[:, None],
                                 axis=-2)]  # [..., in/4, out]
  if (field == 255).any():
    raise ValueError(f"{int((field == 255).sum())} blocks of 4 codes are not "
                     "3:4 (exactly one zero); sparse34 cannot hold them.")
  pairs = field.reshape(*field.shape[:-2], d_in // 8, 2, field.shape[-1]) & 15
  nibbles = pairs[..., 0, :] | pairs[..., 1, :] << 4
  signs = (field >> 4).reshape(*field.shape[:-2], d_in // 32, 8,
                               field.shape[-1])
  signs = np.bitwise_or.reduce(signs << np.arange(8, dtype=np.uint8)[:, None],
                               axis=-2)
  return np.concatenate([nibbles, signs], axis=-2).astype(np.uint8)


def unpack_sparse34(packed, xp=np):
  """uint8 `[..., in/8 + in/32, out]` -> int8 codes `[..., in, out]`.
  `xp=jax.numpy` unpacks a jax array (traceable under jit)."""
  p = xp.asarray(packed, xp.uint8)
  d_in = p.shape[-2] * 32 // 5
  nib, sgn = p[..., :d_in // 8, :], p[..., d_in // 8:, :]
  index = xp.stack([nib & 15, nib >> 4], axis=-2)  # [..., in/8, 2, out]
  index = index.reshape(*p.shape[:-2], d_in // 4, p.shape[-1])
  bits = (sgn[..., :, None, :] >> xp.arange(8, dtype=xp.uint8)[:, None]) & 1
  sign = 1 - 2 * bits.reshape(index.shape).astype(xp.int8)
  codes = xp.asarray(SPARSE34_PATTERNS)[index.astype(xp.int32)] * sign[..., None]
  codes = xp.swapaxes(codes, -1, -2)  # [..., in/4, 4, out]
  return codes.reshape(*p.shape[:-2], d_in, p.shape[-1]).astype(xp.int8)


def pack(codes: np.ndarray, packing: str) -> np.ndarray:
  """int8 codes `[..., in, out]` -> the `packing`'s uint8 tensor."""
  return {"2bit": pack_2bit, "base3": pack_base3,
          "sparse34": pack_sparse34}[packing](codes)


def packed_rows(packing: str, d_in: int) -> int:
  """Rows (axis -2) of a packed codes tensor for `d_in` inputs."""
  return {"2bit": d_in // 4, "base3": -(-d_in // 5),
          "sparse34": sparse34_rows(d_in)}[packing]


def unpack(packed: np.ndarray, packing: str, d_in: int) -> np.ndarray:
  if packing == "2bit":
    return unpack_2bit(packed)
  if packing == "sparse34":
    return unpack_sparse34(packed)
  return unpack_base3(packed, d_in)


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

# Methods with a multiplication-free inference form (codes · alpha, c, γ).
EXPORTABLE = ("absmean", "twn", "tequila", "lsq", "seq", "dlt", "sherry")


def _stacked_projections(model: Llama) -> dict[str, dict]:
  """Per projection, its stacked kernel and learned quantizer parameters."""
  layers = nnx.to_pure_dict(nnx.state(model.layers, nnx.Param))
  return {p: layers[group][p] for p, group in PROJECTIONS.items()}


def export_tensors(model: Llama, packing: str = "2bit",
                   float_dtype: str = "float32") -> dict[str, np.ndarray]:
  """The container's tensors for a (QAT) model (see the module invariant)."""
  cfg = model.cfg
  if cfg.quant.method not in EXPORTABLE:
    raise ExportError(
        f"quant method {cfg.quant.method!r} has no multiplication-free "
        f"inference form; export {', '.join(EXPORTABLE)} models.")
  if packing not in PACKINGS:
    raise ValueError(f"packing {packing!r}: choose one of {PACKINGS}.")
  fdt = FLOAT_DTYPES[float_dtype]
  state = jax.jit(jax.vmap(lambda p: quant.ternary_state(
      p["kernel"], cfg.quant,
      {k: v for k, v in p.items() if k in quant.QPARAM_NAMES})))
  out = {}
  for name, proj in _stacked_projections(model).items():
    st = state(proj)
    codes = np.asarray(st.codes)
    per_out = lambda a: np.broadcast_to(  # noqa: E731  [L, groups, out]
        np.asarray(a, np.float32), (*a.shape[:2], codes.shape[-1]))
    if packing == "sparse34":
      _check_sparse34(name, codes, cfg.quant.method)
    out[f"layers.{name}.codes"] = pack(codes, packing)
    out[f"layers.{name}.alpha"] = per_out(st.alpha)
    out[f"layers.{name}.c"] = np.asarray(st.c, np.float32)
    if st.gamma is not None:
      out[f"layers.{name}.gamma"] = per_out(st.gamma)
  layers = nnx.to_pure_dict(nnx.state(model.layers, nnx.Param))
  out["layers.attn_norm"] = np.asarray(layers["attn_norm"]["scale"], fdt)
  out["layers.mlp_norm"] = np.asarray(layers["mlp_norm"]["scale"], fdt)
  out["embed"] = np.asarray(model.embed.embedding[...], fdt)
  out["final_norm"] = np.asarray(model.final_norm.scale[...], fdt)
  if model.lm_head is not None:
    out["lm_head"] = np.asarray(model.lm_head[...], fdt)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _check_sparse34(name: str, codes: np.ndarray, method: str) -> None:
  """Refuses codes `[L, in, out]` that `sparse34` cannot hold, naming the
  first layer with blocks that are not 3:4 and how many."""
  d_in = codes.shape[-2]
  if d_in % SPARSE34_ROWS:
    raise ExportError(
        f"layers.{name}: {d_in} inputs, not a multiple of {SPARSE34_ROWS}: "
        "sparse34 cannot pack them; use --packing 2bit or base3.")
  bad = not_sparse34(codes)
  if bad.any():
    layer = int(np.flatnonzero(bad)[0])
    why = ("" if method == "sherry" else
           f" (method {method!r} does not make 3:4 codes; sherry does)")
    raise ExportError(
        f"layer {layer} {name}: {int(bad[layer])} of {codes[layer].size // 4} "
        f"blocks of 4 codes are not 3:4 (exactly one zero){why}, "
        f"{int(bad.sum())} in all layers; sparse34 cannot hold them: use "
        "--packing 2bit or base3, which hold any codes exactly.")


def tokenizer_metadata(tok: tokenizers.Tokenizer | None) -> str:
  """How an export rebuilds `tok`: none, 'bytes', or an embedded file."""
  if tok is None:
    return json.dumps({"kind": "none"})
  if isinstance(tok, tokenizers.ByteTokenizer):
    return json.dumps({"kind": "bytes"})
  if isinstance(tok, tokenizers.HFTokenizer):
    return json.dumps({"kind": "tokenizer.json", "json": tok.to_json(),
                       "bos": tok.bos_token, "eos": tok.eos_token,
                       "settings": tok.settings})
  if isinstance(tok, tokenizers.TiktokenTokenizer):
    return json.dumps({"kind": "tiktoken", "model": base64.b64encode(
        pathlib.Path(tok.model_path).read_bytes()).decode()})
  raise ExportError(f"cannot embed a {type(tok).__name__} in an export.")


def build_export(model: Llama, *,
                 tokenizer: tokenizers.Tokenizer | None = None,
                 packing: str = "2bit", float_dtype: str = "float32"
                 ) -> "Export":
  """The export of a (QAT) model, in memory (see the module invariant);
  refused if any tensor is not finite."""
  tensors = export_tensors(model, packing, float_dtype)
  refuse_non_finite(tensors)
  return Export(ModelConfig(model.cfg.arch), packing, tensors,
                json.loads(tokenizer_metadata(tokenizer)))


def refuse_non_finite(tensors: dict) -> None:
  for name, t in tensors.items():
    if t.dtype.kind == "f" or t.dtype == ml_dtypes.bfloat16:
      bad = int(np.size(t) - np.isfinite(np.asarray(t, np.float32)).sum())
      if bad:
        raise ExportError(
            f"tensor {name} holds {bad} non-finite values: the checkpoint is "
            "damaged or training diverged. Export an earlier step (--step).")


def checksum(array: np.ndarray) -> str:
  """sha256 of a tensor's bytes (C order), as stored in version-3 exports."""
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def header_checksum(meta: dict, tensors: dict) -> str:
  """sha256 of every metadata entry but `header_checksum` itself (model,
  quantization, packing, tokenizer, tensor checksums, any added later) and
  of each tensor's name, dtype and shape, as stored in version-4 exports."""
  covered = {"metadata": {k: v for k, v in meta.items()
                          if k != HEADER_CHECKSUM},
             "tensors": {k: [str(v.dtype), list(v.shape)]
                         for k, v in tensors.items()}}
  return hashlib.sha256(
      json.dumps(covered, sort_keys=True).encode()).hexdigest()


def save_export(export: "Export", path) -> dict:
  """Writes `export` to `path` atomically; returns a size report. Refuses
  non-finite tensors before writing."""
  refuse_non_finite(export.tensors)
  meta = {"format": FORMAT, "version": VERSION,
          "model": export.cfg.arch.to_json(), "packing": export.packing,
          "tokenizer": json.dumps(export.tokenizer),
          "checksums": json.dumps({k: checksum(v) for k, v in
                                   sorted(export.tensors.items())})}
  meta[HEADER_CHECKSUM] = header_checksum(meta, export.tensors)
  with atomic_path(path) as tmp:
    save_file(export.tensors, tmp, metadata=meta)
  return size_report(export.tensors, export.cfg, path)


def write_export(model: Llama, path, *,
                 tokenizer: tokenizers.Tokenizer | None = None,
                 packing: str = "2bit", float_dtype: str = "float32") -> dict:
  """Writes the export of `model` to `path` atomically; returns a size
  report."""
  return save_export(build_export(model, tokenizer=tokenizer, packing=packing,
                                  float_dtype=float_dtype), path)


def size_report(tensors: dict, cfg: ModelConfig, path=None) -> dict:
  """Bytes on disk and bits per ternary weight (codes + scales + c)."""
  n_weights = cfg.num_layers * sum(
      np.prod(projection_dims(cfg, p)) for p in PROJECTIONS)
  ternary_bytes = sum(tensors[f"layers.{p}.{k}"].nbytes for p in PROJECTIONS
                      for k in ("codes", "alpha", "c", "gamma")
                      if f"layers.{p}.{k}" in tensors)
  code_bytes = sum(tensors[f"layers.{p}.codes"].nbytes for p in PROJECTIONS)
  total = sum(t.nbytes for t in tensors.values())
  return dict(file_bytes=(pathlib.Path(path).stat().st_size if path else None),
              tensor_bytes=total, ternary_weights=int(n_weights),
              ternary_bits_per_weight=8 * ternary_bytes / n_weights,
              code_bits_per_weight=8 * code_bytes / n_weights,
              float_bytes=total - ternary_bytes)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Export:
  """A validated export: model config, packing, tensors, tokenizer metadata."""
  cfg: ModelConfig
  packing: str
  tensors: dict[str, np.ndarray]
  tokenizer: dict

  def codes(self, name: str) -> np.ndarray:
    """Unpacked int8 codes `[L, in, out]`."""
    d_in, _ = projection_dims(self.cfg, name)
    return unpack(self.tensors[f"layers.{name}.codes"], self.packing, d_in)

  def gamma(self, name: str) -> np.ndarray | None:
    """DLT's per-group offset `[L, groups, out]`, or None."""
    return self.tensors.get(f"layers.{name}.gamma")

  def quantized_kernel(self, name: str) -> np.ndarray:
    """Q `[L, in, out]` in fp32 (the invariant, γ included)."""
    codes = self.codes(name).astype(np.float32)
    alpha = self.tensors[f"layers.{name}.alpha"]
    layers, d_in, d_out = codes.shape
    groups = alpha.shape[1]
    q = codes.reshape(layers, groups, d_in // groups, d_out) * alpha[:, :, None]
    if self.gamma(name) is not None:
      q = q + self.gamma(name)[:, :, None]
    return q.reshape(layers, d_in, d_out)

  def load_tokenizer(self) -> tokenizers.Tokenizer:
    kind = self.tokenizer.get("kind")
    if kind == "bytes":
      return tokenizers.ByteTokenizer()
    if kind == "tokenizer.json":
      return tokenizers.HFTokenizer.from_json(
          self.tokenizer["json"], self.tokenizer.get("bos"),
          self.tokenizer.get("eos"), self.tokenizer.get("settings"))
    if kind == "tiktoken":
      with tempfile.NamedTemporaryFile(suffix=".model", delete=False) as f:
        f.write(base64.b64decode(self.tokenizer["model"]))
      return tokenizers.TiktokenTokenizer(f.name)
    raise ExportError("this export carries no tokenizer; pass one explicitly.")


def _verify(path, meta: dict, tensors: dict) -> None:
  """Checks the header and tensor checksums that `meta`'s version carries
  (refusing a file that should carry them but does not)."""
  version = int(meta["version"])
  required = (["checksums"] if version >= 3 else []) + (
      [HEADER_CHECKSUM] if version >= 4 else [])
  missing = [k for k in required if k not in meta]
  if missing:
    raise ExportError(
        f"{path} is export version {version} but lacks its {missing} "
        "metadata: the header was edited or damaged. Copy it again or "
        "re-export it.")
  if version >= 4 and meta[HEADER_CHECKSUM] != header_checksum(meta, tensors):
    raise ExportError(
        f"{path} is corrupted: its header (model config, quantization, "
        "packing, tokenizer or checksums) does not match its header "
        "checksum. Copy it again or re-export it.")
  if "checksums" not in meta:
    log.warning("%s is export version %s, which carries no checksums: its "
                "tensors cannot be verified (re-export to add them).", path,
                meta["version"])
    return
  try:
    sums = json.loads(meta["checksums"])
  except ValueError as e:
    raise ExportError(f"{path} has a broken header (checksums: {e}); copy it "
                      "again or re-export it.") from e
  bad = sorted(k for k in tensors if sums.get(k) != checksum(tensors[k]))
  if bad or set(sums) != set(tensors):
    raise ExportError(
        f"{path} is corrupted: tensors {bad or sorted(set(sums) ^ set(tensors))}"
        " do not match their checksums. Copy it again or re-export it.")
  if version == 3:
    log.warning("%s is export version 3, whose header (model config, "
                "tokenizer) carries no checksum: re-export to add one.", path)


def read_export(path) -> Export:
  """Opens and validates an export; refuses foreign, truncated or
  wrong-version files with a message that says which."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"export {path} not found.")
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
      if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is a safetensors file but not a tequila_jax "
                          "export (no format=tequila_jax metadata).")
      if meta.get("version") not in READABLE:
        raise ExportError(
            f"{path} is export version {meta.get('version')!r}; this "
            f"tequila_jax reads versions {', '.join(READABLE)}. Re-export the "
            "checkpoint with `python -m tequila_jax.export`.")
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    if isinstance(e, ExportError):
      raise
    raise ExportError(f"{path} is truncated or not a safetensors export "
                      f"({e}).") from e
  _verify(path, meta, tensors)
  try:
    arch = json.loads(meta["model"])
    if meta["version"] == "1":
      arch = {k: v for k, v in arch.items() if k in ARCH_FIELDS}
    cfg = ModelConfig(Architecture.from_dict(arch))
    export = Export(cfg, meta["packing"], tensors,
                    json.loads(meta["tokenizer"]))
  except (KeyError, TypeError, ValueError) as e:
    raise ExportError(f"{path} has a broken header ({type(e).__name__}: "
                      f"{e}); re-export the checkpoint.") from e
  if export.packing not in PACKINGS:
    raise ExportError(f"{path}: packing {export.packing!r} is not one this "
                      f"tequila_jax reads ({', '.join(PACKINGS)}); re-export "
                      "the checkpoint.")
  for name in PROJECTIONS:  # shape check against the config
    d_in, d_out = projection_dims(cfg, name)
    if export.packing == "sparse34" and d_in % SPARSE34_ROWS:
      raise ExportError(f"{path}: layers.{name} has {d_in} inputs, which "
                        f"sparse34 cannot hold (a multiple of "
                        f"{SPARSE34_ROWS}); the file is damaged.")
    codes = tensors.get(f"layers.{name}.codes")
    rows = packed_rows(export.packing, d_in)
    want = (cfg.num_layers, rows, d_out)
    if codes is None or codes.shape != want:
      raise ExportError(f"{path}: layers.{name}.codes has shape "
                        f"{None if codes is None else codes.shape}, expected "
                        f"{want}; the file is damaged.")
  return export
