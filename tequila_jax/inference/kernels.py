"""Ternary linear layers on packed 2-bit codes, in plain XLA.

All strategies compute `y = x @ Q + c` for `Q = codes * alpha` (per input
group of G) from the packed bytes of a `.tqj` export (`2bit` layout, `io.tqj`):

- `exact`: unpack to fp32 Q and one fp32 dot. Bit-for-bit the QAT forward's
  math in fp32 (up to dot summation order).
- `lut` (decode, small M): T-MAC style table lookup. Per token, the partial
  sums of every 4-input chunk for all 256 byte values are computed once
  (`[in/4, 256]`), gathered by weight byte, reduced per block of 128 inputs
  (whatever the group size), per group, scaled by alpha. Activations stay
  fp32: exact up to summation order. Shaped for XLA:CPU's code generator
  (each step measured): bytes in `lut_layout` order (made once at load:
  block-major, a column's 32 bytes of one block contiguous, so its table
  slice fits L1), so that the gathers and the in-block sum are one loop with
  no `[in/4, out]` temporary; that sum as pairwise halvings (independent
  adds); the sums over blocks and groups as reduce-windows, which stay out
  of that loop. Jit
  with `CPU_COMPILER_OPTIONS` (PackedLlama does): by default XLA:CPU hands
  the in-group sum to YNNPACK and materializes the gathered values.
- `int8` (batches, M >= 8): codes as int8 in `int8_layout` order (unpacked
  once at load: 1 byte/weight) and activations quantized to int8 per token
  (absmax / 127); one int8 x int8 -> int32 2-D dot per input group (XLA's
  batched integer dot takes a slow loop), each scaled by its alpha, then by
  the activation scale.
  **Quantizes activations**: relative error ~1e-2 (tests bound it by 3e-2).
- `q8k`: emulates llama.cpp's TQ2_0 matmul for checking GGUF exports:
  activations quantized per 256-block as Q8_K (scale -127 / signed max,
  round to nearest) and alpha rounded to fp16, then an fp32 dot.
- `auto`: `lut` for M < 8, else `int8`; PackedLlama holds both forms.
- `lean`: as `auto`, but only the `lut` bytes are held: batched calls unpack
  them in-program to the int8 codes (`lut_codes`, elementwise; a transient
  per projection), at ~0.9x `auto`'s prefill speed for 2bit and ~0.75x
  for sparse34 (its unpack costs more), and none of its extra byte per
  weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tequila_jax.io import tqj
from tequila_jax.quant.activations import fake_quantize_int8, quantize_int8

STRATEGIES = ("exact", "lut", "int8", "q8k", "auto", "lean")
# XLA:CPU's YNNPACK fusions for dots only, not for reductions (see `lut`).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# _BYTE_CODES[b, j] = code of input j (0..3) in byte b: every byte value
# unpacked by the export format's own `unpack_2bit`.
_BYTE_CODES = tqj.unpack_2bit(np.arange(256, dtype=np.uint8)[None]).T.astype(
    np.float32)


# SPARSE34_PAIRS[i] = the 8 codes of two sparse34 blocks (inputs 8k..8k+7)
# whose pattern byte and sign bits are i = byte | s_lo << 8 | s_hi << 9.
_INDEX = np.arange(1024)
SPARSE34_PAIRS = np.concatenate(
    [tqj.SPARSE34_PATTERNS[_INDEX & 15] * (1 - 2 * (_INDEX >> 8 & 1))[:, None],
     tqj.SPARSE34_PATTERNS[_INDEX >> 4 & 15] * (1 - 2 * (_INDEX >> 9))[:, None]],
    axis=1).astype(np.float32)


KERNEL_PACKINGS = ("2bit", "sparse34")  # what the kernels read (base3: repack)


def unpack_codes(packed: jax.Array, dtype=jnp.int8,
                 packing: str = "2bit") -> jax.Array:
  """uint8 `[in/4, out]` (`2bit`) or `[in/8 + in/32, out]` (`sparse34`) ->
  codes `[in, out]` in {-1, 0, 1} (`tqj.unpack_2bit`, `unpack_sparse34`)."""
  if packing == "sparse34":
    return tqj.unpack_sparse34(packed, jnp).astype(dtype)
  return tqj.unpack_2bit(packed, jnp).astype(dtype)


def _exact(x, packed, alpha, c, packing="2bit"):
  codes = unpack_codes(packed, jnp.float32, packing)
  d_in, d_out = codes.shape
  groups = alpha.shape[0]
  q = (codes.reshape(groups, d_in // groups, d_out) * alpha[:, None, :]
       ).reshape(d_in, d_out)
  return jnp.dot(x, q, precision="highest") + c


# The `lut` kernel's block: this many inputs (or the gcd with the group
# size) per pass, i.e. a table of 32 x 256 fp32 (32 KiB, one core's L1) while
# each column's 32 bytes are gathered. Larger blocks measured up to 2x slower
# (per-channel layouts gathered from a 512 KiB table).
LUT_BLOCK = 128


def lut_block(d_in: int, groups: int) -> int:
  """Inputs per `lut` block: gcd(group size, LUT_BLOCK), a multiple of 4."""
  if d_in % groups or (d_in // groups) % 4:
    raise ValueError(f"{d_in} inputs in {groups} groups: the group size must "
                     "be a whole multiple of 4.")
  return int(np.gcd(d_in // groups, LUT_BLOCK))


def lut_layout(packed: jax.Array, groups: int) -> jax.Array:
  """Packed `[in/4, out]` -> the `lut` kernel's order `[blocks, out, bytes]`
  (each column's bytes of one `lut_block` contiguous). Same bytes, reordered."""
  k, d_out = packed.shape
  per_block = lut_block(4 * k, groups) // 4
  return packed.reshape(k // per_block, per_block, d_out).transpose(0, 2, 1)


def _lut_one(x, lut_bytes, alpha, c):
  """x `[in]` -> `[out]` by table lookup over bytes in `lut_layout` order."""
  table = x.reshape(-1, 4) @ jnp.asarray(_BYTE_CODES).T  # [in/4, 256]
  blocks, _, per_block = lut_bytes.shape
  row = jnp.arange(blocks * per_block, dtype=jnp.int32).reshape(blocks, 1, -1)
  flat = lut_bytes.astype(jnp.int32) + row * 256
  partial = table.reshape(-1).at[flat].get(mode="promise_in_bounds")
  return _block_sums(partial, alpha, c)


def _block_sums(partial, alpha, c):
  """`[blocks, out, k]` gathered partial sums -> `[out]`: summed per block,
  per group, scaled by alpha, summed over groups, plus c."""
  # Pairwise halving: XLA:CPU emits independent adds, not one serial chain.
  while partial.shape[-1] > 4 and partial.shape[-1] % 2 == 0:
    half = partial.shape[-1] // 2
    partial = partial[..., :half] + partial[..., half:]
  partial = partial.sum(axis=-1)  # [blocks, out]
  blocks = partial.shape[0]
  # Sums over blocks as reduce-windows, which XLA:CPU does not fuse with the
  # gathers above; fused, the whole kernel becomes one slow loop (1.5x).
  groups = alpha.shape[0]
  per_group = blocks // groups
  if per_group > 1:
    partial = jax.lax.reduce_window(partial, 0.0, jax.lax.add,
                                    (per_group, 1), (per_group, 1))
  scaled = partial * alpha  # [groups, out]
  window = groups // 2 if groups % 2 == 0 else groups
  partial_sums = jax.lax.reduce_window(scaled, 0.0, jax.lax.add,
                                       (window, 1), (window, 1))
  return partial_sums.sum(axis=0) + c


# The `sparse34` `lut` kernel's block (inputs per pass): its table holds
# 1024 fp32 entries per 8 inputs, so 64 inputs are 32 KiB (one core's L1).
LUT34_BLOCK = 64


def lut34_block(d_in: int, groups: int) -> int:
  """Inputs per sparse34 `lut` block: gcd(group size, LUT34_BLOCK), a
  multiple of 32 (one sign byte)."""
  size = d_in // groups if d_in % groups == 0 else 0
  block = int(np.gcd(size, LUT34_BLOCK))
  if size == 0 or block % tqj.SPARSE34_ROWS:
    raise ValueError(f"{d_in} inputs in {groups} groups: sparse34's `lut` "
                     f"needs a group size that is a multiple of "
                     f"{tqj.SPARSE34_ROWS}; use strategy exact or int8.")
  return block


def lut34_layout(packed: jax.Array, groups: int) -> jax.Array:
  """sparse34 bytes `[in/8 + in/32, out]` -> the `lut` kernel's order
  `[blocks, out, block/8 + block/32]`: per block and column, its pattern
  bytes then its sign bytes, contiguous. Same bytes, reordered."""
  rows, d_out = packed.shape
  d_in = rows * 32 // 5
  block = lut34_block(d_in, groups)
  nib = packed[:d_in // 8].reshape(d_in // block, block // 8, d_out)
  sgn = packed[d_in // 8:].reshape(d_in // block, block // 32, d_out)
  return jnp.concatenate([nib, sgn], axis=1).transpose(0, 2, 1)


def _lut34_one(x, lut_bytes, alpha, c):
  """x `[in]` -> `[out]` by table lookup over sparse34 bytes in
  `lut34_layout` order: one gather per pattern byte (8 inputs) from a
  1024-entry table per 8 inputs, indexed by the byte and its blocks' two
  sign bits. The table is one dot (`SPARSE34_PAIRS`): built elementwise
  from two 16-entry tables, XLA:CPU fuses it into the gather loop (2.5x
  slower)."""
  blocks, _, width = lut_bytes.shape
  per_block = width * 4 // 5  # pattern bytes per block; then its sign bytes
  table = x.reshape(-1, 8) @ jnp.asarray(SPARSE34_PAIRS).T  # [in/8, 1024]
  nib = lut_bytes[..., :per_block].astype(jnp.int32)
  sgn = lut_bytes[..., per_block:].astype(jnp.int32)
  # Pattern byte 4t + q's sign bits: bits 2q, 2q + 1 of sign byte t.
  pair_signs = ((sgn[..., None] >> jnp.asarray([0, 2, 4, 6])) & 3
                ).reshape(nib.shape)
  row = jnp.arange(blocks * per_block, dtype=jnp.int32).reshape(blocks, 1, -1)
  flat = nib + pair_signs * 256 + row * 1024
  partial = table.reshape(-1).at[flat].get(mode="promise_in_bounds")
  return _block_sums(partial, alpha, c)


def lut_codes(lut: jax.Array, groups: int, packing: str = "2bit"
              ) -> jax.Array:
  """The codes held by `lut` bytes (`lut_layout`, or `lut34_layout` for
  `sparse34`) as int8 in `int8_layout` order `[groups, out, in/groups]`
  (traceable: `lean` runs its batched calls on them)."""
  blocks, d_out, width = lut.shape
  if packing != "sparse34":  # the bytes back in packed order, unpacked
    return int8_layout(unpack_codes(lut.transpose(0, 2, 1).reshape(-1, d_out)),
                       groups)
  # sparse34 elementwise, in the `lut` order: `tqj.unpack_sparse34`'s table
  # gather on the packed order made a 128-token prefill of a 2048 x 8192
  # projection 74 ms against 54 (the int8 dot alone: 44).
  per_block = width * 4 // 5  # pattern bytes, then sign bytes
  nib, sgn = lut[..., :per_block], lut[..., per_block:]
  # Block k of 4 inputs under sign byte t: nibble k % 2 of pattern byte
  # 4t + k // 2, sign bit k of byte t (`tqj` module doc).
  n = ((nib[..., None] >> jnp.asarray([0, 4], jnp.uint8)) & 15).reshape(
      blocks, d_out, -1, 8)[..., None].astype(jnp.int8)
  s = ((sgn[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1)[
      ..., None].astype(jnp.int8)
  j = jnp.arange(4, dtype=jnp.int8)
  zero = n & 3  # pattern n = z | r1 << 2 | r2 << 3 (`SPARSE34_PATTERNS`)
  rank = j - (j > zero).astype(jnp.int8)  # input j's place among nonzeros
  negative = (((n >> 1) & 6) >> rank) & 1  # 0, r1, r2 by rank
  codes = jnp.where(j == zero, 0, 1 - 2 * (negative ^ s)).astype(jnp.int8)
  codes = codes.reshape(blocks, d_out, -1)  # [blocks, out, block]
  per_group = blocks // groups
  return codes.reshape(groups, per_group, d_out, -1).transpose(
      0, 2, 1, 3).reshape(groups, d_out, -1)


def _two_rows(x):
  """Pads a one-row `[1, in]` operand to two rows: XLA:CPU's one-row bf16 and
  int8 dots take a slow path (~8x and ~12x here)."""
  return jnp.pad(x, ((0, 1), (0, 0))) if x.shape[0] == 1 else x


def int8_dense(x: jax.Array, w_t: jax.Array, w_scale: jax.Array) -> jax.Array:
  """`x[M, in] @ W` for int8 `w_t = W.T` `[out, in]` with per-output scales
  `[out]`. Activations as two int8 terms per row, the value and its
  rounding residual (x ~ s1 q1 + s2 q2: error ~1e-4 of x, so the weights'
  rounding is what remains), both rows of one int8 dot (a one-row call is
  padded to two anyway: `_two_rows`)."""
  m = x.shape[0]
  x = x.astype(jnp.float32)
  q1, s1 = quantize_int8(x)
  q2, s2 = quantize_int8(x - q1.astype(jnp.float32) * s1)
  acc = jax.lax.dot_general(jnp.concatenate([q1, q2]), w_t,
                            (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  acc = acc.astype(jnp.float32)
  return (acc[:m] * s1 + acc[m:] * s2) * w_scale


def dense(x, w, transposed: bool = False):
  """`x @ w` (`x @ w.T` if `transposed`) accumulated in fp32; one-row bf16
  calls padded to two (`_two_rows`)."""
  lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1]).astype(w.dtype)
  m = x2.shape[0]
  if w.dtype != jnp.float32:
    x2 = _two_rows(x2)
  contract = (((1,), (1 if transposed else 0,)), ((), ()))
  y = jax.lax.dot_general(x2, w, contract,
                          preferred_element_type=jnp.float32)[:m]
  return y.reshape(*lead, -1)


def int8_layout(codes: jax.Array, groups: int) -> jax.Array:
  """Codes `[in, out]` -> the `int8` kernel's order `[groups, out, in/groups]`
  (each output's inputs of a group contiguous: XLA:CPU's int8 dot runs
  ~10% faster on per-channel prefill than with `[in, out]`, up to 20% on
  the down projection)."""
  d_in, d_out = codes.shape
  return codes.reshape(groups, d_in // groups, d_out).transpose(0, 2, 1)


def _int8(x, codes_t, alpha, c):
  """`codes_t` in `int8_layout` order."""
  size = codes_t.shape[2]
  xq, scale = quantize_int8(x)
  y = 0.0
  for g in range(codes_t.shape[0]):  # unrolled: 2-D int8 dots are fast
    acc = jax.lax.dot_general(xq[:, g * size:(g + 1) * size], codes_t[g],
                              (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    y = y + acc.astype(jnp.float32) * alpha[g]
  return y * scale + c


def q8k_activations(x: jax.Array, block: int = 256) -> jax.Array:
  """x `[M, in]` after llama.cpp's Q8_K quantize/dequantize round trip."""
  xb = x.reshape(x.shape[0], -1, block)
  idx = jnp.argmax(jnp.abs(xb), axis=-1, keepdims=True)
  signed_max = jnp.take_along_axis(xb, idx, axis=-1)
  iscale = jnp.where(signed_max != 0, -127.0 / signed_max, 0.0)
  q = jnp.minimum(127.0, jnp.round(iscale * xb))
  d = jnp.where(iscale != 0, 1.0 / iscale, 0.0)
  return (q * d).reshape(x.shape)


def ternary_linear(x: jax.Array, packed: jax.Array, alpha: jax.Array,
                   c: jax.Array, strategy: str = "auto",
                   codes: jax.Array | None = None,
                   lut: jax.Array | None = None,
                   gamma: jax.Array | None = None,
                   act_bits: int = 0, packing: str = "2bit") -> jax.Array:
  """`x[..., in] @ Q + c` from packed codes `[in/4, out]`, in fp32; with
  DLT's per-group offset `gamma [groups, out]` (Q = codes · alpha + γ),
  y_j also gains Σ_g γ_gj · Σ_{i∈g} x_i (a `[groups]`-deep dot). With
  `act_bits=8` (a W1.58A8 model) every strategy sees x quantized per token
  as the QAT forward does (`quant.activations`); `int8` does so anyway.

  `codes` (= `int8_layout(unpack_codes(packed), groups)`, int8) serves the
  `int8` strategy and `lut` (= `lut_layout(packed, groups)`) the `lut`
  strategy; each is derived on the fly when not given (`packed` may then be
  None; the codes from `lut` when it is given: `lean`). `alpha` may be held
  in fp16 (half the bytes); it is widened to fp32 here. `packing="sparse34"`:
  `packed` holds sparse34 bytes `[in/8 + in/32, out]` and `lut` their
  `lut34_layout`.
  """
  if packing not in KERNEL_PACKINGS:
    raise ValueError(f"packing {packing!r}: the kernels read "
                     f"{KERNEL_PACKINGS}; repack the codes with tqj.pack.")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  alpha = alpha.astype(jnp.float32)
  m = x2.shape[0]
  if strategy in ("auto", "lean"):
    strategy = "lut" if m < 8 else "int8"
  xq = fake_quantize_int8(x2) if act_bits == 8 else x2
  sparse = packing == "sparse34"
  if strategy == "exact":
    y = _exact(xq, packed, alpha, c, packing)
  elif strategy == "lut":
    if lut is None:
      lut = (lut34_layout if sparse else lut_layout)(packed, alpha.shape[0])
    one = _lut34_one if sparse else _lut_one
    y = jax.vmap(lambda r: one(r, lut, alpha, c))(xq)
  elif strategy == "int8":
    if codes is None:
      codes = (lut_codes(lut, alpha.shape[0], packing) if lut is not None else
               int8_layout(unpack_codes(packed, packing=packing),
                           alpha.shape[0]))
    y = _int8(x2, codes, alpha, c)
  elif strategy == "q8k":
    alpha16 = alpha.astype(jnp.float16).astype(jnp.float32)
    y = _exact(q8k_activations(x2), packed, alpha16, c, packing)
  else:
    raise ValueError(f"strategy {strategy!r}: choose one of {STRATEGIES}.")
  if gamma is not None:
    groups = gamma.shape[0]
    sums = jnp.sum(xq.reshape(m, groups, -1), axis=-1)  # [m, groups]
    y = y + jnp.dot(sums, gamma.astype(jnp.float32), precision="highest")
  return y.reshape(*lead, -1)
