"""What a resumed run may change and how the rest is refused
(`train.resume`): the config fields, and each refusal's message. The
refusals inside whole runs: test_faults.py (layout, corpus), test_trainer.py
(config), test_distill.py (teacher)."""

import shutil

import jax
import pytest

from tequila_jax import config_lib, model, train
from tequila_jax import workdir as workdir_lib
from tequila_jax.train import resume
from tests.conftest import tiny_run_config


def _changes(**fields):
  """What `config_changes` reports when `fields` ("section.key": value)
  change between a stored tiny config and a resumed one."""
  config = config_lib.tiny()
  for key, value in fields.items():
    *sections, name = key.split(".")
    section = config
    for part in sections:
      section = section[part]
    section[name] = value
  return resume.config_changes(config_lib.tiny(), config)


def test_run_settings_but_dtype_may_change_on_resume():
  """scan, remat and the attention kernel change how the model runs (the
  same numbers up to rounding); they are `RunSettings` fields, and so
  run-time without being listed."""
  assert _changes(**{"model.scan_layers": False, "model.remat": "full",
                     "model.attention": "xla"}) == []
  run_time = [f for f in resume.RUN_TIME_FIELDS if f.startswith("model.")]
  assert sorted(run_time) == sorted(
      f"model.{name}" for name in model.RUN_FIELDS - {"dtype"})


def test_model_dtype_is_refused_on_resume(tmp_path):
  """The compute dtype is a run setting (never stored with the weights),
  but it changes the numerics: bf16 matmuls and activations are another
  computation than fp32 ones, so a resume refuses it like an architecture
  change (unless train.allow_config_change)."""
  assert _changes(**{"model.dtype": "bfloat16"}) == [
      "model.dtype: 'float32' -> 'bfloat16'"]
  (tmp_path / workdir_lib.CHECKPOINTS).mkdir()
  workdir_lib.write_config(tmp_path, config_lib.tiny())
  config = config_lib.tiny()
  config.model.dtype = "bfloat16"
  with pytest.raises(ValueError, match="model.dtype: 'float32' -> 'bfloat16'"):
    resume.check_config(config, tmp_path)
  config.train.allow_config_change = True
  resume.check_config(config, tmp_path)


@pytest.mark.parametrize("key, value, refused", [
    ("train.steps", 31, True), ("train.batch_size", 16, True),
    ("data.seq_len", 32, True), ("data.corpus_dir", "/c", True),
    ("optim.lr", 1e-4, True), ("model.quant.lam", 1e-2, True),
    ("model.quant.arenas_max_eps", 0.0, True),
    ("model.quant.arenas_warmup_fraction", 0.2, True),
    ("train.micro_batches", 2, False), ("train.log_every", 1, False),
    ("train.restore_step", 10, False), ("data.cache_dir", "/c", False),
    ("data.prefetch", 1, False), ("mesh.fsdp", 2, False),
    ("diagnostics.enabled", False, False)])
def test_what_a_resume_may_change(key, value, refused):
  assert bool(_changes(**{key: value})) == refused


def test_run_time_fields_name_fields_of_the_config():
  """Each entry is a field (or, ending in ".", a section) of every config:
  a renamed field cannot linger here."""
  flat = resume._flat(  # pylint: disable=protected-access
      config_lib.base_config().to_dict())
  for entry in resume.RUN_TIME_FIELDS:
    assert (entry in flat if not entry.endswith(".")
            else any(k.startswith(entry) for k in flat)), entry
  assert len(set(resume.RUN_TIME_FIELDS)) == len(resume.RUN_TIME_FIELDS)


def test_a_resumed_run_does_not_load_its_initial_checkpoint(tiny_run, corpora,
                                                            tmp_path):
  """The checkpoint holds the state, so a resume neither initializes it nor
  reads `init.checkpoint` (a pretrained model may be large, or gone): the
  run resumes with that location missing."""
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run, workdir)
  config = tiny_run_config(corpora, steps=13, allow_config_change=True)
  config.init.checkpoint = str(tmp_path / "deleted_pretrained_model")
  summary = train.run(config, workdir, devices=jax.devices()[:1])
  assert (summary["start_step"], summary["step"]) == (12, 13)
