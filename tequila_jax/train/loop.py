"""`run(config, workdir)`: the training loop around `train_step`.

`run` builds the train state abstractly, refuses what a resumed run may not
change (`resume`), derives its shardings over a `(data, fsdp)` mesh,
materializes it (random or from a pretrained checkpoint) directly in that
layout, restores the latest orbax checkpoint if there is one, and runs one
compiled, donated step per batch. Metrics are fetched one step late so the
host never waits on the device; a SIGTERM/SIGINT saves a checkpoint and
exits cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from tequila_jax import checkpoint, data, diagnostics, metrics, sharding
from tequila_jax import model as model_lib
from tequila_jax import workdir as workdir_lib
from tequila_jax.errors import ExpectedError
from tequila_jax.io import locations
from tequila_jax.quant import QuantConfig
from tequila_jax.train import resume
from tequila_jax.train.build import Train, build_train, pretrained_params

log = logging.getLogger("tequila_jax")


class TrainingError(ExpectedError, RuntimeError):
  pass


def held_out_loss(eval_fn, params, batches, mesh) -> dict:
  losses = [eval_fn(params, sharding.replicated_batch(b, mesh))
            for b in batches]
  loss = float(np.mean(jax.device_get(losses)))
  return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)))


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


# A run stopped by SIGINT / SIGTERM after its checkpoint exits 128 + signal.
STOPPED_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)


def exit_code(summary: dict) -> int:
  """The exit status for a run's summary: 0 when it finished or reached
  `stop_at`, 130 / 143 when a signal stopped it (resumable)."""
  stopped = summary.get("stopped_by")
  return 128 + signal.Signals[stopped].value if stopped else 0


def _fail(step: int, what: str, ckpt: checkpoint.Checkpointer,
          resumed: int | None = None):
  """Stops the run. `resumed`: the checkpoint step this run resumed from
  if it has saved none since, which is then not called good (the fault may
  be in it)."""
  if resumed is not None:
    earlier = [s for s in ckpt.steps() if s < resumed]
    raise TrainingError(
        f"{what} at step {step}, {step - resumed} steps after resuming from "
        f"the checkpoint of step {resumed}, which may hold the fault. Resume "
        "from an earlier one with --config.train.restore_step="
        f"{earlier[-1] if earlier else 'STEP'} (steps {ckpt.steps()}), or "
        "lower optim.lr or optim.clip_norm.")
  last = ckpt.latest_step()
  raise TrainingError(
      f"{what} at step {step}; stopping. The last good checkpoint "
      f"({'step ' + str(last) if last is not None else 'none'}) in "
      f"{ckpt.directory} is intact. Lower optim.lr or optim.clip_norm.")


def run(config: ml_collections.ConfigDict, workdir, *, devices=None,
        stop_at: int | None = None) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds a checkpoint).

  `stop_at` ends this invocation after that step (saving a checkpoint) while
  keeping the schedule of `config.train.steps`, as a preemption would.
  Returns a summary: final step, last train loss, held-out loss/perplexity
  before (at the first step of this run) and after.
  """
  if config.train.distributed:
    initialize_distributed(config.train)
  # Everything that can refuse the command does so before anything is
  # written; what the checks compare with is written once the state is
  # restored (or initialized: `resume.record`), so a refused or failed
  # start leaves it.
  tr = build_train(config, devices=devices)
  abstract = tr.abstract_state()  # traces the model: refuses e.g. group_size
  workdir = pathlib.Path(workdir)
  resume.check_config(config, workdir)
  resume.check_layout(workdir, abstract)
  teacher = resume.check_teacher(tr, workdir)
  corpus = _corpus(tr)
  resume.check_corpus(config, workdir, corpus)
  workdir.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0
  with workdir_lib.workdir_lock(workdir) if main else contextlib.nullcontext():
    # A signal from here on (compilation included) is a flag the run checks:
    # an interrupt inside XLA's compiler could crash the process.
    with _StopSignal() as stop:
      return _run(tr, workdir, corpus, stop_at, stop, teacher)


