"""Hugging Face checkpoints: our LLaMA equals transformers' on the same weights."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tequila_jax import config_lib
from tequila_jax import model as model_lib
from tequila_jax.inference import InferenceSettings, PackedLlama
from tequila_jax.io import hf, load, tqj
from tequila_jax.quant import QuantConfig
from tequila_jax.train import build
from tests.cli import run_cli
from tests.conftest import tiny_model_config
from tests.reference import decode_in_steps
from tests.tolerances import (bf16_mean_ambiguous, chain_atol, llama_depth,
                              llama_k, settle_codes)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        # small so that llama3 scaling changes frequencies inside the test length
        "original_max_position_embeddings": 64}
FLOAT = dict(quant=QuantConfig("none"), dtype="float32")


def _atol(want, cfg, tokens):
  """Two fp32 forwards that may order their sums differently (torch,
  another program or processor): tests/tolerances.py."""
  return chain_atol(want, llama_k(cfg, tokens), llama_depth(cfg.num_layers))


def _make_hf(path, tie=True, torch_dtype=torch.float32, seed=0, **kw):
  fields = dict(
      vocab_size=512, hidden_size=128, intermediate_size=256,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=32, rope_parameters=dict(ROPE), max_position_embeddings=256,
      tie_word_embeddings=tie, rms_norm_eps=1e-5)
  cfg = transformers.LlamaConfig(**{**fields, **kw})
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # norms away from 1 so that their loading is tested
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  model.to(torch_dtype).save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "tiny"
  _make_hf(path)
  return path


def _torch_logits(path, tokens):
  model = transformers.LlamaForCausalLM.from_pretrained(
      path, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.as_tensor(np.array(tokens))).logits.numpy()


def _tokens(batch=2, length=100, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 512, (batch, length)))


def test_logits_match_transformers(hf_dir):
  model = hf.load_hf(hf_dir, **FLOAT)
  assert model.cfg.rope_scaling and model.cfg.tie_embeddings
  tokens = _tokens()
  ours = np.asarray(model(tokens))
  ref = _torch_logits(hf_dir, tokens)
  np.testing.assert_allclose(ours, ref, rtol=1e-4,
                             atol=_atol(ref, model.cfg, tokens.size))
  assert np.abs(ref).max() > 0.1  # not a vacuous comparison


def test_kv_cache_decode_equals_full_forward(hf_dir):
  model = hf.load_hf(hf_dir, **FLOAT)
  tokens = _tokens(length=20)
  full = np.asarray(model(tokens))
  stepped, cache = decode_in_steps(model, tokens, 12, 32)
  np.testing.assert_allclose(stepped, full, rtol=1e-5,
                             atol=_atol(full, model.cfg, tokens.size))
  assert int(cache.length) == 20


def test_scan_unrolled_and_remat_agree(hf_dir):
  tokens = _tokens(length=16)
  model = hf.load_hf(hf_dir, **FLOAT)
  base = np.asarray(model(tokens))
  for kw in (dict(scan_layers=False), dict(remat="full")):
    np.testing.assert_allclose(hf.load_hf(hf_dir, **FLOAT, **kw)(tokens),
                               base, rtol=1e-6,
                               atol=_atol(base, model.cfg, tokens.size))


def test_hub_schema_config(hf_dir, tmp_path):
  hub = tmp_path / "hub"
  shutil.copytree(hf_dir, hub)
  cfg = json.loads((hub / "config.json").read_text())
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  cfg["rope_scaling"] = rope
  cfg["torch_dtype"] = cfg.pop("dtype")
  (hub / "config.json").write_text(json.dumps(cfg))
  a = hf.load_hf(hf_dir, **FLOAT)
  b = hf.load_hf(hub, **FLOAT)
  assert a.cfg == b.cfg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_bit_exact(tmp_path, dtype):
  src = tmp_path / "src"
  _make_hf(src, tie=False, torch_dtype=getattr(torch, dtype))
  model = hf.load_hf(src, **FLOAT)
  assert not model.cfg.tie_embeddings
  out = hf.save_hf(model, tmp_path / "out", dtype=dtype)
  a, b = hf.read_safetensors(src), hf.read_safetensors(out)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype
    np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8))
  # transformers reads what we wrote and agrees with the source.
  tokens = _tokens(length=10)
  np.testing.assert_allclose(_torch_logits(out, tokens),
                             _torch_logits(src, tokens), atol=1e-6)


def test_sharded_checkpoint(hf_dir, tmp_path):
  model = hf.load_hf(hf_dir, **FLOAT)
  out = hf.save_hf(model, tmp_path / "sharded", max_shard_bytes=200_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  tokens = _tokens(length=8)
  np.testing.assert_array_equal(hf.load_hf(out, **FLOAT)(tokens),
                                model(tokens))
  # transformers' sharded format reads too.
  hf_sharded = tmp_path / "hf_sharded"
  transformers.LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(
      hf_sharded, max_shard_size="200KB")
  assert (hf_sharded / "model.safetensors.index.json").exists()
  np.testing.assert_array_equal(hf.load_hf(hf_sharded, **FLOAT)(tokens),
                                model(tokens))


def test_errors_name_the_problem(hf_dir, tmp_path):
  with pytest.raises(hf.CheckpointError, match="config.json not found"):
    hf.load_hf(tmp_path)
  bad = tmp_path / "bad"
  shutil.copytree(hf_dir, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["intermediate_size"] = 384
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match=r"tensor model\.layers\.0\.mlp\."
                     r"\w+_proj\.weight has shape \(\d+, \d+\) but the config "
                     r"implies \(\d+, \d+\)"):
    hf.load_hf(bad)
  cfg["intermediate_size"], cfg["num_hidden_layers"] = 256, 3
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match="lacks 9 tensor"):
    hf.load_hf(bad)
  cfg["num_hidden_layers"], cfg["tie_word_embeddings"] = 2, False
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match="lm_head.weight"):
    hf.load_hf(bad)
  (bad / "model.safetensors").unlink()
  with pytest.raises(hf.CheckpointError, match="neither model.safetensors"):
    hf.load_hf(bad)
  with pytest.raises(hf.CheckpointError, match="rope type 'yarn'"):
    hf.config_from_hf({**cfg, "rope_parameters": {"rope_type": "yarn",
                                                     "rope_theta": 1.0}})
  with pytest.raises(FileExistsError):
    hf.save_hf(hf.load_hf(hf_dir), hf_dir)
  assert not list(tmp_path.glob(".*"))  # no half-written temporaries


def test_ternary_model_loads_with_quant_config(hf_dir):
  model = hf.load_hf(hf_dir, quant=QuantConfig("tequila", group_size=32))
  st = model.layers.attn.q_proj.kernel[...]
  assert st.shape == (2, 128, 128)
  logits = model(_tokens(length=8))
  assert logits.shape == (2, 8, 512) and np.isfinite(logits).all()


def test_official_checkpoint_converts_to_the_official_codes(tmp_path):
  """A checkpoint as the official Tequila run saves it (bf16 weights, one
  extra [PAD] token in the vocabulary) exports with exactly the codes and
  scales the official `ultraquantv2` computes (bf16 statistics)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tests.reference import official_ultraquantv2_stats_bf16  # pylint: disable=g-import-not-at-top
  path = tmp_path / "official"
  model = _make_hf(path, torch_dtype=torch.bfloat16, hidden_size=256,
                   vocab_size=513)
  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, "t0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  assert tok.add_special_tokens(["[PAD]"]) == 1 and tok.token_to_id("[PAD]") == 512
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
  out = tmp_path / "m.tqj"
  run_cli("export", "--checkpoint", path, "--out", out,
          "--quant.method=tequila", "--quant.group_size=128",
          "--quant.lam=1e-3", "--quant.stat_dtype=bfloat16")
  ex = tqj.read_export(out)
  assert ex.cfg.vocab_size == 513 and ex.cfg.quant.stat_dtype == "bfloat16"
  assert ex.load_tokenizer().encode("t5 t7") == [5, 7]
  sd = model.state_dict()
  for name, group in model_lib.PROJECTIONS.items():
    hf_name = "self_attn" if group == "attn" else "mlp"
    for layer in range(2):
      w = sd[f"model.layers.{layer}.{hf_name}.{name}.weight"].float().numpy()
      codes, alpha, c = official_ultraquantv2_stats_bf16(w, 128, 1e-3)
      # Groups whose mean|W| rounds to one bf16 value in any summation order
      # (tests/tolerances.py) have exact codes and scales; an ambiguous group
      # may round either way on another processor, so it is left out.
      amb = bf16_mean_ambiguous(w.reshape(-1, 128)).reshape(w.shape[0], -1)
      assert amb.mean() < 0.05, (name, amb.mean())
      sure = ~np.repeat(amb, 128, axis=1)
      np.testing.assert_array_equal(ex.codes(name)[layer][sure.T],
                                    codes.T[sure.T])
      np.testing.assert_array_equal(
          ex.tensors[f"layers.{name}.alpha"][layer][~amb.T], alpha.T[~amb.T])
      bound = 1e-3 * np.sum(np.abs(w) * (codes == 0), -1) * 2.0**-8
      assert np.all(np.abs(ex.tensors[f"layers.{name}.c"][layer] - c) <= bound)
  bad = run_cli("export", "--checkpoint", path, "--out", tmp_path / "x.tqj",
                "--quant.method=ternary", check=False)
  assert bad.returncode != 0 and "--quant: Unknown quant method" in bad.stderr
  missing = run_cli("export", "--checkpoint", path, "--out",
                    tmp_path / "x.tqj", check=False)
  assert "--quant.method is required" in missing.stderr
  assert not (tmp_path / "x.tqj").exists()


