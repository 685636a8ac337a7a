"""Llama-3.2-1B with Tequila QAT: the published recipe of arXiv 2509.23809.

Set `init.checkpoint` to the Hugging Face checkpoint directory and
`data.sources` to the corpus; `configs/llama1b.py:absmean` picks a method.

As the official run: AdamW with the Hugging Face defaults (β2 0.999, eps
1e-8, clip 1.0, weight decay 0), lr 1e-3, 256 x 1024 tokens per step, G =
128, λ = 1e-3 fixed, and its schedule (transformers 4.51
`warmup_stable_decay`, warmup_ratio 0.61, no stable phase, 14,592 cosine
decay steps of ~38k, min_lr_ratio 0.1): linear warmup from 0.1·lr over 61%
of the steps, cosine decay to 0.1·lr over the next 38.25%, then held.
`llama3b.py` is this recipe on the 3B model.

Deliberately not copied: the official run probably updated bf16 weights
with no fp32 master copy (ours are fp32, matmuls in bf16), and it counted
padding tokens in the loss (we pack documents without padding).
"""

from tequila_jax import config_lib


def get_config(method: str = "tequila"):
  config = config_lib.base_config()
  # Llama-3.2-1B exactly (its published config.json).
  config.model = config_lib.model_config(
      vocab_size=128256, ffn_size=8192, num_kv_heads=8, rope_theta=500000.0,
      rope_scaling={"factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192},
      max_seq_len=131072, hidden_size=2048, num_layers=16, num_heads=32,
      head_dim=64)
  config.model.quant.method = method
  config.optim.update(lr=1e-3, schedule="official", initial_fraction=0.1,
                      warmup_fraction=0.61,
                      decay_fraction=0.3825,  # 14,592 / ~38.15k
                      final_fraction=0.1, b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=0.0, clip_norm=1.0)
  config.model.remat = "quantized"  # keeps Q and c(W); see gpu_perf.md
  config.train.loss_chunk = 256  # 128k-vocab logits in 256-position chunks
  return config
