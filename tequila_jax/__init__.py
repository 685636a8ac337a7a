"""tequila_jax: ternary quantization-aware training (Tequila) in JAX/Flax NNX.

Lazy (PEP 562): `from tequila_jax import QuantConfig, TernaryDense` imports
their modules on first use, so that importing a subpackage or module
(`tequila_jax.quant` is pure JAX, `tequila_jax.cli` plain Python) loads
nothing else.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {"QuantConfig": "tequila_jax.quant.config",
         "TernaryDense": "tequila_jax.layers"}
__all__ = ["QuantConfig", "TernaryDense", "__version__"]

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
  from tequila_jax.layers import TernaryDense
  from tequila_jax.quant.config import QuantConfig


def __getattr__(name: str):
  """A public name, or a subpackage/module (`tequila_jax.quant`), imported on
  first use."""
  if name not in _LAZY:
    try:
      return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(
          f"module {__name__!r} has no attribute {name!r}") from None
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
