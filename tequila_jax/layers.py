"""Flax NNX layers: `TernaryDense`, a thin module over `tequila_jax.quant`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tequila_jax import quant
from tequila_jax.quant import QuantConfig

default_kernel_init = nnx.initializers.lecun_normal()


class TernaryDense(nnx.Module):
  """`y = x @ Q(W) [+ c(W)] [+ b]` with an fp32 latent kernel `[in, out]`.

  The quantized matmul runs in `dtype` (bf16 by default); quantizer statistics
  and the Tequila bias stay in fp32. `quant.method == "none"` is a float Dense.
  """

  def __init__(self, in_features: int, out_features: int, *,
               quant_config: QuantConfig = QuantConfig(),
               use_bias: bool = False,
               dtype=jnp.bfloat16,
               param_dtype=jnp.float32,
               kernel_init=default_kernel_init,
               kernel_axes: tuple[str | None, str | None] | None = None,
               name: str = "TernaryDense",
               rngs: nnx.Rngs):
    shape = (in_features, out_features)
    quant_config.check_kernel_shape(shape, name=name)
    self.in_features, self.out_features = in_features, out_features
    self.quant_config = quant_config
    self.dtype = dtype
    self.name = name
    meta = {"sharding_names": kernel_axes} if kernel_axes else {}
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype),
                            **meta)
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim < 1 or x.shape[-1] != self.in_features:
      raise ValueError(
          f"{self.name} [in={self.in_features}, out={self.out_features}]: "
          f"input of shape {x.shape} must end in {self.in_features} features.")
    y = quant.quantized_matmul(jnp.asarray(x, self.dtype), self.kernel[...],
                               self.quant_config)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def ternary_state(self) -> quant.TernaryState:
    """Codes, scales and `c(W)` of the current kernel (diagnostics, export)."""
    if not self.quant_config.is_ternary:
      raise ValueError(f"{self.name} has quant method 'none': no ternary state.")
    return quant.ternary_state(self.kernel[...], self.quant_config)
