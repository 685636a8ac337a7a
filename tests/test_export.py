"""Packed exports: bit-exact packing, the container invariant, CPU inference."""

import ast
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from experiments import inference_precision
from tequila_jax import config_lib, model as model_lib, quant, train
from tequila_jax import inference
from tequila_jax.inference import (DenseLlama, InferenceSettings, PackedLlama,
                                   kernels)
from tequila_jax.io import tokenizers, tqj
from tests.cli import ROOT, run_cli
from tests.conftest import tiny_model_config
from tests.reference import decode_in_steps
from tests.tolerances import (EPS_BF16, assert_within, chain_atol,
                              llama_depth, llama_k, settle_codes,
                              sum_order_bound)

SHAPES = [(128, 128), (128, 64), (256, 128), (2048, 8192), (8192, 2048),
          (576, 1536), (1536, 576)]


@pytest.mark.parametrize("shape", SHAPES)
def test_packing_round_trips_bit_exactly(shape):
  codes = np.random.default_rng(0).integers(-1, 2, (2, *shape)).astype(np.int8)
  packed = tqj.pack_2bit(codes)
  assert packed.shape == (2, shape[0] // 4, shape[1]) and packed.dtype == np.uint8
  np.testing.assert_array_equal(tqj.unpack_2bit(packed), codes)
  np.testing.assert_array_equal(
      np.asarray(kernels.unpack_codes(jnp.asarray(packed[1]))), codes[1])
  b3 = tqj.pack_base3(codes)
  assert b3.shape[-2] == -(-shape[0] // 5)
  np.testing.assert_array_equal(tqj.unpack_base3(b3, shape[0]), codes)


def test_2bit_layout_is_the_documented_one_and_the_kernels_read_it():
  """`u = code + 1`, input 4k + j in bits 2j of byte k (the tqj docstring);
  the `lut` kernel's byte table is that layout's inverse for every byte."""
  codes = np.asarray([[-1], [0], [1], [0], [1], [1], [-1], [-1]], np.int8)
  packed = tqj.pack_2bit(codes)
  np.testing.assert_array_equal(packed, [[0 | 1 << 2 | 2 << 4 | 1 << 6],
                                         [2 | 2 << 2 | 0 << 4 | 0 << 6]])
  table = kernels._BYTE_CODES  # pylint: disable=protected-access
  assert table.shape == (256, 4)
  every = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(tqj.pack_2bit(table[every].T), every[None])
  jitted = jax.jit(kernels.unpack_codes)
  np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(packed))), codes)


def test_base3_odd_sizes():
  codes = np.random.default_rng(1).integers(-1, 2, (13, 7)).astype(np.int8)
  np.testing.assert_array_equal(
      tqj.unpack_base3(tqj.pack_base3(codes), 13), codes)


@pytest.fixture(scope="module")
def qat_model():
  cfg = tiny_model_config("tequila")
  cfg = cfg.replace(quant=cfg.quant.__class__("tequila", group_size=64, lam=0.05))
  m = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  # Move the weights off their init so that c(W) is not trivially tiny.
  state = nnx.state(m, nnx.Param)
  noise = jax.tree.map(lambda a: 0.02 * jax.random.normal(jax.random.key(1),
                                                           a.shape), state)
  nnx.update(m, jax.tree.map(jnp.add, state, noise))
  return settle_codes(m)  # codes free of summation order (tests/tolerances)


def _atol(want, cfg, tokens=0):
  """Two fp32 forwards of a model `cfg` that may order their sums
  differently (another program or processor): tests/tolerances.py."""
  return chain_atol(want, llama_k(cfg, tokens), llama_depth(cfg.num_layers))


@pytest.mark.parametrize("packing", ["2bit", "base3"])  # any codes
def test_export_invariant_recovers_q_and_c_exactly(qat_model, tmp_path, packing):
  path = tmp_path / "m.tqj"
  report = tqj.write_export(qat_model, path, tokenizer=tokenizers.ByteTokenizer(),
                               packing=packing)
  # 2 bits, or 8/5 bits (+ padding of 128 or 256 rows to multiples of 5).
  assert report["code_bits_per_weight"] == (2.0 if packing == "2bit" else
                                            pytest.approx(1.6, abs=0.03))
  # + fp32 alpha per 64 weights (0.5 bits) + fp32 c per output unit
  # (32 / in = 0.125-0.25 bits at these tiny widths).
  extra = report["ternary_bits_per_weight"] - report["code_bits_per_weight"]
  assert 0.5 + 32 / 256 < extra < 0.5 + 32 / 128
  ex = tqj.read_export(path)
  layers = nnx.to_pure_dict(nnx.state(qat_model.layers, nnx.Param))
  lam = qat_model.cfg.quant.bias_lam
  group_size = qat_model.cfg.quant.group_size
  for name, group in model_lib.PROJECTIONS.items():
    w = layers[group][name]["kernel"]
    st = jax.vmap(lambda k: quant.ternary_state(k, qat_model.cfg.quant))(w)
    # The export computes the state in its own (jitted) program: the codes
    # agree exactly (weights off their thresholds), α = mean|W| and
    # c = λ·Σ_D W to the order of their sums.
    np.testing.assert_array_equal(ex.codes(name), st.codes)
    alpha = ex.tensors[f"layers.{name}.alpha"]
    assert_within(alpha, st.alpha, sum_order_bound(alpha, group_size + 1),
                  name)
    dead = np.abs(np.asarray(w)) * (np.asarray(st.codes) == 0)
    assert_within(ex.tensors[f"layers.{name}.c"], st.c,
                  sum_order_bound(lam * dead.sum(1), w.shape[1] + 1), name)
  assert ex.cfg.arch == qat_model.cfg.arch  # run-time settings: not stored
  assert ex.load_tokenizer().encode("hi") == [104, 105]


