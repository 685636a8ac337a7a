"""A training run's pieces that need no data: mesh, optimizer, shardings,
the initial state and the compiled steps (`build_train`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from tequila_jax import config_lib, diagnostics, losses, optim, quant, sharding
from tequila_jax import model as model_lib
from tequila_jax.distill import DistillConfig
from tequila_jax.io import load
from tequila_jax.model import ModelConfig
from tequila_jax.quant import QuantConfig
from tequila_jax.train.step import new_state, train_step

log = logging.getLogger("tequila_jax")
PARALLELISM = ("gspmd", "shard_map")


def validate(config: ml_collections.ConfigDict, mesh) -> tuple[int, int]:
  """Fails early on configs that cannot run; returns local and eval batch."""
  t = config.train
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if t.batch_size <= 0 or t.micro_batches <= 0:
    raise ValueError(f"train.batch_size={t.batch_size} and train.micro_batches"
                     f"={t.micro_batches} must be positive.")
  if config.optim.lr < 0:
    raise ValueError(f"optim.lr={config.optim.lr} is negative (it would "
                     "ascend the loss); use a positive learning rate.")
  if config.data.seq_len > config.model.max_seq_len:
    raise ValueError(
        f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
        f"{config.model.max_seq_len} (RoPE and the attention are built for at "
        "most that); lower data.seq_len or raise model.max_seq_len.")
  if config.data.seq_len <= 0:
    raise ValueError(f"data.seq_len={config.data.seq_len} must be positive.")
  if t.batch_size % t.micro_batches:
    raise ValueError(f"train.batch_size={t.batch_size} is not divisible by "
                     f"train.micro_batches={t.micro_batches}.")
  micro = t.batch_size // t.micro_batches
  if micro % n_dev:
    raise ValueError(
        f"the micro-batch of {micro} sequences (train.batch_size / "
        f"micro_batches) does not split over the {n_dev} devices of the mesh; "
        f"use a batch_size that is a multiple of {n_dev * t.micro_batches}.")
  if t.batch_size % n_proc:
    raise ValueError(f"train.batch_size={t.batch_size} does not split over "
                     f"{n_proc} processes.")
  eval_bs = t.eval_batch_size or micro
  if eval_bs % n_dev:
    raise ValueError(f"train.eval_batch_size={eval_bs} must be a multiple of "
                     f"the {n_dev} devices.")
  if t.loss_chunk and config.data.seq_len % t.loss_chunk:
    raise ValueError(f"train.loss_chunk={t.loss_chunk} must divide "
                     f"data.seq_len={config.data.seq_len}.")
  if t.parallelism not in PARALLELISM:
    raise ValueError(f"train.parallelism={t.parallelism!r}: choose one of "
                     f"{PARALLELISM}.")
  if t.parallelism == "shard_map" and mesh.shape["fsdp"] > 1:
    raise ValueError(
        f"train.parallelism='shard_map' is data parallelism: every device "
        f"holds the whole state, but mesh.fsdp={mesh.shape['fsdp']} shards "
        "it. Use parallelism='gspmd' for FSDP, or mesh.fsdp=1.")
  if t.steps <= 0:
    raise ValueError(f"train.steps must be positive, got {t.steps}.")
  return t.batch_size // n_proc, eval_bs


def diagnostics_config(config, model_cfg: ModelConfig
                       ) -> diagnostics.DiagnosticsConfig | None:
  d = config.diagnostics
  if not d.enabled or not model_cfg.quant.is_ternary:
    return None
  return diagnostics.DiagnosticsConfig(
      quant=model_cfg.quant, trap_steps=d.trap_steps,
      sample_size=d.sample_size, hist_bins=d.hist_bins, hist_max=d.hist_max,
      seed=config.seed)


def distill_config(config, model_cfg: ModelConfig) -> DistillConfig | None:
  return DistillConfig.from_config(config.distill, model_cfg.num_layers,
                                   model_cfg.num_kv_heads)


@dataclasses.dataclass
class Teacher:
  """The float model a run distills from (`config.distill`): a separate,
  non-donated argument of the step, never in the train state (so never in a
  checkpoint, with no gradient and no optimizer state); its parameters are
  laid out by the state's sharding rules (`sharding.state_shardings`), in
  the run's compute dtype (a resume checks it: `train.resume`)."""
  cfg: ModelConfig
  params: dict
  shardings: dict

  @functools.cached_property
  def graphdef(self):
    return model_lib.graphdef(self.cfg)


def _like(tree: dict, like: dict) -> dict:
  """The leaves of `tree` at the paths of `like`."""
  return {k: _like(tree[k], v) if isinstance(v, dict) else tree[k]
          for k, v in like.items()}


