"""Load a pretrained model and its tokenizer from one location string.

A location is a tequila_jax training workdir (its latest checkpoint), a
Hugging Face checkpoint directory, a `.gguf` file, or `asset:NAME` for a demo
asset that a package ships (`tequila_jax.assets`).
"""

from __future__ import annotations

import json
import pathlib

from flax import nnx

from tequila_jax import assets, gguf_io, hf_io, tokenizer
from tequila_jax import model as model_lib
from tequila_jax.model import Llama, ModelConfig


def resolve(location: str) -> pathlib.Path:
  if location.startswith("asset:"):
    return assets.fetch(location[len("asset:"):])
  path = pathlib.Path(location).expanduser()
  if not path.exists():
    raise FileNotFoundError(
        f"checkpoint {location!r} not found; give a Hugging Face directory, a "
        f".gguf file or asset:NAME (one of {sorted(assets.ASSETS)}).")
  return path


def is_workdir(path) -> bool:
  path = pathlib.Path(path)
  return (path / "checkpoints").is_dir() and (path / "config.json").exists()


def _workdir_config(path: pathlib.Path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))


def restore_params(workdir, step: int | None = None) -> dict:
  """The parameters of a training run at `step` (default: the latest)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(
      (pathlib.Path(workdir) / "checkpoints").absolute(),
      item_names=("state", "data"))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint.")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  manager.close()
  return restored["state"]["params"]


def load_model(location: str, step: int | None = None, **overrides) -> Llama:
  """The model at `location`; `overrides` replace `ModelConfig` fields."""
  path = resolve(location)
  if is_workdir(path):
    from tequila_jax import config_lib  # pylint: disable=g-import-not-at-top
    cfg: ModelConfig = config_lib.to_model_config(
        _workdir_config(path).model).replace(**overrides)
    return nnx.merge(model_lib.graphdef(cfg), restore_params(path, step))
  if path.suffix == ".gguf":
    return gguf_io.load_gguf(path, **overrides)
  return hf_io.load_hf(path, **overrides)


def load_tokenizer(location: str) -> tokenizer.Tokenizer:
  """The tokenizer stored with the checkpoint at `location` (for a training
  workdir, the one it was trained with)."""
  if location == "bytes":
    return tokenizer.load_tokenizer("bytes")
  path = resolve(location)
  if is_workdir(path):
    config = _workdir_config(path)
    spec = config.data.tokenizer or config.init.checkpoint
    if not spec:
      raise ValueError(f"{path}/config.json names no tokenizer.")
    return load_tokenizer(spec)
  return tokenizer.load_tokenizer(path)