def test_packed_model_equals_qat_forward(qat_model, tmp_path):
  path = tmp_path / "m.tqj"
  tqj.write_export(qat_model, path)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 24)))
  want = np.asarray(qat_model(tokens))
  exact = PackedLlama.load(path, InferenceSettings("exact"))
  got = np.asarray(exact(tokens))
  cfg = qat_model.cfg
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=_atol(want, cfg, 48))
  # A prompt's prefill runs the head on its last position only.
  last, _ = exact.decode(tokens, exact.init_cache(2, 24), logits="last")
  assert last.shape == (2, 1, want.shape[-1])
  np.testing.assert_allclose(last[:, 0], got[:, -1], rtol=1e-6,
                             atol=_atol(want, cfg, 48))
  with pytest.raises(ValueError, match="logits='first'"):
    exact.decode(tokens, exact.init_cache(2, 24), logits="first")
  # Prefill + one-token steps through the cache, LUT kernels for M = 1.
  lut = PackedLlama.load(path, InferenceSettings("lut"))
  stepped, _ = decode_in_steps(lut, tokens, 20, 32)
  np.testing.assert_allclose(stepped, want, rtol=1e-4,
                             atol=_atol(want, cfg, 48))
  # The cache's capacity changes nothing: attention reads its filled prefix
  # (256 positions here, the smallest size, of 32 or 1,000), written in place
  # (another capacity is another program: equal to its sums' order).
  roomy, _ = decode_in_steps(lut, tokens, 20, 1000)
  np.testing.assert_allclose(roomy, decode_in_steps(lut, tokens, 20, 256)[0],
                             rtol=1e-6, atol=_atol(want, cfg, 48))
  np.testing.assert_allclose(roomy, stepped, rtol=1e-6,
                             atol=_atol(want, cfg, 48))
  with pytest.raises(ValueError, match="holds 20 positions; decoding to "
                     "position 24 would overrun"):
    lut.decode(tokens, lut.init_cache(2, 20))
  # A bf16 KV cache (held as its uint16 bit patterns): the first layer's
  # keys are fp32's rounded to bf16 (later layers see rounded attention),
  # and the logits are within that rounding of fp32's.
  half = PackedLlama.load(path, InferenceSettings("lut", kv_dtype="bfloat16"))
  rounded, cache = decode_in_steps(half, tokens, 20, 32)
  assert cache.k.dtype == jnp.uint16 and cache.k.shape == (
      qat_model.cfg.num_layers, 2, qat_model.cfg.num_kv_heads, 32,
      qat_model.cfg.head_dim)
  keys = np.asarray(decode_in_steps(lut, tokens, 20, 32)[1].k[0, :, :, :20])
  # Rounded to nearest (half a bf16 ulp, 2^-8 relative) from the fp32 keys
  # of another program (equal to their sums' order).
  assert_within(np.asarray(jax.lax.bitcast_convert_type(
      cache.k[0, :, :, :20], jnp.bfloat16), np.float32), keys,
                EPS_BF16 / 2 * np.abs(keys) + _atol(keys, cfg, 48), "bf16 keys")
  err = np.linalg.norm(rounded - stepped) / np.linalg.norm(stepped)
  assert 1e-6 < err < 2e-2, err
  with pytest.raises(ValueError, match="kv_dtype 'float16': choose one of"):
    PackedLlama.load(path, InferenceSettings("lut", kv_dtype="float16"))
  # `auto` prefills the 2 x 24 = 48 tokens with int8 activations.
  auto = np.asarray(PackedLlama.load(path, InferenceSettings("auto"))(tokens))
  assert np.linalg.norm(auto - want) / np.linalg.norm(want) < 5e-2
  # The int8 embedding/head: per vocab row, one table when tied; the head
  # quantizes the hidden state.
  int8 = PackedLlama.load(path, InferenceSettings("exact", embed="int8"))
  assert int8.params["head_t"] is int8.params["embed"]
  vocab, hidden = qat_model.cfg.vocab_size, qat_model.cfg.hidden_size
  assert int8.memory()["embed_head"] == vocab * hidden + 4 * vocab
  int8_logits = np.asarray(int8(tokens))
  assert np.linalg.norm(int8_logits - want) / np.linalg.norm(want) < 2e-2
  assert np.mean(int8_logits.argmax(-1) == want.argmax(-1)) > 0.9
  with pytest.raises(ValueError, match="embed 'fp8'"):
    PackedLlama.load(path, InferenceSettings(embed="fp8"))
  # fp16 alpha: exactly the fp32 model with alpha rounded to fp16, and
  # 16 / G bits less per weight (G = 64 here).
  half = PackedLlama.load(path, InferenceSettings("exact",
                                                alpha_dtype="float16"))
  rounded = tqj.read_export(path)
  for key in [k for k in rounded.tensors if k.endswith(".alpha")]:
    rounded.tensors[key] = rounded.tensors[key].astype(np.float16).astype(
        np.float32)
  np.testing.assert_allclose(  # fp16 alpha is widened in-program: its order
      half(tokens), PackedLlama(rounded, InferenceSettings("exact"))(tokens),
      rtol=1e-6, atol=_atol(want, cfg, 48))
  assert (exact.memory()["bits_per_ternary_weight"] -
          half.memory()["bits_per_ternary_weight"]) == pytest.approx(16 / 64)
  # A bf16 export keeps its embedding (the tied head) bf16 at run time:
  # half the bytes, logits within bf16 rounding of the hidden state.
  tqj.write_export(qat_model, tmp_path / "bf16.tqj", float_dtype="bfloat16")
  bf16 = PackedLlama.load(tmp_path / "bf16.tqj", InferenceSettings("exact"))
  assert bf16.params["embed"].dtype == jnp.bfloat16
  bf16_logits = np.asarray(bf16(tokens))
  assert np.linalg.norm(bf16_logits - got) / np.linalg.norm(got) < 1e-2
  # A base3 export is repacked to 2 bits at load: the same logits.
  tqj.write_export(qat_model, tmp_path / "b3.tqj", packing="base3")
  np.testing.assert_array_equal(
      PackedLlama.load(tmp_path / "b3.tqj", exact.settings)(tokens), got)


