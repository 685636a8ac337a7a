"""Parameters are laid out from the logical axes declared on them."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from tequila_jax import config_lib, sharding, train
from tequila_jax import model as model_lib
from tests.conftest import tiny_model_config


def test_every_parameter_declares_its_axes():
  cfg = tiny_model_config()
  axes = model_lib.param_axes(cfg)
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg))
  for spec, x in zip(jax.tree.leaves(axes), jax.tree.leaves(abstract)):
    assert len(spec) == x.ndim and all(a in sharding.RULES for a in spec)
  assert axes["layers"]["attn"]["q_proj"]["kernel"] == P("layers", "embed",
                                                          "heads")


@pytest.mark.multidevice
def test_state_layout_follows_the_rules():
  config = config_lib.tiny()
  config.mesh.update(data=2, fsdp=4)
  state = train.build_train(config).abstract_state()
  spec = lambda x: x.sharding.spec  # noqa: E731
  params = state["params"]
  # The largest axis the rules allow on fsdp: vocab, the MLP width, the
  # first of equal sides; never the layer axis.
  assert spec(params["embed"]["embedding"]) == P("fsdp", None)
  assert spec(params["layers"]["mlp"]["down_proj"]["kernel"]) == P(
      None, "fsdp", None)
  assert spec(params["layers"]["attn"]["q_proj"]["kernel"]) == P(
      None, "fsdp", None)
  adam = state["opt_state"][1][0]
  assert spec(adam.mu["layers"]["mlp"]["up_proj"]["kernel"]) == spec(
      params["layers"]["mlp"]["up_proj"]["kernel"]) == P(None, None, "fsdp")
  assert spec(adam.count) == P() and spec(state["step"]) == P()
  assert all(spec(x) == P() for x in jax.tree.leaves(state["diag"]))
  config.mesh.update(data=8, fsdp=1)
  replicated = train.build_train(config).abstract_state()
  assert all(set(spec(x)) <= {None} for x in jax.tree.leaves(replicated))
