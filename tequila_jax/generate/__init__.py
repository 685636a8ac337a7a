"""`python -m tequila_jax.generate`: stream a completion on the CPU. The
decoding is `tequila_jax.sampling`; this package is only the command line."""
