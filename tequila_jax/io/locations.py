"""What a location string names, and the tokenizer stored there.

A location is a tequila_jax training workdir, a Hugging Face checkpoint
directory, a `.gguf` file, a packed `.tqj` export, or `asset:NAME` for a demo
asset that a package ships (`tequila_jax.io.assets`). Tokenizers also come
from a `tokenizer.json`, a Llama-3 `tokenizer.model`, or "bytes". Models are
opened above this module (`io.load`, `inference`).
"""

from __future__ import annotations

import pathlib

from tequila_jax import workdir as workdir_lib
from tequila_jax.io import assets, gguf, tokenizers, tqj


def resolve(location: str) -> pathlib.Path:
  if location.startswith("asset:"):
    return assets.fetch(location[len("asset:"):])
  path = pathlib.Path(location).expanduser()
  if not path.exists():
    raise FileNotFoundError(
        f"checkpoint {location!r} not found; give a training workdir, a "
        "Hugging Face directory, a .gguf or .tqj file, or asset:NAME (one of "
        f"{sorted(assets.ASSETS)}).")
  return path


def load_tokenizer(location: str) -> tokenizers.Tokenizer:
  """The tokenizer stored with the checkpoint at `location` (for a training
  workdir, the one it was trained with), or a tokenizer file, or "bytes"."""
  if location == "bytes":
    return tokenizers.ByteTokenizer()
  path = resolve(location)
  if workdir_lib.is_workdir(path):
    return load_tokenizer(workdir_lib.tokenizer_spec(
        workdir_lib.read_config(path), f"{path}/{workdir_lib.CONFIG}"))
  if path.suffix == ".gguf":
    return gguf.read_tokenizer(gguf.open_gguf(path))
  if path.suffix == ".tqj":
    return tqj.read_export(path).load_tokenizer()
  return tokenizers.from_file(path)

