"""The random-init models the parts measure, and one timed decode step."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from tequila_jax import config_lib
from tequila_jax import model as model_lib
from tequila_jax.io import locations, tqj


def model_config(config: str, **changes):
  """`config`'s ModelConfig with `changes`, activations fp32."""
  return config_lib.to_model_config(config_lib.load_config_file(
      config).model).replace(dtype="float32", **changes)


def random_export(config: str, path, tokenizer: bool = False,
                  float_dtype: str = "float32", **changes):
  """Writes a random-init ternary export of `config`'s architecture with
  `changes` (ModelConfig fields; activations fp32), with the SmolLM2
  tokenizer if `tokenizer` (a GGUF needs one); returns its cfg."""
  cfg = model_config(config, **changes)
  tqj.write_export(model_lib.Llama(cfg, rngs=nnx.Rngs(0)), path,
                   float_dtype=float_dtype, tokenizer=locations.load_tokenizer(
                       "asset:smollm2_gguf") if tokenizer else None)
  return cfg


def timed_step(model, token, filled) -> tuple[float, jax.Array]:
  """Seconds and logits of one `model.decode(token, cache)` on a copy of
  the `filled` cache, made beforehand (the step donates its cache)."""
  cache = jax.tree.map(jnp.copy, filled)
  jax.block_until_ready(cache)
  t0 = time.perf_counter()
  logits = jax.block_until_ready(model.decode(token, cache)[0])
  return time.perf_counter() - t0, logits