def _corpus(tr: Train) -> pathlib.Path:
  """The run's tokenized corpus (prepared now unless `data.corpus_dir`)."""
  config = tr.config
  corpus = (pathlib.Path(config.data.corpus_dir) if config.data.corpus_dir
            else data.prepare_for_config(config, locations.load_tokenizer,
                                         progress=config.train.progress))
  vocab = data.read_meta(corpus)["vocab_size"]
  if vocab > tr.model_cfg.vocab_size:
    raise ValueError(f"the corpus was tokenized with {vocab} tokens but "
                     f"model.vocab_size is {tr.model_cfg.vocab_size}.")
  return corpus


def initialize_distributed(t: ml_collections.ConfigDict) -> None:
  """JAX's multi-controller runtime (`jax.distributed.initialize`) for this
  process, once; unset fields are detected from the cluster (SLURM, Open
  MPI, Kubernetes) or JAX's environment variables."""
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(
      coordinator_address=t.coordinator_address or None,
      num_processes=t.num_processes or None,
      process_id=None if t.process_id < 0 else t.process_id)
  log.info("process %d of %d: %d local devices of %d", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def _compiled_step(tr: Train, full_diagnostics: bool = False):
  """The train step (its logging-step variant if `full_diagnostics`)
  compiled ahead of the first batch, its memory logged."""
  t = tr.config.train
  batch = jax.ShapeDtypeStruct((t.batch_size, tr.config.data.seq_len + 1),
                               jnp.int32, sharding=sharding.batch_sharding(
                                   tr.mesh))
  compiled = tr.step_fn(full_diagnostics).lower(
      tr.abstract_state(), batch, *tr.step_args()).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    log.info("train step memory per device: arguments %.1f MiB, outputs "
             "%.1f MiB, temporaries %.1f MiB (aliased %.1f MiB)",
             *(getattr(mem, f"{k}_size_in_bytes", 0) / 2**20 for k in
               ("argument", "output", "temp", "alias")))
  return compiled


def _run(tr: Train, workdir: pathlib.Path, corpus: pathlib.Path,
         stop_at: int | None, stop: _StopSignal, teacher: dict | None) -> dict:
  config, mesh = tr.config, tr.mesh
  t = config.train
  main = jax.process_index() == 0
  data_iter = data.train_iterator(
      corpus, seq_len=config.data.seq_len, batch_size=tr.local_batch,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(),
      num_threads=config.data.num_threads, prefetch=config.data.prefetch)
  ckpt = checkpoint.Checkpointer(workdir, every=t.checkpoint_every,
                                 keep=t.keep_checkpoints,
                                 async_save=t.async_checkpoints)
  start = None
  if ckpt.steps():  # the checkpoint holds the state: nothing to initialize
    state, start, stale = _restore(tr, ckpt, data_iter)
    if tr.diag is not None and "diag" in stale:
      state["diag"] = jax.jit(diagnostics.init_state, static_argnums=1,
                              out_shardings=tr.shardings["diag"])(
                                  state["params"], tr.diag)
      log.warning("the checkpoint's deadzone trap counters do not fit this "
                  "version's diagnostics: they restart from step %d.", start)
    log.info("resumed from step %d", start)
  else:
    state = tr.init_state(pretrained_params(config, tr.model_cfg)
                          if config.init.checkpoint else None)
  n_params = model_lib.param_count(state["params"])
  log.info("model: %.1fM parameters; mesh %s", n_params / 1e6, dict(mesh.shape))
  if main:  # the state restored: this config and corpus are the run's now
    resume.record(workdir, config, corpus, teacher)
  resumed, start = start, start or 0

  # Logging steps differ only by diagnostics; with log_every=1 every step
  # logs, so the plain step would never run (and is not compiled).
  every_step_logs = tr.diag is not None and t.log_every == 1
  compiled = _compiled_step(tr, full_diagnostics=every_step_logs)
  step_fns = (compiled, compiled if tr.diag is None or every_step_logs
              else tr.step_fn(full_diagnostics=True))
  eval_fn = tr.eval_fn()
  float_eval_fn = None
  if config.init.checkpoint and tr.model_cfg.quant.is_ternary and start == 0:
    float_eval_fn = tr.eval_fn(QuantConfig("none"))
  eval_data = data.eval_batches(corpus, seq_len=config.data.seq_len,
                                batch_size=tr.eval_batch_size,
                                max_batches=t.eval_batches)
  summary = dict(start_step=start, params=n_params)
  if stop.received:  # during start-up: nothing to save
    log.warning("%s received during start-up: exiting.", stop.received)
    ckpt.close()
    return dict(summary, step=start, loss=float("nan"),
                stopped_by=stop.received)
  logged_loss = _logged_loss(workdir, start)
  writer = metrics.MetricWriter(workdir, tensorboard=t.tensorboard,
                                resume_step=start)
  try:
    if float_eval_fn is not None:  # what the float checkpoint scores
      summary["eval_float"] = held_out_loss(float_eval_fn, state["params"],
                                            eval_data, mesh)
      writer.write(start, summary["eval_float"], "eval_float")
      log.info("pretrained float model: held-out loss %.4f perplexity %.2f",
               summary["eval_float"]["loss"],
               summary["eval_float"]["perplexity"])
    summary["eval_before"] = held_out_loss(eval_fn, state["params"], eval_data,
                                           mesh)
    writer.write(start, summary["eval_before"], "eval")
    log.info("step %d held-out loss %.4f perplexity %.2f", start,
             summary["eval_before"]["loss"], summary["eval_before"]["perplexity"])
    state, last = _loop(tr, state, data_iter, step_fns, eval_fn, eval_data,
                        ckpt, writer, start, stop_at or t.steps, stop,
                        resumed, logged_loss)
    summary.update(last)
    summary["eval_after"] = held_out_loss(eval_fn, state["params"], eval_data,
                                          mesh)
    writer.write(summary["step"], summary["eval_after"], "eval")
    log.info("step %d held-out loss %.4f perplexity %.2f", summary["step"],
             summary["eval_after"]["loss"], summary["eval_after"]["perplexity"])
  finally:
    writer.close()
    ckpt.close()
  return summary


def _logged_loss(workdir: pathlib.Path, step: int) -> float:
  """The train loss the metrics file holds for `step` (NaN if none): a run
  resumed at its last step runs no step, and reports this one."""
  path = workdir / workdir_lib.METRICS
  if not step or not path.exists():
    return float("nan")
  losses_ = [r["train/loss"] for r in metrics.read_jsonl(path)
             if r.get("step") == step and r.get("train/loss") is not None]
  return losses_[-1] if losses_ else float("nan")


def _restore(tr: Train, ckpt: checkpoint.Checkpointer, data_iter):
  """`(state, step, stale keys)` of the checkpoint to resume from:
  `train.restore_step`, or the latest; one that cannot be read, fails its
  integrity check or holds non-finite values (parameters or optimizer
  state) is set aside (renamed) and the one before it tried. Checkpoints
  after a chosen `restore_step` are set aside too."""
  steps, chosen = ckpt.steps(), tr.config.train.restore_step
  if chosen >= 0:
    if chosen not in steps:
      raise ValueError(f"train.restore_step={chosen}: {ckpt.directory} holds "
                       f"steps {steps}.")
    for later in [s for s in steps if s > chosen]:
      log.warning("train.restore_step=%d: %s", chosen,
                  ckpt.set_aside(later, "superseded"))
    steps = [s for s in steps if s <= chosen]
  for step in reversed(steps):
    try:
      state, stale = ckpt.restore(step, tr.abstract_state(), data_iter,
                                  rebuildable=("diag",))
    except checkpoint.CheckpointCorrupted as e:
      problem = e.problem  # what was found: the file or the leaf
    except Exception as e:  # pylint: disable=broad-except
      problem = f"cannot be read ({type(e).__name__}: {str(e)[:200]})"
    else:
      # The diagnostics' state holds NaN by design ("no window yet").
      if bool(_all_finite({k: v for k, v in state.items() if k != "diag"})):
        return state, step, stale
      problem = "holds non-finite parameters or optimizer state"
    log.error("the checkpoint of step %d %s: %s", step, problem,
              ckpt.set_aside(step, "damaged"))
  raise TrainingError(f"no checkpoint in {ckpt.directory} can be restored "
                      "(see the errors above); move the directory away to "
                      "start afresh.")


@jax.jit
def _all_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(params)]))