def test_untied_head_exports_and_runs(tmp_path):
  cfg = tiny_model_config("tequila")
  model = settle_codes(model_lib.Llama(cfg.replace(tie_embeddings=False),
                                      rngs=nnx.Rngs(4)))
  tqj.write_export(model, tmp_path / "u.tqj")
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 512, (1, 12)))
  want = np.asarray(model(tokens))
  lut = PackedLlama.load(tmp_path / "u.tqj", InferenceSettings("lut"))
  got = np.asarray(lut(tokens))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=_atol(want, cfg, 12))


def test_inference_settings_validate_and_open_any_location(qat_model,
                                                           tmp_path):
  """One frozen value of the four run-time choices; a bad one is named with
  the allowed ones; `inference.load` opens a .tqj as a PackedLlama run as
  the settings say, and refuses what is not a settings value."""
  default = InferenceSettings()
  assert (default.strategy, default.embed, default.alpha_dtype,
          default.kv_dtype) == ("auto", "float", "float32", "float32")
  assert hash(default) == hash(InferenceSettings("auto"))
  with pytest.raises(dataclasses.FrozenInstanceError):
    default.strategy = "lut"
  for field, bad, allowed in [
      ("strategy", "fast", inference.STRATEGIES),
      ("embed", "fp8", inference.EMBEDS),
      ("alpha_dtype", "bfloat16", inference.ALPHA_DTYPES),
      ("kv_dtype", "float16", inference.KV_DTYPES)]:
    with pytest.raises(ValueError, match=re.escape(
        f"{field} {bad!r}: choose one of {allowed}.")):
      InferenceSettings(**{field: bad})
  path = tmp_path / "m.tqj"
  tqj.write_export(qat_model, path, tokenizer=tokenizers.ByteTokenizer())
  with pytest.raises(TypeError, match="pass an InferenceSettings"):
    PackedLlama(tqj.read_export(path), "exact")
  settings = InferenceSettings("lut", "int8", "float16", "bfloat16")
  model, tok = inference.load(str(path), settings=settings)
  assert isinstance(model, PackedLlama) and model.settings is settings
  assert tok.encode("hi") == [104, 105]
  cache = model.init_cache(1, 8)
  assert isinstance(cache, inference.PackedKVCache)
  assert cache.k.dtype == jnp.uint16 and cache.dtype == jnp.bfloat16
  assert cache.k.shape == (qat_model.cfg.num_layers, 1,
                           qat_model.cfg.num_kv_heads, 8,
                           qat_model.cfg.head_dim)
  assert model.params["embed"]["w_t"].dtype == jnp.int8
  assert model.params["layers"][0]["qkv"]["alpha"].dtype == jnp.float16
  assert set(model.params["layers"][0]["qkv"]) == {"alpha", "c", "lut"}


def test_io_imports_no_inference():
  """Formats know no runtime: `inference` opens exports through `io`, never
  the way back (an import of the package counts, not only of a module)."""
  for path in (ROOT / "tequila_jax" / "io").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [f"{node.module}.{a.name}" for a in node.names]
               if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.startswith("tequila_jax.inference") for n in names), (
          path.name, node.lineno)


def test_dense_baseline_equals_float_llama(qat_model):
  cfg = qat_model.cfg.replace(quant=qat_model.cfg.quant.__class__("none"))
  float_model = model_lib.abstract_model(cfg)
  nnx.update(float_model, nnx.state(qat_model, nnx.Param))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 512, (2, 16)))
  want = np.asarray(float_model(tokens))
  dense = DenseLlama(float_model)
  np.testing.assert_allclose(dense(tokens), want, rtol=1e-5,
                             atol=_atol(want, cfg, 32))
  stepped, _ = decode_in_steps(dense, tokens, 10, 16)
  np.testing.assert_allclose(stepped, want, rtol=1e-4,
                             atol=_atol(want, cfg, 32))
  bf16 = np.asarray(DenseLlama(float_model, "bfloat16")(tokens))
  assert np.linalg.norm(bf16 - want) / np.linalg.norm(want) < 2e-2


def _kernel_case(rng, m, codes, groups):
  """`(x, alpha, c, float64 x @ Q + c, its bound)` for a kernel test on
  `codes [in, out]`: exact and lut are fp32 sums of the in + groups + 1
  terms x_i·Q_ij (lut scales each group's sum by α; its sparse34 table adds
  each pair's 8 terms first, the same count), in an order of their own."""
  shape = codes.shape
  alpha = rng.uniform(0.5, 2.0, (groups, shape[1])).astype(np.float32)
  c = rng.normal(size=shape[1]).astype(np.float32)
  x = rng.normal(size=(m, shape[0])).astype(np.float32)
  q = (codes.reshape(groups, -1, shape[1]) * alpha[:, None]).reshape(shape)
  want = x.astype(np.float64) @ q + c
  tol = sum_order_bound(np.abs(x) @ np.abs(q) + np.abs(c),
                        shape[0] + groups + 1)
  return x, alpha, c, want, tol


@pytest.mark.parametrize("m", [1, 3, 8, 13])
@pytest.mark.parametrize("shape, groups", [
    ((256, 37), 4), ((128, 96), 1), ((64, 5), 2),
    # Several `lut` blocks per group: G=256; per-channel 384 and 576 wide.
    ((512, 24), 2), ((384, 16), 1), ((576, 8), 1)])
