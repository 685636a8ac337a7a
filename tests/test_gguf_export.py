"""GGUF export: TQ2_0 codes + fp16 block scales + bias tensors, read back."""

import json

import gguf
import numpy as np
import pytest
from flax import nnx

from tequila_jax import model as model_lib
from tequila_jax.io import gguf as gguf_lib
from tequila_jax.io import locations, tokenizers, tqj
from tequila_jax.quant import QuantConfig
from tests.conftest import tiny_model_config


def _export(tmp_path, quant, hidden=256):
  cfg = tiny_model_config("tequila").replace(
      hidden_size=hidden, ffn_size=512, num_heads=4, num_kv_heads=2,
      head_dim=64, vocab_size=49152, quant=quant)
  m = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  path = tmp_path / "m.tqj"
  tqj.write_export(m, path, tokenizer=locations.load_tokenizer("asset:smollm2_gguf"))
  return tqj.read_export(path)


@pytest.mark.parametrize("ttype", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("quant", [
    QuantConfig("tequila", "per_channel", lam=0.05),
    QuantConfig("tequila", "per_group", 256, lam=0.05),
    QuantConfig("sherry", "per_group", 256)], ids=["channel", "g256", "sherry"])
def test_ternary_gguf_round_trip(tmp_path, quant, ttype):
  ex = _export(tmp_path, quant)
  errors = gguf_lib.write_gguf(ex, tmp_path / "m.gguf", ternary_type=ttype)
  assert errors["refit_rel_error"] == 0 and errors["fp16_scale_rel_error"] < 1e-3
  reader = _check_tensors(ex, tmp_path / "m.gguf",
                          getattr(gguf.GGMLQuantizationType, ttype.upper()))
  meta = gguf_lib.metadata(reader)
  assert meta["llama.block_count"] == ex.cfg.num_layers
  assert meta["general.file_type"] == getattr(gguf.LlamaFileType,
                                              f"MOSTLY_{ttype.upper()}")
  assert len(gguf_lib.gguf_array(reader, "tokenizer.ggml.tokens")) == 49152


@pytest.mark.parametrize("quant,hidden", [
    (QuantConfig("tequila", "per_group", 128, lam=0.05), 256),
    (QuantConfig("tequila", "per_group", 64, lam=0.05), 576)],
    ids=["g128", "smollm2-width"])
def test_q4_0_holds_groups_and_widths_tq2_0_cannot(tmp_path, quant, hidden):
  ex = _export(tmp_path, quant, hidden=hidden)
  errors = gguf_lib.write_gguf(ex, tmp_path / "m.gguf")
  assert set(errors["tensor_types"]) == {"q4_0"}
  assert errors["refit_rel_error"] == 0
  reader = _check_tensors(ex, tmp_path / "m.gguf",
                          gguf.GGMLQuantizationType.Q4_0)
  assert gguf_lib.BITS["q4_0"] == 4.5
  assert gguf_lib.metadata(reader)["general.file_type"] == (
      gguf.LlamaFileType.MOSTLY_Q4_0)


# Strings that tokenizers split differently: contractions, digit runs,
# whitespace runs in code, JSON punctuation, unicode and emoji.
TRICKY = [
    "I'm sure you'll see they'd've LOVED it", "3.14159 and 1234567890",
    "def f(x):\n    return  x  *  2\n\n\n", '{"a": [1, 2], "b": null}',
    "naïve café — Zürich, 東京, Москва", "emoji 🤖🎉 and 👩‍👩‍👧",
    "tabs\there\t\tand  double  spaces   ", "<|im_start|>user\nhi<|im_end|>",
    "e-mail: a.b@c.org, URL https://x.y/z?q=1&r=2", "  leading spaces",
]


def test_gguf_carries_the_source_tokenizer(tmp_path):
  """The export's GGUF holds the source GGUF's tokenizer keys (llama.cpp's
  pre-tokenizer type, token types, BOS policy, special ids, chat template)
  and the vocabulary read back tokenizes as the source does."""
  ex = _export(tmp_path, QuantConfig("tequila", "per_channel", lam=0.05))
  gguf_lib.write_gguf(ex, tmp_path / "m.gguf")
  source = gguf.GGUFReader(str(locations.resolve("asset:smollm2_gguf")))
  ours = gguf.GGUFReader(str(tmp_path / "m.gguf"))
  for key in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.token_type",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.padding_token_id",
              "tokenizer.ggml.unknown_token_id", "tokenizer.chat_template"):
    assert (gguf_lib.gguf_array(ours, key) ==
            gguf_lib.gguf_array(source, key)), key
  want = locations.load_tokenizer("asset:smollm2_gguf")
  got = gguf_lib.read_tokenizer(ours)
  assert got.encode_batch(TRICKY) == want.encode_batch(TRICKY)
  # The same settings survive tokenizer_config.json (the HF export's).
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "tokenizer.json").write_text(got.to_json())
  (tmp_path / "hf" / "tokenizer_config.json").write_text(
      json.dumps(got.hf_config()))
  back = locations.load_tokenizer(str(tmp_path / "hf"))
  assert back.settings == want.settings and set(want.settings) == set(
      back.SETTINGS)
  assert back.encode_batch(TRICKY) == want.encode_batch(TRICKY)


