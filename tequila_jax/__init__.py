"""tequila_jax: ternary quantization-aware training (Tequila) in JAX/Flax NNX."""

from tequila_jax.layers import TernaryDense
from tequila_jax.quant import QuantConfig

__version__ = "0.1.0"
__all__ = ["QuantConfig", "TernaryDense", "__version__"]
