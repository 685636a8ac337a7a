"""Llama-3.2-3B with Tequila QAT (the published recipe, DESIGN.md §1.6)."""

from tequila_jax import config_lib


def get_config(method: str = "tequila"):
  config = config_lib.base_config()
  config.model = config_lib.llama32("3b")
  config.model.quant.method = method
  return config