def test_kernel_strategies_match_f32_reference(m, shape, groups):
  rng = np.random.default_rng(m)
  codes = rng.integers(-1, 2, shape).astype(np.int8)
  x, alpha, c, want, tol = _kernel_case(rng, m, codes, groups)
  packed = jnp.asarray(tqj.pack_2bit(codes))
  for strategy in ("exact", "lut", "int8"):
    got = np.asarray(kernels.ternary_linear(jnp.asarray(x), packed,
                                            jnp.asarray(alpha), jnp.asarray(c),
                                            strategy))
    if strategy == "int8":  # int8 activations: ~1e-2
      err = np.linalg.norm(got - want) / np.linalg.norm(want)
      assert err < 3e-2, (strategy, err)
    else:
      assert_within(got, want, tol, strategy)
  # The byte order PackedLlama holds for `lut`, made once.
  got = np.asarray(kernels.ternary_linear(
      jnp.asarray(x), None, jnp.asarray(alpha), jnp.asarray(c), "lut",
      lut=kernels.lut_layout(packed, groups)))
  assert_within(got, want, tol, "lut, held layout")
  held = kernels.ternary_linear(jnp.asarray(x), packed, jnp.asarray(alpha),
                                jnp.asarray(c), "int8",
                                kernels.int8_layout(jnp.asarray(codes), groups))
  np.testing.assert_array_equal(held, kernels.ternary_linear(
      jnp.asarray(x), packed, jnp.asarray(alpha), jnp.asarray(c), "int8"))
  _check_lean(x, alpha, c, codes, kernels.lut_layout(packed, groups), "2bit")


def _check_lean(x, alpha, c, codes, lut, packing):
  """`lut_codes` unpacks the held `lut` bytes to exactly the int8 kernel's
  codes, and `lean` from those bytes alone runs `lut` below 8 rows and
  `int8` from 8 (the same programs on the same codes: equal)."""
  groups = alpha.shape[0]
  want_codes = kernels.int8_layout(jnp.asarray(codes), groups)
  np.testing.assert_array_equal(
      jax.jit(kernels.lut_codes, static_argnums=(1, 2))(lut, groups, packing),
      want_codes)
  run = lambda strategy, **kw: kernels.ternary_linear(  # noqa: E731
      jnp.asarray(x), None, jnp.asarray(alpha), jnp.asarray(c), strategy,
      packing=packing, **kw)
  want = (run("lut", lut=lut) if x.shape[0] < 8 else
          run("int8", codes=want_codes))
  np.testing.assert_array_equal(run("lean", lut=lut), want)


