"""QAT training: a pure `train_step` and `run(config, workdir)`.

`run` builds the train state abstractly, derives its shardings over a
`(data, fsdp)` mesh, materializes it (random or from a pretrained checkpoint)
directly in that layout, restores the latest orbax checkpoint if there is one,
and runs one compiled, donated step per batch. Metrics are fetched one step
late so the host never waits on the device; a SIGTERM/SIGINT saves a
checkpoint and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from tequila_jax import (checkpoint, config_lib, data, diagnostics, metrics,
                         optim, pretrained, sharding)
from tequila_jax import model as model_lib
from tequila_jax.model import Llama, ModelConfig, param_count

log = logging.getLogger("tequila_jax")

# Fields that must agree between config.model and a pretrained checkpoint.
ARCH_FIELDS = ("vocab_size", "hidden_size", "ffn_size", "num_layers",
               "num_heads", "num_kv_heads", "head_dim", "tie_embeddings")
# Fields of config.model that apply on top of a pretrained checkpoint.
RUN_FIELDS = ("quant", "dtype", "scan_layers", "remat")


class TrainingError(RuntimeError):
  pass


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token negative log-likelihood, in fp32."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(logz - picked)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array,
                          targets: jax.Array, chunk: int) -> jax.Array:
  """`cross_entropy(hidden @ head, targets)` over sequence chunks of `chunk`
  positions, rematerialized, so that only one chunk of logits lives at once
  (a 128k vocabulary makes full fp32 logits several GB)."""
  b, t, d = hidden.shape
  k = t // chunk
  hs = hidden.reshape(b, k, chunk, d).swapaxes(0, 1)
  ts = targets.reshape(b, k, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def body(total, xs):
    h, tgt = xs
    logits = jnp.matmul(h, head).astype(jnp.float32)
    return total + cross_entropy(logits, tgt) * (b * chunk), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts))
  return total / (b * t)


def loss_fn(params, graphdef, tokens, loss_chunk: int = 0):
  """Next-token loss of the model `(graphdef, params)` on `[B, T + 1]` tokens."""
  model = nnx.merge(graphdef, params)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  if loss_chunk and loss_chunk < inputs.shape[1]:
    return chunked_cross_entropy(model.hidden_states(inputs),
                                 model.head_matrix(), targets, loss_chunk)
  return cross_entropy(model(inputs), targets)


def train_step(state: dict, batch: jax.Array, *, graphdef, tx,
               lr_schedule: Callable, micro_batches: int,
               diag: diagnostics.DiagnosticsConfig | None = None,
               full_diagnostics: bool = False,
               loss_chunk: int = 0) -> tuple[dict, dict]:
  """One optimizer step on `batch[B, T + 1]`, averaged over `micro_batches`.

  Micro-batch k takes rows k, k + m, k + 2m, ... so that every device holds an
  equal share of every micro-batch. With `diag`, deadzone statistics are
  returned with the metrics (the expensive ones when `full_diagnostics`).
  """
  params = state["params"]
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, loss_chunk=loss_chunk))
  want_gsnr = diag is not None and full_diagnostics and micro_batches >= 2
  if micro_batches == 1:
    loss, grads = grad_fn(params, graphdef, batch)
  else:
    micro = batch.reshape(-1, micro_batches, batch.shape[-1]).swapaxes(0, 1)

    def accumulate(carry, xs):
      # Running mean of the gradients (Welford; with the sum of squared
      # deviations `m2` for the GSNR variant), numerically stable in fp32.
      k, tokens = xs
      loss_sum, mean, m2 = carry
      loss, g = grad_fn(params, graphdef, tokens)
      delta = jax.tree.map(jnp.subtract, g, mean)
      mean = jax.tree.map(lambda m, d: m + d / (k + 1), mean, delta)
      if want_gsnr:
        m2 = jax.tree.map(lambda a, d, g_, m: a + d * (g_ - m), m2, delta, g,
                          mean)
      return (loss_sum + loss, mean, m2), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    carry = (jnp.zeros((), jnp.float32), zeros, zeros if want_gsnr else ())
    (loss, grads, m2), _ = jax.lax.scan(
        accumulate, carry, (jnp.arange(micro_batches), micro))
    loss = loss / micro_batches
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  new_state = dict(step=state["step"] + 1, params=new_params,
                   opt_state=opt_state)
  out = dict(loss=loss, grad_norm=optax.tree.norm(grads),
             lr=lr_schedule(state["step"]))
  if diag is not None:
    new_state["diag"], per_step = diagnostics.update(state["diag"],
                                                     new_params, diag)
    out.update(per_step)
    if full_diagnostics:
      grad_var = None
      if want_gsnr:
        grad_var = jax.tree.map(lambda a: a / (micro_batches - 1), m2)
      out.update(diagnostics.full_metrics(
          params, new_params, diag, grads if want_gsnr else None, grad_var))
  return new_state, out


def eval_step(params, batch, *, graphdef) -> jax.Array:
  return loss_fn(params, graphdef, batch)


# --------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  """Everything `run` derives from a config before any compute."""
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  corpus_dir: pathlib.Path
  tx: optax.GradientTransformation
  lr_schedule: Callable
  local_batch: int
  eval_batch_size: int
  diag: diagnostics.DiagnosticsConfig | None


def validate(config: ml_collections.ConfigDict, mesh) -> tuple[int, int]:
  """Fails early on configs that cannot run; returns local and eval batch."""
  t = config.train
  n_dev, n_proc = mesh.devices.size, jax.process_count()
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
  if t.steps <= 0:
    raise ValueError(f"train.steps must be positive, got {t.steps}.")
  return t.batch_size // n_proc, eval_bs


def prepare_setup(config: ml_collections.ConfigDict, *,
                  devices=None, progress: bool = True) -> Setup:
  model_cfg = config_lib.to_model_config(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  local_batch, eval_bs = validate(config, mesh)
  if config.data.corpus_dir:  # already tokenized (e.g. carried to a cluster)
    corpus = pathlib.Path(config.data.corpus_dir)
  else:
    corpus = data.prepare_for_config(config, progress=progress)
  vocab = data.read_meta(corpus)["vocab_size"]
  if vocab > model_cfg.vocab_size:
    raise ValueError(f"the corpus was tokenized with {vocab} tokens but "
                     f"model.vocab_size is {model_cfg.vocab_size}.")
  tx, lr = optim.make_optimizer(config.optim, config.train.steps)
  return Setup(config, model_cfg, mesh, corpus, tx, lr, local_batch,
               eval_bs, diagnostics_config(config, model_cfg))


def diagnostics_config(config, model_cfg: ModelConfig
                       ) -> diagnostics.DiagnosticsConfig | None:
  d = config.diagnostics
  if not d.enabled or not model_cfg.quant.is_ternary:
    return None
  return diagnostics.DiagnosticsConfig(
      quant=model_cfg.quant, trap_steps=d.trap_steps,
      sample_size=d.sample_size, hist_bins=d.hist_bins, hist_max=d.hist_max,
      seed=config.seed)


def _load_pretrained(config, model_cfg: ModelConfig) -> Llama:
  overrides = {f: getattr(model_cfg, f) for f in RUN_FIELDS}
  model = pretrained.load_model(config.init.checkpoint, **overrides)
  diff = {f: (getattr(model.cfg, f), getattr(model_cfg, f))
          for f in ARCH_FIELDS if getattr(model.cfg, f) != getattr(model_cfg, f)}
  if diff:
    raise ValueError(
        f"init.checkpoint {config.init.checkpoint!r} disagrees with "
        "config.model on " + ", ".join(
            f"{k} (checkpoint {a}, config {b})" for k, (a, b) in diff.items()))
  return model


def new_state(params: dict, tx, diag) -> dict:
  """The train state around `params`: step, optimizer state, diagnostics."""
  state = dict(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=tx.init(params))
  if diag is not None:
    state["diag"] = diagnostics.init_state(params, diag)
  return state


def init_state(setup: Setup) -> tuple[Any, dict, Any]:
  """(graphdef, sharded train state, state shardings)."""
  cfg, tx, diag = setup.model_cfg, setup.tx, setup.diag
  fresh = lambda: new_state(model_lib.init_params(cfg, setup.config.seed), tx, diag)  # noqa: E731
  shardings = sharding.state_shardings(jax.eval_shape(fresh), setup.mesh)
  if setup.config.init.checkpoint:
    model = _load_pretrained(setup.config, cfg)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                            shardings["params"])
    del model
    state = jax.jit(lambda p: new_state(p, tx, diag), out_shardings=shardings,
                    donate_argnums=0)(params)
  else:
    state = jax.jit(fresh, out_shardings=shardings)()
  return model_lib.graphdef(cfg), state, shardings


def compile_steps(setup: Setup, graphdef, shardings):
  """(train step, its logging variant with full diagnostics, eval step)."""
  mesh = setup.mesh

  def make(full: bool):
    return jax.jit(
        lambda s, b: train_step(
            s, b, graphdef=graphdef, tx=setup.tx, lr_schedule=setup.lr_schedule,
            micro_batches=setup.config.train.micro_batches,
            diag=setup.diag, full_diagnostics=full,
            loss_chunk=setup.config.train.loss_chunk),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0)

  eval_fn = jax.jit(
      lambda p, b: eval_step(p, b, graphdef=graphdef),
      in_shardings=(shardings["params"], sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh))
  return make(False), make(setup.diag is not None), eval_fn


def evaluate(eval_fn, params, batches, mesh) -> dict:
  losses = [eval_fn(params, sharding.global_batch(b, mesh)) for b in batches]
  loss = float(np.mean(jax.device_get(losses)))
  return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)))


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------

class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag that the loop checks every step."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _fail(step: int, what: str, ckpt: checkpoint.Checkpointer):
  last = ckpt.latest_step()
  raise TrainingError(
      f"{what} at step {step}; stopping. The last good checkpoint "
      f"({'step ' + str(last) if last is not None else 'none'}) in "
      f"{ckpt.directory} is intact. Lower optim.lr or optim.clip_norm.")


def describe(config: ml_collections.ConfigDict, *, devices=None) -> dict:
  """Parameter count and train-state memory per device, without allocating."""
  model_cfg = config_lib.to_model_config(config.model)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  validate(config, mesh)
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  abstract = jax.eval_shape(lambda: new_state(
      model_lib.init_params(model_cfg), tx,
      diagnostics_config(config, model_cfg)))
  shardings = sharding.state_shardings(abstract, mesh)
  per_device = sum(
      int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
      for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  return dict(params=param_count(abstract["params"]),
              mesh=dict(mesh.shape), state_bytes=total,
              state_bytes_per_device=per_device)


def run(config: ml_collections.ConfigDict, workdir, *, devices=None,
        stop_at: int | None = None) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint).

  `stop_at` ends this invocation after that step (saving a checkpoint) while
  keeping the schedule of `config.train.steps`, as a preemption would.
  Returns a summary: final step, last train loss, held-out loss/perplexity
  before (at the first step of this run) and after.
  """
  t = config.train
  if t.distributed:
    jax.distributed.initialize()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json(indent=2))
  setup = prepare_setup(config, devices=devices, progress=t.progress)
  mesh = setup.mesh
  model_def, state, shardings = init_state(setup)
  n_params = param_count(state["params"])
  log.info("model: %.1fM parameters; mesh %s", n_params / 1e6, dict(mesh.shape))

  data_iter = data.train_iterator(
      setup.corpus_dir, seq_len=config.data.seq_len,
      batch_size=setup.local_batch, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads, prefetch=config.data.prefetch)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints",
                                 every=t.checkpoint_every,
                                 keep=t.keep_checkpoints,
                                 async_save=t.async_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    abstract = checkpoint.abstract_with_shardings(
        jax.eval_shape(lambda: state), shardings)
    del state
    state, stale = ckpt.restore(start, abstract, data_iter,
                                rebuildable=("diag",))
    if setup.diag is not None and "diag" in stale:
      state["diag"] = jax.jit(diagnostics.init_state, static_argnums=1,
                              out_shardings=shardings["diag"])(
                                  state["params"], setup.diag)
      log.warning("the checkpoint's deadzone trap counters do not fit this "
                  "version's diagnostics: they restart from step %d.", start)
    log.info("resumed from step %d", start)
  start = start or 0

  step_fns = compile_steps(setup, model_def, shardings)
  eval_fn = step_fns[2]
  float_eval_fn = None
  if config.init.checkpoint and setup.model_cfg.quant.is_ternary and start == 0:
    float_cfg = setup.model_cfg.replace(
        quant=dataclasses.replace(setup.model_cfg.quant, method="none"))
    float_eval_fn = compile_steps(setup, model_lib.graphdef(float_cfg), shardings)[2]
  eval_data = data.eval_batches(setup.corpus_dir, seq_len=config.data.seq_len,
                                batch_size=setup.eval_batch_size,
                                max_batches=t.eval_batches)
  writer = metrics.MetricWriter(workdir, tensorboard=t.tensorboard)
  summary = dict(start_step=start, params=n_params)
  try:
    if float_eval_fn is not None:  # what the float checkpoint scores
      summary["eval_float"] = evaluate(float_eval_fn, state["params"],
                                       eval_data, mesh)
      writer.write(start, summary["eval_float"], "eval_float")
      log.info("pretrained float model: held-out loss %.4f perplexity %.2f",
               summary["eval_float"]["loss"],
               summary["eval_float"]["perplexity"])
    summary["eval_before"] = evaluate(eval_fn, state["params"], eval_data, mesh)
    writer.write(start, summary["eval_before"], "eval")
    log.info("step %d held-out loss %.4f perplexity %.2f", start,
             summary["eval_before"]["loss"], summary["eval_before"]["perplexity"])
    state, last = _loop(setup, state, data_iter, step_fns, eval_data, ckpt,
                        writer, start, stop_at or t.steps)
    summary.update(last)
    summary["eval_after"] = evaluate(eval_fn, state["params"], eval_data, mesh)
    writer.write(summary["step"], summary["eval_after"], "eval")
    log.info("step %d held-out loss %.4f perplexity %.2f", summary["step"],
             summary["eval_after"]["loss"], summary["eval_after"]["perplexity"])
  finally:
    writer.close()
    ckpt.close()
  return summary


