"""A few-MB random LLaMA for tests and smoke runs (`configs/tiny.py:absmean`)."""

from tequila_jax import config_lib


def get_config(method: str = "tequila"):
  return config_lib.tiny(method)
