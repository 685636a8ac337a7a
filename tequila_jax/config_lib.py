"""What every training config has (`base_config`), the builders the
shipped configs (`tequila_jax/configs/*.py`) share, and the code that reads
configs: loading a `path.py[:arg]` and the `--quant.*` flag. Which fields a
resumed run may change is `train.resume`'s (`RUN_TIME_FIELDS`).

The defaults of the `model`, `model.quant` and `diagnostics` sections are the
field defaults of `ModelConfig`'s two halves, `QuantConfig` and
`DiagnosticsConfig`, read from the dataclasses (never typed again here).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import ml_collections
from ml_collections import config_flags

from tequila_jax import configs
from tequila_jax.diagnostics import DiagnosticsConfig
from tequila_jax.model import Architecture, ModelConfig, RunSettings
from tequila_jax.quant import QuantConfig


def field_defaults(cls) -> dict:
  """The fields of dataclass `cls` that have a default, with it (a nested
  dataclass default as its dict), in declaration order."""
  return {f.name: (dataclasses.asdict(f.default)
                   if dataclasses.is_dataclass(f.default) else f.default)
          for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING}


def quant_config(*args, **fields) -> ml_collections.ConfigDict:
  """A `ConfigDict` of every `QuantConfig` field: its defaults, replaced by
  `args` (in field order: method, granularity, ...) and `fields`."""
  defaults = field_defaults(QuantConfig)
  if len(args) > len(defaults) or set(fields) - set(defaults):
    raise TypeError(f"quant_config: QuantConfig's fields are "
                    f"{list(defaults)}; got {args} and {sorted(fields)}.")
  return ml_collections.ConfigDict(
      {**defaults, **dict(zip(defaults, args)), **fields})


def define_quant_flag() -> None:
  """`--quant.method=M --quant.group_size=G --quant.lam=L ...`: the one
  spelling every CLI uses for the quantization of a source that records none
  (Hugging Face, GGUF), the same fields as `--config.model.quant.*`."""
  config_flags.DEFINE_config_dict(
      "quant", quant_config(method=""),
      "Quantization to apply to the source (fields of QuantConfig; "
      "--quant.method unset = the checkpoint's own).", lock_config=True)


def quant_from_flag(flag: ml_collections.ConfigDict) -> QuantConfig | None:
  """The `--quant.*` flag as a QuantConfig, or None if no method was given."""
  if not flag.method:
    return None
  try:
    return QuantConfig(**flag.to_dict())
  except ValueError as e:
    raise SystemExit(f"--quant: {e}") from e


def model_config(**fields) -> ml_collections.ConfigDict:
  """A `ConfigDict` of `ModelConfig` fields: the defaults of `Architecture`
  and `RunSettings`, then `fields` (the dimensions, which have none)."""
  defaults = {**field_defaults(Architecture), **field_defaults(RunSettings)}
  return ml_collections.ConfigDict({**defaults, **fields})


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"config file {path} not found.")
  spec_ = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def shipped_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
  """The shipped config `tequila_jax/configs/NAME.py[:arg]` (the same file
  as `configs/NAME.py` in a checkout)."""
  path = configs.DIR / f"{name}.py"
  return load_config_file(f"{path}:{arg}" if arg else str(path))


def tiny(method: str = "tequila") -> ml_collections.ConfigDict:
  """`configs/tiny.py:METHOD`, the few-MB model of tests and notebooks."""
  return shipped_config("tiny", method)


def llama32_qat(size: str, method: str = "tequila"
                ) -> ml_collections.ConfigDict:
  """`configs/llama{size}.py:METHOD` ("1b", "3b"): the official Tequila
  recipe on Llama-3.2."""
  return shipped_config(f"llama{size}", method)


def to_model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig.from_dict(model.to_dict())


# The `train` and `data` fields that say how a run runs, not what it
# computes, with their defaults: a resumed run may change them
# (train.resume.RUN_TIME_FIELDS). `base_config` adds them to its sections.
RUN_TIME_DEFAULTS = {
    "train": dict(
        micro_batches=1,  # gradient accumulation
        loss_chunk=0,  # >0: cross-entropy over chunks of this many positions
        log_every=10, eval_every=500, eval_batches=8, eval_batch_size=0,
        checkpoint_every=1000, keep_checkpoints=3, async_checkpoints=True,
        progress=True, tensorboard=True,
        parallelism="gspmd",  # or "shard_map" (explicit data parallelism)
        # Several processes (hosts): jax.distributed.initialize() with these
        # ("", 0, -1: detected from SLURM/Open MPI/Kubernetes or JAX_* vars).
        distributed=False, coordinator_address="", num_processes=0,
        process_id=-1,
        # Resuming refuses a config that changes what the run computes (the
        # model, data, optimizer, seed: not RUN_TIME_FIELDS) unless this is
        # set.
        allow_config_change=False,
        restore_step=-1),  # resume from this checkpoint step (-1: the latest)
    "data": dict(
        cache_dir="",  # tokenized corpora; "" = ~/.cache/tequila_jax/corpora
        num_threads=2, prefetch=8)}


def base_config() -> ml_collections.ConfigDict:
  """Every field a training config has, with the published recipe's data,
  batch and λ defaults (the optimizer's are generic: `configs/llama1b.py`
  sets the official ones); config files fill in `model` and override the
  rest."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config(vocab_size=0, hidden_size=0, ffn_size=0,
                              num_layers=0, num_heads=0, num_kv_heads=1,
                              head_dim=0)
  # Pretrained weights to start from: a Hugging Face directory, a .gguf file,
  # or "asset:NAME" for a demo asset (tequila_jax.assets); "" = random init.
  config.init = ml_collections.ConfigDict({"checkpoint": ""})
  config.data = ml_collections.ConfigDict(dict(
      sources="asset:shakespeare",  # comma-separated specs, see data.py
      tokenizer="",  # "" = the init checkpoint's; a path; or "bytes"
      seq_len=1024,
      eval_fraction=0.02,  # share held out, see split
      split="documents",  # hold out whole documents; "tail": each one's end
      max_documents=0,  # 0 = all
      errors="strict",  # bytes that are not UTF-8: "strict" refuses, "replace"
      corpus_dir="",  # use this prepared corpus as is (skips tokenization)
      **RUN_TIME_DEFAULTS["data"]))
  config.train = ml_collections.ConfigDict(dict(
      steps=38_000,  # ~10B tokens at 262k tokens per step
      batch_size=256,  # global, in sequences (256 x 1024 = 262k tokens)
      **RUN_TIME_DEFAULTS["train"]))
  # Generic AdamW defaults; the official run's are `configs/llama1b.py`'s.
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, schedule="wsd",  # optim.SCHEDULES
      initial_fraction=0.0, warmup_fraction=0.05, decay_fraction=0.2,
      final_fraction=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  # Distillation from a float teacher (tequila_jax/distill.py): off while
  # weight and attention_weight are 0 (the plain next-token step). The loss
  # is ce_weight·CE + weight·T²·KL + attention_weight·(Q, K, V relation KL
  # of block attention_layer, over attention_heads relation heads; 0 = the
  # model's num_kv_heads). teacher: any location io.load opens, loaded as the
  # float model; "" = init.checkpoint, or without one a float copy of the
  # student's initial weights.
  config.distill = ml_collections.ConfigDict(dict(
      weight=0.0, ce_weight=1.0, temperature=1.0,
      kind="kl",  # KL(teacher ‖ student); "reverse_kl": KL(student ‖ teacher)
      teacher="", attention_weight=0.0, attention_layer=-1,
      attention_heads=0))
  # Deadzone diagnostics (tequila_jax/diagnostics.py): trapping every step
  # on `sample_size` sampled weights per layer type (trapped = in D for >=
  # `trap_steps` steps); fractions, crossings, pile-up, GSNR and |W|/delta
  # histograms on logging steps, over all weights. The fields and defaults of
  # DiagnosticsConfig, but its quant and seed: the run's model.quant and seed.
  measures = {k: v for k, v in field_defaults(DiagnosticsConfig).items()
              if k not in ("quant", "seed")}
  config.diagnostics = ml_collections.ConfigDict(dict(enabled=True,
                                                      **measures))
  return config