def test_int8_dense_leaves_only_the_weights_rounding():
  """The int8 head quantizes activations as value + residual: with an
  outlier that makes one int8 term coarse (absmax 40x the rest), the result
  still equals x @ dequantized(W) to ~1e-4."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 64)).astype(np.float32)
  x[:, 5] = 40.0
  w = rng.normal(size=(96, 64)).astype(np.float32)
  w_t, scale = kernels.quantize_int8(jnp.asarray(w))
  want = x @ (np.asarray(w_t, np.float32) * np.asarray(scale)).T
  got = np.asarray(kernels.int8_dense(jnp.asarray(x), w_t, scale[:, 0]))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-4
  one = np.asarray(kernels.int8_dense(jnp.asarray(x[:1]), w_t, scale[:, 0]))
  np.testing.assert_allclose(one, got[:1], rtol=1e-6, atol=1e-6)


def test_exports_store_the_architecture_only_and_version_1_loads(
    qat_model, tmp_path, caplog):
  """Exports record no run-time settings; a version 1 file (which did:
  dtype, scan, remat, attention; and no checksums) loads to the same model,
  with a warning that it cannot be verified."""
  path = tmp_path / "m.tqj"
  tqj.write_export(qat_model, path)
  ex = tqj.read_export(path)
  other_run = qat_model.__class__(
      qat_model.cfg.replace(remat="full", scan_layers=False), rngs=nnx.Rngs(0))
  tqj.write_export(other_run, tmp_path / "r.tqj")
  assert tqj.read_export(tmp_path / "r.tqj").cfg == ex.cfg
  with safe_open(str(path), framework="numpy") as f:
    meta = f.metadata()
  assert meta["version"] == tqj.VERSION
  assert set(json.loads(meta["model"])) == model_lib.ARCH_FIELDS
  assert ex.cfg.arch == qat_model.cfg.arch
  assert ex.cfg.run == model_lib.RunSettings()  # defaults, not the writer's
  v1_model = {**json.loads(meta["model"]), "dtype": "float32",
              "scan_layers": False, "remat": "full", "attention": "xla"}
  # Older files lack the quantizer fields added since (learned λ, A8):
  # they load at their defaults.
  v1_model["quant"] = {k: v for k, v in v1_model["quant"].items()
                       if k not in ("lam_mode", "lam_std", "act_bits")}
  v1 = tmp_path / "v1.tqj"
  v1_meta = {k: v for k, v in meta.items()
             if k not in ("checksums", tqj.HEADER_CHECKSUM)}
  save_file(ex.tensors, str(v1), metadata={**v1_meta, "version": "1",
                                           "model": json.dumps(v1_model)})
  old = tqj.read_export(v1)
  assert "carries no checksums" in caplog.text
  assert old.cfg == ex.cfg
  for name in model_lib.PROJECTIONS:
    np.testing.assert_array_equal(old.quantized_kernel(name),
                                  ex.quantized_kernel(name))


def test_model_config_halves():
  cfg = model_lib.ModelConfig.from_dict(dict(
      vocab_size=64, hidden_size=32, ffn_size=64, num_layers=1, num_heads=2,
      num_kv_heads=1, head_dim=16, rope_scaling={"factor": 8.0,
                                                 "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 64},
      dtype="float32", remat="full"))
  assert cfg.hidden_size == 32 and cfg.dtype == "float32"  # either half
  assert cfg.run == model_lib.RunSettings(dtype="float32", remat="full")
  assert model_lib.Architecture.from_json(cfg.arch.to_json()) == cfg.arch
  again = cfg.replace(hidden_size=64, remat="none")
  assert again.arch.hidden_size == 64 and again.run.remat == "none"
  assert hash(again) != hash(cfg)  # static in jit
  with pytest.raises(ValueError, match="Unknown model config keys"):
    cfg.replace(hiden_size=3)
  with pytest.raises(AttributeError):
    cfg.no_such_field  # pylint: disable=pointless-statement


def test_bad_files_are_refused(qat_model, tmp_path):
  good = tmp_path / "m.tqj"
  tqj.write_export(qat_model, good)
  truncated = tmp_path / "t.tqj"
  truncated.write_bytes(good.read_bytes()[:5000])
  with pytest.raises(tqj.ExportError, match="truncated"):
    tqj.read_export(truncated)
  foreign = tmp_path / "f.safetensors"
  save_file({"x": np.zeros(3, np.float32)}, str(foreign))
  with pytest.raises(tqj.ExportError, match="not a tequila_jax export"):
    tqj.read_export(foreign)
  old = tmp_path / "old.tqj"
  ex = tqj.read_export(good)
  meta = {"format": "tequila_jax", "version": "0", "packing": "2bit",
          "model": json.dumps({}), "tokenizer": "{}"}
  save_file(ex.tensors, str(old), metadata=meta)
  with pytest.raises(tqj.ExportError, match="export version '0'.*reads "
                     "versions 1, 2, 3"):
    tqj.read_export(old)
  flipped = tmp_path / "flipped.tqj"
  raw = bytearray(good.read_bytes())
  raw[-3] ^= 0x40  # one bit of the last tensor's data
  flipped.write_bytes(bytes(raw))
  with pytest.raises(tqj.ExportError, match="corrupted: tensors.*checksums"):
    tqj.read_export(flipped)
  ex.tensors["layers.up_proj.alpha"][0, 0, 1] = np.nan
  with pytest.raises(tqj.ExportError, match="layers.up_proj.alpha holds 1 "
                     "non-finite"):
    tqj.save_export(ex, tmp_path / "nan.tqj")
  assert not (tmp_path / "nan.tqj").exists()
  float_cfg = qat_model.cfg.replace(quant=quant.QuantConfig("none"))
  with pytest.raises(tqj.ExportError, match="no multiplication-free"):
    tqj.export_tensors(model_lib.Llama(float_cfg, rngs=nnx.Rngs(0)))
  assert not list(tmp_path.glob(".*"))  # no temporaries left behind


def test_export_and_generate_clis(tmp_path, tiny_run):
  """The export, generate and inference_precision commands on the session's
  trained tiny run (read only), and their one-line errors."""
  out = run_cli("export", "--checkpoint", tiny_run, "--out",
                tmp_path / "m.tqj").stdout
  assert json.loads(out[:out.index("\nwrote")])["code_bits_per_weight"] == 2.0
  assert "bits per ternary weight" in out
  # sparse34 on a tequila run (codes not 3:4): one line, no file.
  bad = run_cli("export", "--checkpoint", tiny_run, "--out",
                tmp_path / "s.tqj", "--packing", "sparse34", check=False)
  assert bad.returncode == 2 and "are not 3:4" in bad.stderr.splitlines()[-1]
  assert "--packing 2bit or base3" in bad.stderr and "Traceback" not in bad.stderr
  assert not (tmp_path / "s.tqj").exists()
  gen = run_cli("generate", "--model", tmp_path / "m.tqj", "--prompt",
                "To be", "--max_new_tokens", "5")
  assert gen.stdout.startswith("To be") and "5 tokens" in gen.stderr
  assert "decode" in gen.stderr and "tokens/s" in gen.stderr
  gen = run_cli("generate", "--model", tmp_path / "m.tqj", "--prompt",
                "To be", "--max_new_tokens", "3", "--embed", "int8",
                "--alpha_dtype", "float16", "--kv_dtype", "bfloat16")
  assert gen.stdout.startswith("To be") and "3 tokens" in gen.stderr
  # Each run-time precision scored on the run's held-out windows.
  inference_precision.main(["--workdir", str(tiny_run), "--seq_len",
                            "64", "--max_windows", "4", "--out",
                            str(tmp_path / "precision")])
  rows = json.loads((tmp_path / "precision/results.json").read_text())
  assert [r["variant"] for r in rows] == list(inference_precision.VARIANTS)
  assert rows[0]["logits_rel_error"] == 0 and all(
      r["verdict"] in ("better", "worse", "inconclusive") for r in rows[1:])
  # --hf_out alone writes a Hugging Face LLaMA with biases, which exports
  # back to the same .tqj tensors.
  out = run_cli("export", "--checkpoint", tiny_run, "--hf_out",
                tmp_path / "hf").stdout
  assert "a Hugging Face LLaMA with biases" in out
  run_cli("export", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "b.tqj")
  a, b = tqj.read_export(tmp_path / "m.tqj"), tqj.read_export(tmp_path / "b.tqj")
  for name in a.tensors:
    np.testing.assert_array_equal(a.tensors[name], b.tensors[name], name)
  assert b.load_tokenizer().encode("hi") == [104, 105]
  gen = run_cli("generate", "--model", tmp_path / "hf", "--prompt", "To be",
                "--max_new_tokens", "3", "--strategy", "exact")
  assert gen.stdout.startswith("To be") and "3 tokens" in gen.stderr
  # Expected errors: one line, the cause then the fix, exit 2; --verbose
  # shows the traceback.
  too_many = ("generate", "--model", tmp_path / "m.tqj", "--prompt", "To be",
              "--max_new_tokens", "256")  # tiny: max_seq_len 256
  for args, want in [
      (too_many, "max_new_tokens=256: the model's context holds 256 tokens"),
      (("export", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "x"),
       "not found"),
      (("train", f"--config={ROOT}/configs/tiny.py",
        "--config.train.micro_batches=3", f"--workdir={tmp_path}/run"),
       "not divisible by train.micro_batches=3")]:
    bad = run_cli(*args, check=False)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and want in lines[-1], bad.stderr[-2000:]
    assert lines[-1].startswith("error: ") and "Traceback" not in bad.stderr
  verbose = run_cli(*too_many, "--verbose", check=False)
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_q8k_emulation_by_hand():
  x = np.zeros((1, 256), np.float32)
  x[0, :3] = [0.5, -2.0, 1.0]  # signed max -2: iscale = 63.5
  got = np.asarray(kernels.q8k_activations(jnp.asarray(x)))
  # iscale = -127 / -2 = 63.5: 0.5 -> round(31.75) = 32, -2 -> -127,
  # 1 -> round(63.5) = 64 (half to even); dequantized by 1 / 63.5.
  want = np.array([32, -127, 64]) * (2.0 / 127)
  np.testing.assert_allclose(got[0, :3], want, rtol=1e-6)
  assert not got[0, 3:].any()


def test_disk_full_reads_as_one_line(tmp_path):
  """ENOSPC while writing an export: one line that names it, and the
  atomic write leaves nothing behind."""
  import errno  # pylint: disable=g-import-not-at-top
  from tequila_jax import cli  # pylint: disable=g-import-not-at-top
  from tequila_jax.io.atomic import atomic_path  # pylint: disable=g-import-not-at-top
  with pytest.raises(OSError) as e:
    with atomic_path(tmp_path / "m.tqj") as tmp:
      tmp.write_bytes(b"partial")
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
  assert cli.message(e.value).startswith("disk full writing ")
  assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# sparse34: 3:4 codes (Sherry) at 1.25 bits/weight
# --------------------------------------------------------------------------

def random_34_codes(rng, shape) -> np.ndarray:
  """Random 3:4 codes `[..., in, out]`: per output, each block of 4 inputs
  holds one zero at a random position and random signs elsewhere."""
  *lead, d_in, d_out = shape
  codes = rng.choice(np.int8([-1, 1]), size=(*lead, d_in // 4, 4, d_out))
  zero = rng.integers(0, 4, (*lead, d_in // 4, 1, d_out))
  np.put_along_axis(codes, zero, 0, axis=-2)
  return codes.reshape(shape)


def test_sparse34_layout_holds_all_32_patterns():
  """Each of the 32 3:4 blocks (16 patterns, first nonzero +1, times a sign)
  round-trips; the layout is the documented one (tqj docstring): nibble n
  = z | r1 << 2 | r2 << 3 of block 2k in the low half of byte k, the sign
  of block 8t + b in bit b of sign byte t, after the in/8 nibble rows."""
  blocks = [tqj.SPARSE34_PATTERNS[n] * (1 - 2 * s)
            for s in range(2) for n in range(16)]
  assert len({tuple(b) for b in blocks}) == 32
  assert all(np.sum(b == 0) == 1 for b in blocks)
  codes = np.concatenate(blocks)[:, None].astype(np.int8)  # [128, 1]
  packed = tqj.pack_sparse34(codes)
  assert packed.shape == (128 // 8 + 128 // 32, 1)
  np.testing.assert_array_equal(tqj.unpack_sparse34(packed), codes)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(kernels.unpack_codes, static_argnames="packing")(
          jnp.asarray(packed), packing="sparse34")), codes)
  np.testing.assert_array_equal(
      packed[:16, 0], [n | (n + 1) << 4 for n in range(0, 16, 2)] * 2)
  np.testing.assert_array_equal(packed[16:, 0], [0, 0, 255, 255])
  # [0, 1, -1, 1]: zero at 0, second nonzero negative -> n = 0 | 1 << 2;
  # [0, -1, 1, -1]: the same pattern negated.
  one = np.asarray([0, 1, -1, 1] * 7 + [0, -1, 1, -1], np.int8)[:, None]
  got = tqj.pack_sparse34(one)
  assert got[0, 0] == 4 | 4 << 4 and got[4, 0] == 1 << 7
  # The kernels' pair table: entry i is the two blocks of byte i & 255
  # with sign bits i >> 8.
  pairs = kernels.SPARSE34_PAIRS
  for i in (0, 17, 255, 256 + 33, 512 + 200, 1023):
    two = np.concatenate([tqj.SPARSE34_PATTERNS[i & 15] * (1 - 2 * (i >> 8 & 1)),
                          tqj.SPARSE34_PATTERNS[i >> 4 & 15] * (1 - 2 * (i >> 9))])
    np.testing.assert_array_equal(pairs[i], two)


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse34_round_trips_bit_exactly(shape):
  codes = random_34_codes(np.random.default_rng(0), (2, *shape))
  packed = tqj.pack_sparse34(codes)
  assert packed.shape == (2, shape[0] * 5 // 32, shape[1])
  assert 8 * packed.size / codes.size == 1.25
  np.testing.assert_array_equal(tqj.unpack_sparse34(packed), codes)
  np.testing.assert_array_equal(np.asarray(kernels.unpack_codes(
      jnp.asarray(packed[1]), packing="sparse34")), codes[1])
  np.testing.assert_array_equal(tqj.not_sparse34(codes), [0, 0])
  codes[1, 4, 3] = 0 if codes[1, 4, 3] else 1  # a block with 2 (or 0) zeros
  np.testing.assert_array_equal(tqj.not_sparse34(codes), [0, 1])
  with pytest.raises(ValueError, match="1 blocks of 4 codes are not 3:4"):
    tqj.pack_sparse34(codes)
  with pytest.raises(ValueError, match="in % 32 == 0, got in=36"):
    tqj.pack_sparse34(codes[:, :36])


@pytest.mark.parametrize("m", [1, 13])  # one decode row; a batch (2bit: 4)
@pytest.mark.parametrize("shape, groups", [
    ((256, 37), 4), ((128, 96), 1), ((64, 5), 2), ((512, 24), 2),
    ((384, 16), 1), ((576, 8), 1)])
def test_sparse34_kernels_match_f32_reference(m, shape, groups):
  """Every strategy on sparse34 bytes: `exact` and `lut` within the sum's
  order of x @ Q + c (as for 2bit), `int8` within its activation rounding,
  `q8k` equal to its 2bit run (the same program after unpacking)."""
  rng = np.random.default_rng(m)
  codes = random_34_codes(rng, shape)
  x, alpha, c, want, tol = _kernel_case(rng, m, codes, groups)
  packed = jnp.asarray(tqj.pack_sparse34(codes))
  args = (jnp.asarray(x), packed, jnp.asarray(alpha), jnp.asarray(c))
  run = lambda strategy, **kw: np.asarray(kernels.ternary_linear(  # noqa: E731
      *args, strategy, packing="sparse34", **kw))
  for strategy in ("exact", "lut"):
    assert_within(run(strategy), want, tol, strategy)
  lut = kernels.lut34_layout(packed, groups)
  assert_within(run("lut", lut=lut), want, tol, "lut, held layout")
  _check_lean(x, alpha, c, codes, lut, "sparse34")
  got = run("int8")
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2
  two_bit = jnp.asarray(tqj.pack_2bit(codes))
  for strategy in ("int8", "q8k")[:1 + (shape[0] % 256 == 0)]:  # Q8_K: 256
    np.testing.assert_array_equal(run(strategy), kernels.ternary_linear(
        args[0], two_bit, *args[2:], strategy))
  with pytest.raises(ValueError, match="packing 'base3': the kernels read"):
    kernels.ternary_linear(*args, "exact", packing="base3")


def sparse34_model(method: str = "tequila", seed: int = 0):
  """A tiny model whose every projection quantizes to 3:4 codes: per output,
  in each block of 4 inputs one weight near 0 and three of |W| in [1, 2]
  (x 0.02), far from the threshold 0.5·mean|W| ~ 0.56 (x 0.02) in any
  summation order."""
  cfg = tiny_model_config(method)
  m = model_lib.Llama(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  state = nnx.state(m.layers, nnx.Param)
  pure = nnx.to_pure_dict(state)
  for name, group in model_lib.PROJECTIONS.items():
    w = pure[group][name]["kernel"]
    codes = random_34_codes(rng, w.shape)
    mag = np.where(codes == 0, 0.01, rng.uniform(1.0, 2.0, w.shape))
    pure[group][name]["kernel"] = jnp.asarray(0.02 * codes * mag + 0.02 * (
        codes == 0) * 0.01 * rng.choice([-1, 1], w.shape), jnp.float32)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(m.layers, state)
  return m


def test_sparse34_export_equals_qat_forward_and_2bit(tmp_path):
  """A model whose codes are 3:4 exports as sparse34 at 1.25 code bits per
  weight, with the 2bit export's codes, alpha and c; PackedLlama runs it in
  every strategy with the 2bit export's logits (exact and lut: the QAT
  forward's, to the bound of the 2bit test)."""
  model = sparse34_model()
  cfg = model.cfg
  report = tqj.write_export(model, tmp_path / "s.tqj", packing="sparse34")
  assert report["code_bits_per_weight"] == 1.25
  tqj.write_export(model, tmp_path / "b.tqj")
  sparse, two = tqj.read_export(tmp_path / "s.tqj"), tqj.read_export(
      tmp_path / "b.tqj")
  assert sparse.packing == "sparse34"
  for name in model_lib.PROJECTIONS:
    np.testing.assert_array_equal(sparse.codes(name), two.codes(name))
    assert not tqj.not_sparse34(sparse.codes(name)).any()
    for key in ("alpha", "c"):
      np.testing.assert_array_equal(sparse.tensors[f"layers.{name}.{key}"],
                                    two.tensors[f"layers.{name}.{key}"])
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 24)))
  want = np.asarray(model(tokens))
  atol = _atol(want, cfg, 48)
  exact = PackedLlama(sparse, InferenceSettings("exact"))
  got = np.asarray(exact(tokens))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
  np.testing.assert_array_equal(  # unpacked in-program: the same program
      got, PackedLlama(two, InferenceSettings("exact"))(tokens))
  lut = PackedLlama(sparse, InferenceSettings("lut"))
  stepped, _ = decode_in_steps(lut, tokens, 20, 32)
  np.testing.assert_allclose(stepped, want, rtol=1e-4, atol=atol)
  for strategy in ("int8", "auto", "lean"):  # (q8k: widths of 256, kernels)
    np.testing.assert_array_equal(
        PackedLlama(sparse, InferenceSettings(strategy))(tokens),
        PackedLlama(two, InferenceSettings(strategy))(tokens), strategy)
  # `lean` holds what `lut` holds and prefills as `auto` does, unpacking the
  # codes as the layers need them: its prefill's temporaries exceed auto's
  # by at most one layer's int8 codes (all layers' at once would be
  # `num_layers` times that).
  lean = PackedLlama(sparse, InferenceSettings("lean"))
  auto = PackedLlama(sparse, InferenceSettings("auto"))
  np.testing.assert_array_equal(lean(tokens), auto(tokens))
  assert lean.memory() == lut.memory()

  def prefill_temp(m):
    return m._decode.lower(  # pylint: disable=protected-access
        m.params, m.inv_freq, tokens, m.init_cache(2, 256), attend_len=256,
        last_only=True).compile().memory_analysis().temp_size_in_bytes
  one_layer = sum(int(np.prod(sparse.codes(p).shape[1:]))
                  for p in model_lib.PROJECTIONS)
  assert cfg.num_layers >= 2
  assert prefill_temp(lean) <= prefill_temp(auto) + one_layer
  # lut holds the sparse34 bytes (1.25 bits) + fp32 alpha per 64 + c.
  held = lut.memory()
  extra = held["bits_per_ternary_weight"] - 1.25
  assert 0.5 + 32 / 256 < extra < 0.5 + 32 / 128, held
  assert held["bits_per_ternary_weight_all_held"] == held[
      "bits_per_ternary_weight"]


