"""Every shipped config loads; the Llama-3.2 configs have their published
sizes; config defaults are the dataclasses' (which fields a resume may
change: test_resume.py)."""

import dataclasses
import pathlib

import pytest
from flax import nnx

from tequila_jax import config_lib, configs, model
from tequila_jax.diagnostics import DiagnosticsConfig
from tequila_jax.quant import QuantConfig
from tequila_jax.train import build

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in configs.DIR.glob("*.py") if p.name != "__init__.py")
TINY_DIMS = dict(vocab_size=512, hidden_size=128, ffn_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=32)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds_abstractly(path):
  config = config_lib.load_config_file(str(path))
  cfg = config_lib.to_model_config(config.model)
  abstract = model.abstract_model(cfg)
  assert model.param_count(nnx.state(abstract, nnx.Param)) > 0


def test_one_copy_of_the_configs():
  """`configs/` in a checkout is the package's directory (what a wheel
  ships), not a second copy; the CLI's default is one of them."""
  assert (ROOT / "configs").is_symlink()
  assert (ROOT / "configs").resolve() == configs.DIR
  assert [p.name for p in CONFIGS] == [
      "llama1b.py", "llama3b.py", "smollm2_135m.py", "tiny.py"]
  assert configs.DEFAULT in CONFIGS


@pytest.mark.parametrize("name, billions",
                         [("llama1b", 1.24), ("llama3b", 3.21)])
def test_llama32_parameter_counts(name, billions):
  config = config_lib.load_config_file(str(ROOT / "configs" / f"{name}.py"))
  cfg = config_lib.to_model_config(config.model)
  n = model.param_count(nnx.state(model.abstract_model(cfg), nnx.Param))
  assert round(n / 1e9, 2) == billions, n
  assert cfg.rope_scaling and cfg.tie_embeddings and cfg.quant.group_size == 128


def test_llama3b_is_the_1b_recipe_on_the_3b_model():
  small = config_lib.llama32_qat("1b", "absmean")
  big = config_lib.llama32_qat("3b", "absmean")
  dims = ("hidden_size", "num_layers", "num_heads", "head_dim")
  for key in dims:
    del small.model[key], big.model[key]
  assert small == big and big.model.quant.method == "absmean"


def test_variant_argument_selects_method():
  config = config_lib.load_config_file(f"{ROOT}/configs/tiny.py:absmean")
  assert config_lib.to_model_config(config.model).quant.method == "absmean"
  assert config == config_lib.tiny("absmean")


def test_unknown_model_key_is_an_error():
  config = config_lib.tiny()
  d = config.model.to_dict()
  d["hiden_size"] = 3
  with pytest.raises(ValueError, match="Unknown model config keys"):
    model.ModelConfig.from_dict(d)


def test_quant_defaults_are_quant_configs():
  section = config_lib.quant_config()
  assert set(section) == {f.name for f in dataclasses.fields(QuantConfig)}
  assert QuantConfig(**section.to_dict()) == QuantConfig()
  assert QuantConfig(**config_lib.quant_config(
      "absmean", "per_channel", lam=0.5).to_dict()) == QuantConfig(
          "absmean", "per_channel", lam=0.5)
  with pytest.raises(TypeError, match="group_size"):
    config_lib.quant_config(groupsize=64)


def test_model_defaults_are_model_configs():
  """A config that gives only the dimensions builds the `ModelConfig` whose
  other fields, quantizer included, are the dataclasses' defaults."""
  section = config_lib.base_config().model
  assert set(section) == model.ARCH_FIELDS | model.RUN_FIELDS
  section.update(TINY_DIMS)
  assert config_lib.to_model_config(section) == model.ModelConfig(
      model.Architecture(**TINY_DIMS), model.RunSettings())


def test_diagnostics_defaults_are_diagnostics_configs():
  """The trainer builds the default `DiagnosticsConfig` from the default
  section (its quant and seed are the run's)."""
  config = config_lib.base_config()
  config.seed = 7
  config.model.update(TINY_DIMS)
  cfg = config_lib.to_model_config(config.model)
  assert build.diagnostics_config(config, cfg) == DiagnosticsConfig(
      quant=cfg.quant, seed=7)
  assert set(config.diagnostics) == {"enabled"} | {
      f.name for f in dataclasses.fields(DiagnosticsConfig)} - {"quant", "seed"}
