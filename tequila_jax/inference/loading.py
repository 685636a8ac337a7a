"""Open any checkpoint location as a model and its tokenizer, the packed
ones as `PackedLlama`: the one function above both `io` (formats) and
`inference` (the CPU decoders), so that neither imports the other's way
back."""

from __future__ import annotations

from tequila_jax.inference.model import PackedLlama
from tequila_jax.inference.settings import InferenceSettings
from tequila_jax.io import hf, locations
from tequila_jax.io import load as io_load
from tequila_jax.quant import QuantConfig


def load(location: str, *, step: int | None = None,
         quant: QuantConfig | None = None,
         settings: InferenceSettings = InferenceSettings()):
  """`(model, tokenizer)` at `location` (`io.locations`). A `.tqj` export,
  or a ternary Hugging Face export (projection biases = C(W)), opens as a
  `PackedLlama` run as `settings` says (CPU inference); anything else
  (training workdir at its latest checkpoint or `step`, Hugging Face
  directory, `.gguf`, `asset:NAME`) as a trainable `Llama`
  (`io.load.load_model`), with `quant` replacing its quantization (Hugging
  Face and GGUF sources record none: they load as the float model unless
  `quant` is given)."""
  path = locations.resolve(location)
  if path.suffix == ".tqj" or hf.is_ternary_hf(path):
    export = io_load.read_inference_export(location, quant)
    return PackedLlama(export, settings), export.load_tokenizer()
  overrides = {"quant": quant} if quant is not None else {}
  return (io_load.load_model(location, step, **overrides),
          locations.load_tokenizer(location))
