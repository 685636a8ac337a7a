"""Pure-JAX ternary quantizers and quantized matmuls (no Flax)."""

from tequila_jax.quant.activations import (ACT_BITS, fake_quantize_int8,
                                           quantize_int8)
from tequila_jax.quant.config import (GRANULARITIES, LAM_MODES,
                                      LEARNED_SCALE_METHODS, METHODS,
                                      QuantConfig)
from tequila_jax.quant.learned import (QPARAM_NAMES, check_qparams,
                                       init_qparams, qparam_axes)
from tequila_jax.quant.matmul import quantized_matmul, ternary_matmul
from tequila_jax.quant.state import (group_threshold_stats, ternary_state,
                                     threshold_stats)
from tequila_jax.quant.ternary import (TernaryState, dead_column_sum,
                                       dequantize, ternarize, threshold_ratio)

__all__ = [
    "ACT_BITS", "GRANULARITIES", "LAM_MODES", "LEARNED_SCALE_METHODS",
    "METHODS", "QPARAM_NAMES", "QuantConfig", "TernaryState",
    "check_qparams", "dead_column_sum", "dequantize", "fake_quantize_int8",
    "group_threshold_stats", "init_qparams", "qparam_axes",
    "quantize_int8", "quantized_matmul", "ternarize", "ternary_matmul",
    "ternary_state", "threshold_ratio", "threshold_stats",
]
