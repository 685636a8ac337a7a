"""One tokenizer interface over `tokenizers` (tokenizer.json), tiktoken
(Llama-3's `tokenizer.model`) and raw bytes. A GGUF file's vocabulary is
read by `tequila_jax.io.gguf`; `tequila_jax.io.locations.load_tokenizer` opens
any of them."""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Sequence

import tiktoken
import tiktoken.load
from tokenizers import Tokenizer as RawTokenizer

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
    "<|python_tag|>", "<|image|>"]
LLAMA3_NUM_SPECIALS = 256


class Tokenizer:
  """encode/decode text; `bos_id`/`eos_id` may be None when unknown."""

  bos_id: int | None = None
  eos_id: int | None = None
  vocab_size: int

  def encode(self, text: str, *, bos: bool = False, eos: bool = False
             ) -> list[int]:
    return self._wrap(self._encode_batch([text])[0], bos, eos)

  def encode_batch(self, texts: Sequence[str], *, bos: bool = False,
                   eos: bool = False) -> list[list[int]]:
    return [self._wrap(ids, bos, eos) for ids in self._encode_batch(texts)]

  def _wrap(self, ids, bos, eos):
    for flag, tok, name in ((bos, self.bos_id, "bos"), (eos, self.eos_id, "eos")):
      if flag and tok is None:
        raise ValueError(f"this tokenizer defines no {name} token.")
    return ([self.bos_id] if bos else []) + list(ids) + ([self.eos_id] if eos
                                                         else [])

  def _encode_batch(self, texts):
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers.Tokenizer` (special tokens are not split).

  `settings` carries what runtimes need beyond the vocabulary, from the
  source's tokenizer_config.json or GGUF keys, into exports:
  `chat_template` (str), `add_bos` (bool: runtimes prepend BOS), `pad`
  and `unk` (token strings).
  """

  SETTINGS = ("chat_template", "add_bos", "pad", "unk")

  def __init__(self, tok, bos: str | None = None, eos: str | None = None,
               settings: dict | None = None):
    self._tok = tok
    self.bos_token, self.eos_token = bos, eos
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = tok.token_to_id(bos) if bos else None
    self.eos_id = tok.token_to_id(eos) if eos else None
    self.settings = {k: v for k, v in (settings or {}).items()
                     if k in self.SETTINGS and v is not None}

  def _encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts),
                                                  add_special_tokens=False)]

  def decode(self, ids):
    return self._tok.decode(list(ids), skip_special_tokens=False)

  @classmethod
  def from_json(cls, text: str, bos: str | None = None,
                eos: str | None = None, settings: dict | None = None
                ) -> "HFTokenizer":
    """From tokenizer.json text (as embedded in exports)."""
    return cls(RawTokenizer.from_str(text), bos, eos, settings)

  def to_json(self) -> str:
    """The tokenizer.json text (for embedding in exports)."""
    return self._tok.to_str()

  def hf_config(self) -> dict:
    """The tokenizer_config.json that `from_file` reads back."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": self.bos_token, "eos_token": self.eos_token}
    names = dict(add_bos="add_bos_token", pad="pad_token", unk="unk_token",
                 chat_template="chat_template")
    config.update({names[k]: v for k, v in self.settings.items()})
    return config


class TiktokenTokenizer(Tokenizer):
  """Llama-3's tiktoken BPE: 128,000 ranks + 256 special tokens."""

  def __init__(self, model_path):
    self.model_path = pathlib.Path(model_path)
    # tiktoken caches by path; the content hash makes a stale entry miss.
    digest = hashlib.sha256(self.model_path.read_bytes()).hexdigest()
    ranks = tiktoken.load.load_tiktoken_bpe(str(self.model_path), digest)
    names = LLAMA3_NAMED_SPECIALS + [
        f"<|reserved_special_token_{i}|>" for i in
        range(2, 2 + LLAMA3_NUM_SPECIALS - len(LLAMA3_NAMED_SPECIALS))]
    self.special_tokens = {n: len(ranks) + i for i, n in enumerate(names)}
    self._enc = tiktoken.Encoding(pathlib.Path(model_path).name,
                                  pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                  special_tokens=self.special_tokens)
    self.vocab_size = len(ranks) + len(names)
    self.bos_id = self.special_tokens["<|begin_of_text|>"]
    self.eos_id = self.special_tokens["<|end_of_text|>"]

  def _encode_batch(self, texts):
    return self._enc.encode_ordinary_batch(list(texts))

  def decode(self, ids):
    return self._enc.decode(list(ids))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens 0..255, BOS 256, EOS 257: for tiny test models."""

  bos_id, eos_id, vocab_size = 256, 257, 258

  def _encode_batch(self, texts):
    return [list(t.encode("utf-8")) for t in texts]

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def from_file(path) -> Tokenizer:
  """A tokenizer from a `tokenizer.json`, a Llama-3 `tokenizer.model`, a
  directory holding one of them, or "bytes"."""
  if str(path) == "bytes":
    return ByteTokenizer()
  path = pathlib.Path(path)
  if path.is_dir():
    for name in ("tokenizer.json", "tokenizer.model"):
      if (path / name).exists():
        return from_file(path / name)
    raise FileNotFoundError(f"{path} holds neither tokenizer.json nor "
                            "tokenizer.model.")
  if not path.exists():
    raise FileNotFoundError(f"tokenizer file {path} not found.")
  if path.suffix == ".json":
    cfg_path = path.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    token = lambda key: (cfg[key].get("content") if isinstance(  # noqa: E731
        cfg.get(key), dict) else cfg.get(key))
    return HFTokenizer(
        RawTokenizer.from_file(str(path)), token("bos_token"),
        token("eos_token"), dict(chat_template=cfg.get("chat_template"),
                                 add_bos=cfg.get("add_bos_token"),
                                 pad=token("pad_token"), unk=token("unk_token")))
  if path.suffix == ".model":
    return TiktokenTokenizer(path)
  raise ValueError(f"{path}: unknown tokenizer format; expected "
                   "tokenizer.json, a tiktoken tokenizer.model or a .gguf.")
