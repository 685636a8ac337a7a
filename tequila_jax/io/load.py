"""Open any checkpoint location as a model and its tokenizer.

A location is a tequila_jax training workdir (its latest checkpoint, or
`step`), a Hugging Face checkpoint directory, a `.gguf` file, a packed `.tqj`
export, or `asset:NAME` for a demo asset that a package ships
(`tequila_jax.io.assets`). Tokenizers also come from a `tokenizer.json`, a
Llama-3 `tokenizer.model`, or "bytes".
"""

from __future__ import annotations

import logging
import pathlib

from flax import nnx

from tequila_jax import checkpoint, config_lib
from tequila_jax import model as model_lib
from tequila_jax.inference import PackedLlama
from tequila_jax.io import assets, gguf, hf, tokenizers, tqj
from tequila_jax.model import Llama
from tequila_jax.quant import QuantConfig

log = logging.getLogger("tequila_jax")


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


def load_model(location: str, step: int | None = None, **overrides) -> Llama:
  """The (QAT) model at `location`; `overrides` replace `ModelConfig` fields.
  A workdir's learned quantizer parameters are its trained ones, unless
  `quant=` learns other ones (another method, λ mode or group layout; not
  merely another lam, eps or act_bits): then they start from the kernels,
  as for Hugging Face and GGUF sources. A `.tqj` export is an inference model:
  open it with `load`."""
  path = resolve(location)
  if checkpoint.is_workdir(path):
    stored = config_lib.to_model_config(checkpoint.read_config(path).model)
    cfg = stored.replace(**overrides)
    params = checkpoint.restore_params(path, step)
    if not cfg.quant.learns_like(stored.quant):  # its own parameters
      params = model_lib.with_initial_qparams(params, cfg)
      if cfg.quant.learned_scale or cfg.quant.learned_lam:
        log.info("%s: quantizer %s learns other parameters than the run's "
                 "(%s): they start from the kernels.", path,
                 cfg.quant.describe(), stored.quant.describe())
    return nnx.merge(model_lib.graphdef(cfg), params)
  if path.suffix == ".tqj":
    raise ValueError(f"{path} is a packed inference export; open it with "
                     "tequila_jax.io.load.load (a PackedLlama), not as a "
                     "trainable model.")
  if path.suffix == ".gguf":
    return gguf.load_gguf(path, **overrides)
  return hf.load_hf(path, **overrides)


def load_tokenizer(location: str) -> tokenizers.Tokenizer:
  """The tokenizer stored with the checkpoint at `location` (for a training
  workdir, the one it was trained with), or a tokenizer file, or "bytes"."""
  if location == "bytes":
    return tokenizers.ByteTokenizer()
  path = resolve(location)
  if checkpoint.is_workdir(path):
    config = checkpoint.read_config(path)
    spec = config.data.tokenizer or config.init.checkpoint
    if not spec:
      raise ValueError(f"{path}/{checkpoint.CONFIG} names no tokenizer.")
    return load_tokenizer(spec)
  if path.suffix == ".gguf":
    return gguf.read_tokenizer(gguf.open_gguf(path))
  if path.suffix == ".tqj":
    return tqj.read_export(path).load_tokenizer()
  return tokenizers.from_file(path)


def read_inference_export(location: str,
                          quant: QuantConfig | None = None) -> tqj.Export:
  """The packed export held by a `.tqj` file or a ternary Hugging Face
  directory (`hf.read_ternary_hf`)."""
  path = resolve(location)
  if path.suffix == ".tqj":
    return tqj.read_export(path)
  return hf.read_ternary_hf(path, quant)


def load(location: str, *, step: int | None = None,
         quant: QuantConfig | None = None, strategy: str = "auto",
         embed: str = "float", alpha_dtype: str = "float32",
         kv_dtype: str = "float32"):
  """`(model, tokenizer)` at `location`. A `.tqj` export, or a ternary Hugging
  Face export (projection biases = C(W)), opens as a `PackedLlama` (CPU
  inference; `strategy`, `embed`, `alpha_dtype` and `kv_dtype` as there);
  anything else as a `Llama`,
  with `quant` replacing its quantization (Hugging Face and GGUF sources
  record none: they load as the float model unless `quant` is given)."""
  if str(location).endswith(".tqj") or hf.is_ternary_hf(resolve(location)):
    ex = read_inference_export(location, quant)
    return (PackedLlama(ex, strategy, embed, alpha_dtype, kv_dtype),
            ex.load_tokenizer())
  overrides = {"quant": quant} if quant is not None else {}
  return (load_model(location, step, **overrides), load_tokenizer(location))
