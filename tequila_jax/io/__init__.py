"""File formats, one module each, and one loader for all of them.

- `hf`: Hugging Face LLaMA checkpoints (config.json + safetensors).
- `gguf`: llama.cpp's GGUF, read (dequantized) and written (TQ2_0/TQ1_0),
  its Q/K row permutation and its embedded BPE vocabulary.
- `tqj`: the packed ternary export (`.tqj`): packing, `Export`, read/write.
- `tokenizers`: one `Tokenizer` interface over tokenizer.json, tiktoken and
  bytes.
- `assets`: demo models and tokenizers that packages ship, pinned by sha256
  (offline text corpora are `tequila_jax.data.corpora`'s).
- `locations`: what a location string names, and the tokenizer stored there.
- `load`: opens a location (training workdir, HF dir, .gguf, .tqj,
  `asset:NAME`) as what its format holds: a trainable `Llama` or a packed
  `tqj.Export` (`tequila_jax.inference.load` runs the latter).
- `atomic`: write a file or directory so that it appears whole or not at all.
"""
