"""Llama-3.2-1B with Tequila QAT (the published recipe, DESIGN.md §1.6)."""

from tequila_jax import config_lib


def get_config(method: str = "tequila"):
  config = config_lib.base_config()
  config.model = config_lib.llama32("1b")
  config.model.quant.method = method
  config.model.remat = "quantized"  # keeps Q and c(W); see gpu_perf.md
  config.train.loss_chunk = 256  # 128k-vocab logits in 256-position chunks
  return config
