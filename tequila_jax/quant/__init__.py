"""Pure-JAX ternary quantizers and quantized matmuls (no Flax)."""

from tequila_jax.quant.config import GRANULARITIES, METHODS, QuantConfig
from tequila_jax.quant.matmul import quantized_matmul, ternary_matmul
from tequila_jax.quant.ternary import (TernaryState, dead_column_sum,
                                       dequantize, group_threshold_stats,
                                       ternarize, ternary_state,
                                       threshold_ratio, threshold_stats)

__all__ = [
    "GRANULARITIES", "METHODS", "QuantConfig", "TernaryState",
    "dead_column_sum", "dequantize", "group_threshold_stats",
    "quantized_matmul", "ternarize",
    "ternary_matmul", "ternary_state", "threshold_ratio", "threshold_stats",
]