def test_pretrained_init_must_fit_the_config(hf_dir):
  """A training config whose shapes differ from its init.checkpoint is
  refused, naming the fields; fields that change no shape are allowed."""
  config = config_lib.tiny("tequila")
  config.init.checkpoint = str(hf_dir)
  cfg = config_lib.to_model_config(config.model)
  params = build.pretrained_params(config, cfg)
  np.testing.assert_array_equal(
      params["embed"]["embedding"],
      np.asarray(hf.load_hf(hf_dir).embed.embedding[...]))
  build.pretrained_params(config, cfg.replace(rms_eps=1e-6))  # no shape
  with pytest.raises(ValueError, match=r"does not fit config.model: "
                     r"ffn_size \(checkpoint 256, config 512\)"):
    build.pretrained_params(config, cfg.replace(ffn_size=512))


def _ternary_model(tie=True, quant=QuantConfig("tequila", group_size=64,
                                               lam=0.05)):
  cfg = tiny_model_config("tequila").replace(quant=quant, tie_embeddings=tie)
  m = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(m, nnx.Param)  # off init, so that C(W) is not tiny
  nnx.update(m, jax.tree.map(lambda a: a + 0.02 * jax.random.normal(
      jax.random.key(1), a.shape), state))
  return settle_codes(m)  # codes free of summation order (tests/tolerances)


