"""CPU inference of packed ternary exports through plain XLA (no custom code).

`load(location, settings=InferenceSettings(...))` opens any checkpoint
location as `(model, tokenizer)`: a `.tqj` or ternary Hugging Face export as
a `PackedLlama`, anything else as a trainable `Llama`.
"""

from tequila_jax.inference.cache import PackedKVCache
from tequila_jax.inference.kernels import STRATEGIES, ternary_linear
from tequila_jax.inference.loading import load
from tequila_jax.inference.model import DenseLlama, PackedLlama
from tequila_jax.inference.settings import (ALPHA_DTYPES, EMBEDS, KV_DTYPES,
                                            InferenceSettings)

__all__ = ["ALPHA_DTYPES", "DenseLlama", "EMBEDS", "InferenceSettings",
           "KV_DTYPES", "PackedKVCache", "PackedLlama", "STRATEGIES", "load",
           "ternary_linear"]
