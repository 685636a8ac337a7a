"""Open a checkpoint location (`io.locations`) as what its format holds: a
training workdir (its latest checkpoint, or `step`), a Hugging Face
directory or a `.gguf` file as a trainable `Llama` (`load_model`), a `.tqj`
export or a ternary Hugging Face directory as a packed `tqj.Export`
(`read_inference_export`). Opening any location as a runnable model and its
tokenizer, packed ones as a `PackedLlama`, is `tequila_jax.inference.load`."""

from __future__ import annotations

import logging

from flax import nnx

from tequila_jax import checkpoint, config_lib
from tequila_jax import model as model_lib
from tequila_jax import workdir as workdir_lib
from tequila_jax.io import gguf, hf, locations, tqj
from tequila_jax.model import Llama
from tequila_jax.quant import QuantConfig

log = logging.getLogger("tequila_jax")


def load_model(location: str, step: int | None = None, **overrides) -> Llama:
  """The (QAT) model at `location`; `overrides` replace `ModelConfig` fields.
  A workdir's learned quantizer parameters are its trained ones, unless
  `quant=` learns other ones (another method, λ mode or group layout; not
  merely another lam, eps or act_bits): then they start from the kernels,
  as for Hugging Face and GGUF sources. A `.tqj` export is an inference model:
  open it with `tequila_jax.inference.load`."""
  path = locations.resolve(location)
  if workdir_lib.is_workdir(path):
    stored = config_lib.to_model_config(workdir_lib.read_config(path).model)
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
                     "tequila_jax.inference.load (a PackedLlama), not as a "
                     "trainable model.")
  if path.suffix == ".gguf":
    return gguf.load_gguf(path, **overrides)
  return hf.load_hf(path, **overrides)


def read_inference_export(location: str,
                          quant: QuantConfig | None = None) -> tqj.Export:
  """The packed export held by a `.tqj` file or a ternary Hugging Face
  directory (`hf.read_ternary_hf`)."""
  path = locations.resolve(location)
  if path.suffix == ".tqj":
    return tqj.read_export(path)
  return hf.read_ternary_hf(path, quant)
