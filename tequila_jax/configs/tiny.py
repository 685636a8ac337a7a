"""A few-MB random LLaMA on Shakespeare bytes: tests, notebooks, smoke runs
(`configs/tiny.py:absmean` picks a method)."""

from tequila_jax import config_lib


def get_config(method: str = "tequila"):
  config = config_lib.base_config()
  config.model = config_lib.model_config(
      vocab_size=512, hidden_size=128, ffn_size=256, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=32, max_seq_len=256,
      dtype="float32",
      quant=config_lib.quant_config(method=method, group_size=64))
  config.data.tokenizer = "bytes"  # 258 tokens fit the 512-entry vocabulary
  config.data.seq_len = 64
  config.train.update(steps=30, batch_size=8, log_every=5, eval_every=10,
                      eval_batches=2, checkpoint_every=10, progress=False,
                      tensorboard=False)
  config.optim.update(warmup_fraction=0.1, lr=3e-3)
  return config