@pytest.mark.parametrize("tie, quant", [
    (True, QuantConfig("tequila", group_size=64, lam=0.05)),
    (False, QuantConfig("tequila", group_size=64, lam=0.05)),
    (True, QuantConfig("sherry", group_size=64))],
    ids=["tequila-tied", "tequila-untied", "sherry"])
def test_ternary_hf_export_runs_in_transformers_and_converts_back(tmp_path, tie,
                                                                  quant):
  model = _ternary_model(tie, quant)
  export = tqj.build_export(model)
  out = hf.save_ternary_hf(export, tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["attention_bias"] and config["mlp_bias"]
  tokens = _tokens(2, 40)
  want = np.asarray(model(tokens))  # our QAT forward: x·Q + C(W)
  got = _torch_logits(out, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=_atol(want, model.cfg, tokens.size))
  # Back: codes = sign(Q), α = |Q| per group, c = the bias, exactly.
  back = hf.read_ternary_hf(out)
  for name in model_lib.PROJECTIONS:
    np.testing.assert_array_equal(back.codes(name), export.codes(name))
    np.testing.assert_array_equal(back.quantized_kernel(name),
                                  export.quantized_kernel(name))
    np.testing.assert_array_equal(back.tensors[f"layers.{name}.c"],
                                  export.tensors[f"layers.{name}.c"])
  assert back.cfg.arch == export.cfg.arch
  packed = PackedLlama(load.read_inference_export(str(out)),
                       InferenceSettings("exact"))
  np.testing.assert_allclose(np.asarray(packed(tokens)), want, rtol=1e-5,
                             atol=_atol(want, model.cfg, tokens.size))


def test_ternary_hf_in_bfloat16_keeps_the_codes(tmp_path):
  model = _ternary_model()
  export = tqj.build_export(model)
  out = hf.save_ternary_hf(export, tmp_path / "hf", dtype="bfloat16")
  back = hf.read_ternary_hf(out)
  for name in model_lib.PROJECTIONS:
    np.testing.assert_array_equal(back.codes(name), export.codes(name))
    alpha = export.tensors[f"layers.{name}.alpha"]
    np.testing.assert_array_equal(  # α rounded to bf16 once, per group
        back.tensors[f"layers.{name}.alpha"][alpha > 0],
        alpha.astype(ml_dtypes.bfloat16).astype(np.float32)[alpha > 0])


def test_ternary_hf_refusals(tmp_path):
  out = hf.save_ternary_hf(tqj.build_export(_ternary_model()), tmp_path / "hf")
  with pytest.raises(hf.CheckpointError, match="inference model"):
    load.load_model(str(out))
  with pytest.raises(hf.CheckpointError, match="not ternary with groups of 128"):
    hf.read_ternary_hf(out, QuantConfig("tequila", group_size=128))
  config = json.loads((out / "config.json").read_text())
  del config[hf.TERNARY_KEY]
  (out / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match="--quant.group_size"):
    hf.read_ternary_hf(out)
  assert hf.read_ternary_hf(out, QuantConfig("tequila", group_size=64)).cfg
  with pytest.raises(FileExistsError):
    hf.save_ternary_hf(tqj.build_export(_ternary_model()), out)


def test_sources_without_quantization_load_as_float(hf_dir):
  assert load.load_model(str(hf_dir)).cfg.quant.describe() == "none (float)"
  quant = QuantConfig("tequila", group_size=32, lam=1e-3)
  model = load.load_model(str(hf_dir), quant=quant)
  assert model.cfg.quant.describe() == "tequila per_group G=32 λ=0.001"
