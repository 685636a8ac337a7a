"""A few-MB random LLaMA for tests and smoke runs."""

from tequila_jax import config_lib


def get_config(method: str = "tequila"):
  config = config_lib.base_config()
  config.model = config_lib.model_config(
      vocab_size=512, hidden_size=128, ffn_size=256, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=32, max_seq_len=256,
      dtype="float32", quant=config_lib.quant_config(method=method,
                                                     group_size=64))
  return config