def _loop(tr: Train, state, data_iter, step_fns, eval_fn, eval_data, ckpt,
          writer, start: int, stop_at: int, stop: _StopSignal,
          resumed: int | None, logged_loss: float):
  config, mesh = tr.config, tr.mesh
  t = config.train
  step_fn, log_step_fn = step_fns
  step_args = tr.step_args()  # the teacher, when distilling
  tokens_per_step = t.batch_size * config.data.seq_len
  pending = None  # (step, device metrics) fetched one step late
  last = dict(step=start, loss=logged_loss, stopped_by=None)
  saved = False  # whether this run has saved a checkpoint
  bar = tqdm.tqdm(total=t.steps, initial=start, unit="step",
                  # None: a bar on a terminal only; logs get one line per
                  # logging step instead (below).
                  disable=None if t.progress and jax.process_index() == 0
                  else True)
  tick, tick_step = time.perf_counter(), start

  def finish(step, device_metrics):
    nonlocal tick, tick_step
    m = metrics.to_python(device_metrics)
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      _fail(step, f"non-finite loss ({m['loss']}) or gradient norm "
            f"({m['grad_norm']})", ckpt, None if saved else resumed)
    last.update(step=step, loss=m["loss"])
    if step % t.log_every == 0 or step == t.steps:
      now = time.perf_counter()
      m["tokens_per_s"] = (step - tick_step) * tokens_per_step / (now - tick)
      tick, tick_step = now, step
      writer.write(step, m)
      bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}",
                      tok_s=f"{m['tokens_per_s']:.0f}")
      if bar.disable and t.progress:
        log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s", step, t.steps,
                 m["loss"], m["lr"], m["tokens_per_s"])

  step = start
  while step < min(t.steps, stop_at):
    batch = sharding.global_batch(next(data_iter), mesh)
    logging_step = (step + 1) % t.log_every == 0 or step + 1 == t.steps
    state, device_metrics = (log_step_fn if logging_step else step_fn)(
        state, batch, *step_args)
    step += 1
    bar.update(1)
    if pending is not None:
      finish(*pending)
    pending = (step, device_metrics)
    if step % t.eval_every == 0 and step < t.steps:
      ev = held_out_loss(eval_fn, state["params"], eval_data, mesh)
      writer.write(step, ev, "eval")
    if (step % t.checkpoint_every == 0 or stop.received
        or step in (t.steps, stop_at)):
      finish(*pending)  # never checkpoint a state that is not finite
      pending = None
      if not bool(_all_finite(state["params"])):
        _fail(step, "non-finite parameters after the update", ckpt,
              None if saved else resumed)
      ckpt.save(step, state, data_iter, force=True)
      saved = True
    ckpt.check()  # an asynchronous save that failed stops the run now
    if stop.received:
      log.warning("%s received: saved step %d, exiting.", stop.received, step)
      last["stopped_by"] = stop.received
      break
  if pending is not None:
    finish(*pending)
  bar.close()
  return state, last