@jax.jit
def _all_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(params)]))


def _loop(setup: Setup, state, data_iter, step_fns, eval_data, ckpt, writer,
          start: int, stop_at: int):
  config, mesh = setup.config, setup.mesh
  t = config.train
  step_fn, log_step_fn, eval_fn = step_fns
  tokens_per_step = t.batch_size * config.data.seq_len
  pending = None  # (step, device metrics) fetched one step late
  last = dict(step=start, loss=float("nan"), stopped_by=None)
  bar = tqdm.tqdm(total=t.steps, initial=start, unit="step",
                  disable=not t.progress or jax.process_index() != 0)
  tick, tick_step = time.perf_counter(), start

  def finish(step, device_metrics):
    nonlocal tick, tick_step
    m = metrics.to_python(device_metrics)
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      _fail(step, f"non-finite loss ({m['loss']}) or gradient norm "
            f"({m['grad_norm']})", ckpt)
    last.update(step=step, loss=m["loss"])
    if step % t.log_every == 0 or step == t.steps:
      now = time.perf_counter()
      m["tokens_per_s"] = (step - tick_step) * tokens_per_step / (now - tick)
      tick, tick_step = now, step
      writer.write(step, m)
      bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}",
                      tok_s=f"{m['tokens_per_s']:.0f}")

  with _StopSignal() as stop:
    step = start
    while step < min(t.steps, stop_at):
      batch = sharding.global_batch(next(data_iter), mesh)
      logging_step = (step + 1) % t.log_every == 0 or step + 1 == t.steps
      state, device_metrics = (log_step_fn if logging_step else step_fn)(
          state, batch)
      step += 1
      bar.update(1)
      if pending is not None:
        finish(*pending)
      pending = (step, device_metrics)
      if step % t.eval_every == 0 and step < t.steps:
        ev = evaluate(eval_fn, state["params"], eval_data, mesh)
        writer.write(step, ev, "eval")
      if (step % t.checkpoint_every == 0 or stop.received
          or step in (t.steps, stop_at)):
        finish(*pending)  # never checkpoint a state that is not finite
        pending = None
        if not bool(_all_finite(state["params"])):
          _fail(step, "non-finite parameters after the update", ckpt)
        ckpt.save(step, state, data_iter, force=True)
      if stop.received:
        log.warning("%s received: saved step %d, exiting.", stop.received, step)
        last["stopped_by"] = stop.received
        break
    if pending is not None:
      finish(*pending)
  bar.close()
  return state, last
