"""The inference internals the per-op profile (`ops`) times one by one.

`tequila_jax.inference` has no public name for them yet; every use in this
package goes through here, so that switching to the public names is a
change of these lines alone.
"""

from tequila_jax.inference import model as inference_model


def fused_linear(model):
  """`model`'s fused projection, `(x, layer entry) -> y`, as its decode
  step calls it (PackedLlama: `ternary_linear` with the model's strategy)."""
  # TODO(i30): public hook
  return model._linear  # pylint: disable=protected-access


def attend(q, k, v, positions):
  """The decoders' attention of `q[B, T, N, D]` at `positions[B, T]` over a
  heads-major cache's keys and values `[B, K, S, D]` -> `[B, T, N * D]`."""
  # TODO(i30): public hook
  return inference_model._attend(q, k, v, positions)  # pylint: disable=protected-access

