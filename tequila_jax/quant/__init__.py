"""Pure-JAX ternary quantizers and quantized matmuls (no Flax).

Lazy (PEP 562): a name is imported from its module on first use, so
`from tequila_jax.quant.config import METHODS` (plain Python) loads no JAX.
"""

import importlib
from typing import TYPE_CHECKING

_MODULES = {
    "activations": ("fake_quantize_int8", "quantize_int8"),
    "config": ("ACT_BITS", "GRANULARITIES", "LAM_MODES",
               "LEARNED_SCALE_METHODS", "METHODS", "QuantConfig"),
    "learned": ("QPARAM_NAMES", "check_qparams", "init_qparams",
                "qparam_axes"),
    "matmul": ("quantized_matmul", "ternary_matmul"),
    "sherry": ("arenas_eps",),
    "state": ("group_threshold_stats", "ternary_state", "threshold_stats"),
    "ternary": ("TernaryState", "dead_column_sum", "dequantize", "ternarize"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}
__all__ = [  # = sorted(_LAZY), written out for readers and linters
    "ACT_BITS", "GRANULARITIES", "LAM_MODES", "LEARNED_SCALE_METHODS",
    "METHODS", "QPARAM_NAMES", "QuantConfig", "TernaryState",
    "arenas_eps", "check_qparams", "dead_column_sum", "dequantize", "fake_quantize_int8",
    "group_threshold_stats", "init_qparams", "qparam_axes", "quantize_int8",
    "quantized_matmul", "ternarize", "ternary_matmul", "ternary_state",
    "threshold_stats"]

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
  from tequila_jax.quant.activations import fake_quantize_int8, quantize_int8
  from tequila_jax.quant.config import (ACT_BITS, GRANULARITIES, LAM_MODES,
                                        LEARNED_SCALE_METHODS, METHODS,
                                        QuantConfig)
  from tequila_jax.quant.learned import (QPARAM_NAMES, check_qparams,
                                         init_qparams, qparam_axes)
  from tequila_jax.quant.matmul import quantized_matmul, ternary_matmul
  from tequila_jax.quant.sherry import arenas_eps
  from tequila_jax.quant.state import (group_threshold_stats, ternary_state,
                                       threshold_stats)
  from tequila_jax.quant.ternary import (TernaryState, dead_column_sum,
                                         dequantize, ternarize)


def __getattr__(name: str):
  """A public name, or a submodule (`quant.learned`), imported on first use."""
  if name in _MODULES:
    return importlib.import_module(f"{__name__}.{name}")
  if name not in _LAZY:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY) | set(_MODULES))
