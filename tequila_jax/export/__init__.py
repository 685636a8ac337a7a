"""`python -m tequila_jax.export`: a checkpoint to a packed `.tqj` export
(and optionally a llama.cpp GGUF). The formats are `tequila_jax.io.tqj` and
`tequila_jax.io.gguf`; this package is only the command line."""