def test_sparse34_refuses_codes_that_are_not_3_of_4(qat_model, tmp_path):
  """Codes with a block of 0 or >= 2 zeros (a kept weight exactly 0, sign(0)
  = 0) are refused in one line naming the layer and the count, suggesting
  the packings that hold them; nothing is written. 2bit and base3 hold
  such a model exactly."""
  model = sparse34_model()
  state = nnx.state(model.layers, nnx.Param)
  pure = nnx.to_pure_dict(state)
  kernel = np.array(pure["mlp"]["up_proj"]["kernel"])
  layer1 = kernel[1]
  i = int(np.flatnonzero(np.abs(layer1[:4, 5]) > 0.01)[0])
  kernel[1, i, 5] = 0.0  # a kept weight exactly 0: two zeros in its block
  pure["mlp"]["up_proj"]["kernel"] = jnp.asarray(kernel)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model.layers, state)
  blocks = 128 * 256 // 4
  with pytest.raises(tqj.ExportError, match=re.escape(
      f"layer 1 up_proj: 1 of {blocks} blocks of 4 codes are not 3:4 "
      "(exactly one zero) (method 'tequila' does not make 3:4 codes; sherry "
      "does), 1 in all layers; sparse34 cannot hold them: use "
      "--packing 2bit or base3, which hold any codes exactly.")) as e:
    tqj.write_export(model, tmp_path / "x.tqj", packing="sparse34")
  assert "\n" not in str(e.value)
  assert not list(tmp_path.iterdir())
  for packing in ("2bit", "base3"):
    tqj.write_export(model, tmp_path / f"{packing}.tqj", packing=packing)
    assert (tqj.read_export(tmp_path / f"{packing}.tqj").codes("up_proj")[
        1, :4, 5] == 0).sum() == 2
  # A method that does not make 3:4 codes is named as the reason.
  with pytest.raises(tqj.ExportError, match=r"layer 0 q_proj: \d+ of 4096 "
                     r"blocks .*\(method 'tequila' does not make 3:4 codes; "
                     r"sherry does\)"):
    tqj.export_tensors(qat_model, "sparse34")


