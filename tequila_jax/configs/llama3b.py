"""Llama-3.2-3B with Tequila QAT: `llama1b.py`'s recipe (the published one of
arXiv 2509.23809) on the 3B model.

Set `init.checkpoint` to the Hugging Face checkpoint directory and
`data.sources` to the corpus; `configs/llama3b.py:absmean` picks a method.
"""

from tequila_jax.configs import llama1b


def get_config(method: str = "tequila"):
  config = llama1b.get_config(method)
  # Llama-3.2-3B's published config.json differs from the 1B's only here.
  config.model.update(hidden_size=3072, num_layers=28, num_heads=24,
                      head_dim=128)
  return config
