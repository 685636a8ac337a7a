"""Llama-3.2-1B with Tequila QAT (the published recipe of arXiv 2509.23809).

Set `init.checkpoint` to the Hugging Face checkpoint directory and
`data.sources` to the corpus; `configs/llama1b.py:absmean` picks a method.
"""

from tequila_jax import config_lib


def get_config(method: str = "tequila"):
  return config_lib.llama32_qat("1b", method)
