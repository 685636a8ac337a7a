"""CPU inference of packed ternary exports through plain XLA (no custom code)."""

from tequila_jax.inference.kernels import STRATEGIES, ternary_linear
from tequila_jax.inference.model import DenseLlama, PackedLlama

__all__ = ["DenseLlama", "PackedLlama", "STRATEGIES", "ternary_linear"]
