"""One tokenizer interface: tiktoken (Llama-3), tokenizer.json and GGUF."""

import json

import pytest

from tequila_jax.io import assets, locations, tokenizers


def test_llama3_tiktoken():
  tok = tokenizers.from_file(assets.fetch("llama3_tokenizer"))
  ids = tok.encode("The quick brown fox jumps over the lazy dog.")
  assert ids == [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13]
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (128000, 128001, 128256)
  assert min(tok.special_tokens.values()) == 128000
  assert tok.special_tokens["<|eot_id|>"] == 128009
  assert tok.encode("hi", bos=True, eos=True) == [128000, 6151, 128001]
  text = "Ünïcödé  text\n\n with 12345 digits"
  assert tok.decode(tok.encode(text)) == text
  # Special-token text in ordinary input is not turned into a control token.
  assert 128000 not in tok.encode("<|begin_of_text|>")


def test_tokenizer_json_round_trip(tmp_path):
  gguf_tok = locations.load_tokenizer("asset:smollm2_gguf")
  gguf_tok._tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}))
  tok = tokenizers.from_file(tmp_path)
  text = "O, that this too too solid flesh would melt 42"
  assert tok.encode(text) == gguf_tok.encode(text)
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.encode_batch(["a b", "c"], eos=True) == [
      gguf_tok.encode("a b") + [2], gguf_tok.encode("c") + [2]]


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
    tokenizers.from_file(tmp_path)
  (tmp_path / "vocab.txt").write_text("x")
  with pytest.raises(ValueError, match="unknown tokenizer format"):
    tokenizers.from_file(tmp_path / "vocab.txt")


def test_byte_tokenizer():
  tok = tokenizers.from_file("bytes")
  assert tok.encode("hé", bos=True, eos=True) == [256, 104, 195, 169, 257]
  assert tok.decode(tok.encode("hé", bos=True)) == "hé"