@dataclasses.dataclass
class Train:
  """Everything the steps need except data; see `build_train`."""
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  lr_schedule: Callable
  diag: diagnostics.DiagnosticsConfig | None
  local_batch: int  # this process's rows of a training batch
  eval_batch_size: int
  distill: DistillConfig | None = None

  @functools.cached_property
  def graphdef(self):
    return model_lib.graphdef(self.model_cfg)

  def _fresh(self) -> dict:
    return self._around(model_lib.init_params(self.model_cfg,
                                              self.config.seed))

  def _around(self, params: dict) -> dict:
    """The train state around starting weights that are in place: learned
    quantizer parameters start from them (`with_initial_qparams`)."""
    params = model_lib.with_initial_qparams(params, self.model_cfg,
                                            self.config.seed)
    return new_state(params, self.tx, self.diag)

  @functools.cached_property
  def _shapes(self):
    """The train state's shapes and dtypes (traced once)."""
    return jax.eval_shape(self._fresh)

  @functools.cached_property
  def shardings(self):
    """A `NamedSharding` per leaf of the train state."""
    return sharding.state_shardings(self._shapes, self.mesh,
                                    model_lib.param_axes(self.model_cfg))

  def abstract_state(self):
    """The train state as `ShapeDtypeStruct`s with their shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self._shapes, self.shardings)

  def init_state(self, params: dict | None = None) -> dict:
    """The sharded initial state: random parameters from `config.seed`, or
    around `params` (which are moved into the layout and donated); either
    way the learned quantizer parameters start from the kernels."""
    if params is None:
      return jax.jit(self._fresh, out_shardings=self.shardings)()
    params = jax.device_put(params, self.shardings["params"])
    return jax.jit(self._around, out_shardings=self.shardings,
                   donate_argnums=0)(params)

  @property
  def teacher_location(self) -> str:
    """Where the distillation teacher is: `distill.teacher`, else
    `init.checkpoint`; "" for a float copy of the initial weights."""
    return self.config.distill.teacher or self.config.init.checkpoint

  @functools.cached_property
  def teacher(self) -> Teacher:
    """The distillation teacher (loaded on first use) at `teacher_location`,
    opened by `io.load.load_model` as the float model (quant method none)
    with this run's settings; without one, a float copy of the student's
    initial weights (`config.seed`)."""
    if self.distill is None:
      raise ValueError("this run does not distill (distill.weight = 0).")
    float_quant = QuantConfig("none")
    location = self.teacher_location
    if location:
      run = {**dataclasses.asdict(self.model_cfg.run), "remat": "none"}
      model = load.load_model(location, quant=float_quant, **run)
      cfg, params = model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param))
      del model
    else:
      cfg = self.model_cfg.replace(quant=float_quant, remat="none")
      params = _like(jax.jit(lambda: self._fresh()["params"])(),
                     jax.eval_shape(lambda: model_lib.init_params(cfg)))
    self.distill.check_teacher(self.model_cfg, cfg)
    params = jax.tree.map(lambda x: np.asarray(x).astype(cfg.compute_dtype),
                          params)
    shardings = sharding.state_shardings(params, self.mesh,
                                         model_lib.param_axes(cfg))
    return Teacher(cfg, jax.device_put(params, shardings), shardings)

  def step_args(self) -> tuple:
    """The step's arguments after `(state, batch)`: the teacher's parameters
    when distilling, else none."""
    return () if self.distill is None else (self.teacher.params,)

  @property
  def arenas_schedule(self) -> Callable | None:
    """Sherry's Arenas ε as a function of the optimizer step over this run's
    `train.steps` (`quant.arenas_eps`); None for every other method."""
    q = self.model_cfg.quant
    if q.method != "sherry":
      return None
    return functools.partial(
        quant.arenas_eps, total_steps=self.config.train.steps,
        warmup_fraction=q.arenas_warmup_fraction, max_eps=q.arenas_max_eps)

  def step_fn(self, full_diagnostics: bool = False):
    """The jitted, donated `train_step` (its logging-step variant if
    `full_diagnostics`) of `(state, batch, *step_args())`: over the whole
    batch, laid out by XLA from the shardings (`train.parallelism="gspmd"`),
    or per device under `jax.shard_map` with explicit gradient averaging
    ("shard_map"). The teacher, if any, is not donated."""
    t = self.config.train
    distilling = self.distill is not None
    step = functools.partial(
        train_step, graphdef=self.graphdef, tx=self.tx,
        lr_schedule=self.lr_schedule, micro_batches=t.micro_batches,
        diag=self.diag, full_diagnostics=full_diagnostics,
        loss_chunk=t.loss_chunk, quant_config=self.model_cfg.quant,
        distill=self.distill,
        teacher_graphdef=self.teacher.graphdef if distilling else None,
        arenas_schedule=self.arenas_schedule)
    teacher = (self.teacher.shardings,) if distilling else ()
    if t.parallelism == "shard_map":  # the state is replicated (validate)
      step = jax.shard_map(
          functools.partial(step, axis_name=sharding.BATCH_AXES),
          mesh=self.mesh,
          in_specs=(P(), P(sharding.BATCH_AXES)) + (P(),) * len(teacher),
          out_specs=(P(), P()), check_vma=False)
    return jax.jit(
        step,
        in_shardings=(self.shardings, sharding.batch_sharding(self.mesh),
                      *teacher),
        out_shardings=(self.shardings, sharding.replicated(self.mesh)),
        donate_argnums=0)

  def eval_fn(self, quant: QuantConfig | None = None):
    """Jitted held-out loss of this run's params on a batch, under the run's
    quantizer or `quant` (e.g. the float model the run started from; its
    own learned quantizer parameters then start from the kernels)."""
    if quant is None:
      graphdef, adapt = self.graphdef, lambda p: p
    else:
      cfg = self.model_cfg.replace(quant=quant)
      graphdef = model_lib.graphdef(cfg)
      adapt = lambda p: model_lib.with_initial_qparams(p, cfg)  # noqa: E731
    return jax.jit(
        lambda params, batch: losses.next_token_loss(adapt(params), graphdef,
                                                     batch),
        in_shardings=(self.shardings["params"],
                      sharding.batch_sharding(self.mesh)),
        out_shardings=sharding.replicated(self.mesh))


def build_train(config: ml_collections.ConfigDict, *, devices=None) -> Train:
  """The data-free half of a run: validated config, mesh, optimizer and
  diagnostics. Nothing is allocated until `init_state`."""
  model_cfg = config_lib.to_model_config(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  local_batch, eval_bs = validate(config, mesh)
  tx, lr = optim.make_optimizer(config.optim, config.train.steps)
  return Train(config, model_cfg, mesh, tx, lr,
               diagnostics_config(config, model_cfg), local_batch, eval_bs,
               distill_config(config, model_cfg))


def pretrained_params(config, model_cfg: ModelConfig) -> dict:
  """The parameters of `config.init.checkpoint` for the model of
  `config.model`: refused if their shapes differ; architecture fields that
  differ without changing a shape (e.g. rms_eps rounded to fp32 in a GGUF)
  are logged, and the run uses `config.model`'s."""
  model = load.load_model(config.init.checkpoint, quant=model_cfg.quant)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ours, theirs = model_cfg.arch, model.cfg.arch
  diff = ", ".join(
      f"{f.name} (checkpoint {getattr(theirs, f.name)}, config "
      f"{getattr(ours, f.name)})" for f in dataclasses.fields(ours)
      if getattr(theirs, f.name) != getattr(ours, f.name))
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
  if shapes(params) != shapes(jax.eval_shape(
      lambda: model_lib.init_params(model_cfg))):
    raise ValueError(f"init.checkpoint {config.init.checkpoint!r} does not fit "
                     f"config.model: {diff}.")
  if diff:
    log.info("config.model differs from init.checkpoint on %s; the run uses "
             "config.model's values.", diff)
  if model_cfg.quant.learned_scale or model_cfg.quant.learned_lam:
    log.info("the learned quantizer parameters of %s start from "
             "init.checkpoint's weights (α = max|W| per group, γ = θ = 0, Λ "
             "drawn from the seed), whatever the checkpoint held.",
             model_cfg.quant.describe())
  return params


def describe(config: ml_collections.ConfigDict, *, devices=None) -> dict:
  """Parameter count and train-state memory per device, without allocating;
  when distilling, the teacher's bytes too (taken to have `config.model`'s
  architecture, float, in the compute dtype: the default teacher)."""
  tr = build_train(config, devices=devices)
  abstract = tr.abstract_state()
  out = dict(params=model_lib.param_count(abstract["params"]),
             mesh=dict(tr.mesh.shape), **_bytes(abstract, "state"))
  if tr.distill is not None:
    cfg = tr.model_cfg.replace(quant=QuantConfig("none"))
    shapes = jax.eval_shape(lambda: jax.tree.map(
        lambda x: x.astype(cfg.compute_dtype), model_lib.init_params(cfg)))
    shardings = sharding.state_shardings(shapes, tr.mesh,
                                         model_lib.param_axes(cfg))
    out.update(_bytes(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        shapes, shardings), "teacher"))
  return out


def _bytes(abstract, name: str) -> dict:
  """`{name}_bytes` and `{name}_bytes_per_device` of a sharded abstract tree."""
  per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape)))
                   * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  return {f"{name}_bytes": total, f"{name}_bytes_per_device": per_device}