def test_pre_tokenizers_llama_cpp_lacks_are_refused():
  from tokenizers import Tokenizer as Raw, models, pre_tokenizers
  raw = Raw(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = tokenizers.HFTokenizer(raw)
  with pytest.raises(gguf_lib.GGUFExportError, match="llama.cpp would split"):
    gguf_lib.llama_cpp_pre_type(tok)


def _check_tensors(ex, path, qtype):
  """ggml's dequantization of every projection equals codes x fp16(α), and
  its bias tensor equals c (Q/K rows in llama.cpp's order)."""
  reader = gguf.GGUFReader(str(path))
  tensors = {t.name: t for t in reader.tensors}
  for name, gname in gguf_lib.GGUF_NAMES.items():
    heads = {"q_proj": 4, "k_proj": 2}.get(name)
    for layer in range(ex.cfg.num_layers):
      t = tensors[f"blk.{layer}.{gname}.weight"]
      assert t.tensor_type == qtype
      rows = gguf.quants.dequantize(t.data, t.tensor_type)
      bias = np.asarray(tensors[f"blk.{layer}.{gname}.bias"].data)
      if heads:
        rows, bias = gguf_lib._unpermute(rows, heads), gguf_lib._unpermute(bias, heads)
      alpha16 = ex.tensors[f"layers.{name}.alpha"][layer].astype(
          np.float16).astype(np.float32)
      codes = ex.codes(name)[layer]
      want = (codes.reshape(alpha16.shape[0], -1, codes.shape[1])
              * alpha16[:, None]).reshape(codes.shape).T
      np.testing.assert_array_equal(rows, want)  # -α stays -α
      np.testing.assert_array_equal(bias, ex.tensors[f"layers.{name}.c"][layer])
  return reader


def test_refused_layouts_and_refit(tmp_path):
  ex = _export(tmp_path, QuantConfig("tequila", "per_group", 64))
  errors = gguf_lib.write_gguf(ex, tmp_path / "x.gguf", refit_scales=True)
  assert set(errors["tensor_types"]) == {"tq2_0"}  # forced, scales fitted
  assert 0 < errors["refit_rel_error"] < 0.5
  odd = _export(tmp_path, QuantConfig("tequila", "per_channel"), hidden=208)
  with pytest.raises(gguf_lib.GGUFExportError, match="multiple of 32"):
    gguf_lib.write_gguf(odd, tmp_path / "y.gguf")
  assert not (tmp_path / "y.gguf").exists()
  assert not list(tmp_path.glob(".y.gguf*"))


@pytest.mark.parametrize("ttype", gguf_lib.TYPES)
def test_gguf_quantizer_gives_back_our_codes_and_scales(ttype):
  """write_gguf lets gguf.quants pack codes * d (d rounded to fp16): its
  max-abs quantizer must return exactly those codes and scales, all-zero
  blocks and scales over many octaves included."""
  rng = np.random.default_rng(0)
  codes = rng.integers(-1, 2, (16, 1024)).astype(np.int8)
  codes[0, :256] = 0
  codes[3, 512:768] = 0
  d = rng.lognormal(-4, 2, (16, 4)).astype(np.float16).astype(np.float32)
  values = codes * np.repeat(d, 256, axis=1)
  qtype = getattr(gguf.GGMLQuantizationType, ttype.upper())
  back = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
  np.testing.assert_array_equal(back, values)
  np.testing.assert_array_equal(np.sign(back), codes)


def test_llama3_rope_and_head_dim_reach_the_gguf(tmp_path):
  """rope_freqs.weight as llama.cpp's converter defines it (per frequency:
  1 above the high-frequency wavelength, `factor` below the low one, smooth
  in between), and head_dim != hidden / heads written as key/value length."""
  scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}
  cfg = tiny_model_config("tequila").replace(
      hidden_size=512, ffn_size=512, num_heads=8, num_kv_heads=1, head_dim=32,
      vocab_size=49152, tie_embeddings=False, rope_theta=500000.0,
      rope_scaling=tuple(sorted(scaling.items())),
      quant=QuantConfig("tequila", "per_channel", lam=0.05))
  m = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  tqj.write_export(m, tmp_path / "m.tqj",
                   tokenizer=locations.load_tokenizer("asset:smollm2_gguf"))
  gguf_lib.write_gguf(tqj.read_export(tmp_path / "m.tqj"), tmp_path / "m.gguf")
  reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
  meta = gguf_lib.metadata(reader)
  assert meta["llama.attention.key_length"] == 32
  assert meta["llama.attention.value_length"] == 32
  got = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
  freqs = 1.0 / 500000.0 ** (np.arange(0, 32, 2) / 32)
  old, low, high = 64, 1.0, 4.0
  want = []
  for f in freqs:
    wavelen = 2 * np.pi / f
    if wavelen < old / high:
      want.append(1.0)
    elif wavelen > old / low:
      want.append(32.0)
    else:
      smooth = (old / wavelen - low) / (high - low)
      want.append(1 / ((1 - smooth) / 32.0 + smooth))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert 1.0 in want and 32.0 in want and len(set(want)) > 2  # all 3 regimes
  back = gguf_lib.config_from_gguf(reader)
  for field in ("head_dim", "num_kv_heads", "rope_scaling", "rope_theta",
                "tie_embeddings"):
    assert getattr(back, field) == getattr(cfg, field), field