def test_sherry_model_exports_sparse34_and_runs_as_its_qat_forward(tmp_path):
  """A sherry model (3:4 by construction) exports as sparse34 with its 2bit
  export's codes, runs as its QAT forward (exact and lut, the 2bit test's
  bound); a kept weight exactly 0 (sign(0) = 0: two zeros) is refused. The
  CLI on a trained sherry run: the slow test below."""
  cfg = tiny_model_config("sherry")
  model = model_lib.Llama(cfg, rngs=nnx.Rngs(5))
  tqj.write_export(model, tmp_path / "s.tqj", packing="sparse34")
  sparse = tqj.read_export(tmp_path / "s.tqj")
  two = tqj.build_export(model)
  for name in model_lib.PROJECTIONS:
    np.testing.assert_array_equal(sparse.codes(name), two.codes(name))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 24)))
  want = np.asarray(model(tokens))
  atol = _atol(want, cfg, 48)
  np.testing.assert_allclose(PackedLlama(sparse, InferenceSettings("exact"))(
      tokens), want, rtol=1e-5, atol=atol)
  stepped, _ = decode_in_steps(PackedLlama(sparse, InferenceSettings("lut")),
                               tokens, 20, 32)
  np.testing.assert_allclose(stepped, want, rtol=1e-4, atol=atol)
  state = nnx.state(model.layers, nnx.Param)
  pure = nnx.to_pure_dict(state)
  kernel = np.array(pure["attn"]["o_proj"]["kernel"])
  kernel[0, :2, 7] = 0.0  # one pruned, one kept: sign(0) = 0, two zeros
  pure["attn"]["o_proj"]["kernel"] = jnp.asarray(kernel)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model.layers, state)
  with pytest.raises(tqj.ExportError, match=re.escape(
      "layer 0 o_proj: 1 of 4096 blocks of 4 codes are not 3:4 (exactly one "
      "zero), 1 in all layers")):
    tqj.export_tensors(model, "sparse34")


@pytest.mark.slow
def test_sherry_run_exports_sparse34_and_generates_from_the_cli(tmp_path):
  """A trained `tiny.py:sherry` run through `export --packing sparse34` (1.25
  code bits per weight) and `generate`. Slow: the default suite covers the
  library path in test_sherry_model_exports_sparse34_and_runs_as_its_qat_forward
  and the export/generate CLIs (and their sparse34 flag) in
  test_export_and_generate_clis."""
  config = config_lib.tiny("sherry")
  config.data.cache_dir = str(tmp_path / "corpora")
  config.train.update(steps=2, async_checkpoints=False)
  train.run(config, tmp_path / "run", devices=jax.devices()[:1])
  out = run_cli("export", "--checkpoint", tmp_path / "run", "--out",
                tmp_path / "m.tqj", "--packing", "sparse34").stdout
  assert json.loads(out[:out.index("\nwrote")])["code_bits_per_weight"] == 1.25
  gen = run_cli("generate", "--model", tmp_path / "m.tqj", "--prompt",
                "To be", "--max_new_tokens", "3")
  assert gen.stdout.startswith("To be") and "3 tokens" in gen.stderr
