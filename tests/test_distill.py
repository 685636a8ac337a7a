"""Distillation (`config.distill`): the KD and relation losses against numpy
references, chunked = unchunked, the teacher untouched by training (FSDP and
shard_map included), distill off = today's step, resume exact, a changed
teacher refused."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tequila_jax import checkpoint, config_lib, distill, losses, metrics, train
from tequila_jax import model as model_lib
from tequila_jax import workdir as workdir_lib
from tests import cli
from tests.conftest import CORPORA
from tests.test_trainer import ROOT, TINY, _losses, _params, _tiny
from tests.tolerances import (assert_within, chain_atol, llama_depth,
                              llama_k, sum_order_bound)


# --------------------------------------------------------------------------
# numpy references, written from the formulas (float64)
# --------------------------------------------------------------------------

def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kd(student, teacher, temperature, kind):
  """T² Σ_v p (log p − log q) per position, p the teacher's softened
  distribution for "kl", the student's for "reverse_kl"."""
  s = _np_log_softmax(np.float64(student) / temperature)
  t = _np_log_softmax(np.float64(teacher) / temperature)
  if kind == "reverse_kl":
    s, t = t, s
  return temperature**2 * (np.exp(t) * (t - s)).sum(-1)


def _np_relation_kl(student, teacher, heads):
  """Mean over batch, heads, rows of KL(softmax(A Aᵀ/√d) teacher ‖ student)."""
  def rel(a):
    b, t, n = a.shape
    d = n // heads
    a = np.float64(a).reshape(b, t, heads, d).transpose(0, 2, 1, 3)
    return _np_log_softmax(a @ a.transpose(0, 1, 3, 2) / np.sqrt(d))
  s, t = rel(student), rel(teacher)
  return (np.exp(t) * (t - s)).sum(-1).mean()


@pytest.mark.parametrize("kind", distill.KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_divergence_matches_numpy(kind, temperature):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 2, 3, 40)) * 3
  got = distill.kd_divergence(jnp.asarray(s, jnp.float32),
                              jnp.asarray(t, jnp.float32), temperature, kind)
  np.testing.assert_allclose(got, _np_kd(s, t, temperature, kind),
                             rtol=2e-5, atol=1e-6)
  assert (np.asarray(got) >= -1e-6).all()
  same = distill.kd_divergence(jnp.asarray(t), jnp.asarray(t), temperature,
                               kind)
  np.testing.assert_allclose(same, 0, atol=1e-5)


@pytest.mark.parametrize("chunk", [12, 4])
def test_relation_kl_matches_numpy_chunked_or_not(chunk):
  rng = np.random.default_rng(1)
  # The teacher may be wider than the student: only T x T relations meet.
  s = rng.normal(size=(2, 12, 64))
  t = rng.normal(size=(2, 12, 96))
  got = distill.relation_kl(jnp.asarray(s, jnp.float32),
                            jnp.asarray(t, jnp.float32), 4, chunk)
  np.testing.assert_allclose(got, _np_relation_kl(s, t, 4), rtol=1e-5)
  np.testing.assert_allclose(
      distill.relation_kl(jnp.asarray(t, jnp.float32),
                          jnp.asarray(t, jnp.float32), 4, chunk), 0, atol=1e-6)


def _models(method="tequila", dtype="float32"):
  """A tiny student and a float teacher of other weights, with tokens."""
  config = config_lib.tiny(method)
  config.model.dtype = dtype
  cfg = config_lib.to_model_config(config.model)
  float_cfg = cfg.replace(quant=config_lib.QuantConfig(method="none"))
  student = model_lib.init_params(cfg, 0)
  teacher = model_lib.init_params(float_cfg, 1)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 33)))
  return cfg, float_cfg, student, teacher, tokens


@pytest.mark.parametrize("kind", distill.KINDS)
def test_objective_matches_numpy_and_chunks_agree(kind):
  cfg, float_cfg, student, teacher, tokens = _models()
  d = distill.DistillConfig(weight=0.7, ce_weight=0.4, temperature=2.0,
                            kind=kind, attention_weight=0.3, attention_layer=1,
                            attention_heads=2)
  gd, tgd = model_lib.graphdef(cfg), model_lib.graphdef(float_cfg)
  s_model, t_model = nnx.merge(gd, student), nnx.merge(tgd, teacher)
  inputs, targets = tokens[:, :-1], np.asarray(tokens[:, 1:])
  s_logits, t_logits = np.asarray(s_model(inputs)), np.asarray(t_model(inputs))
  ce = -np.take_along_axis(_np_log_softmax(np.float64(s_logits)),
                           targets[..., None], -1).mean()
  kd = _np_kd(s_logits, t_logits, 2.0, kind).mean()
  _, qkv_s = s_model.hidden_states_and_qkv(inputs, 1)
  _, qkv_t = t_model.hidden_states_and_qkv(inputs, 1)
  att = sum(_np_relation_kl(np.asarray(a), np.asarray(b), 2)
            for a, b in zip(qkv_s, qkv_t))
  want = 0.4 * ce + 0.7 * kd + 0.3 * att
  results = {}
  for chunk in (0, 8):
    loss, parts = distill.objective(student, gd, teacher, tgd, tokens, d,
                                    loss_chunk=chunk)
    np.testing.assert_allclose(parts["ce_loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(parts["kd_loss"], kd, rtol=1e-4)
    np.testing.assert_allclose(parts["attention_loss"], att, rtol=1e-4)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    results[chunk] = jax.grad(lambda p: distill.objective(  # noqa: B023
        p, gd, teacher, tgd, tokens, d, loss_chunk=chunk)[0])(student)
  # Chunked and not: two programs, sums in their own orders (atol per leaf,
  # tests/tolerances.py).
  k, depth = llama_k(cfg, tokens.size), llama_depth(cfg.num_layers, True)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[8])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=chain_atol(b, k, depth))


def test_captured_qkv_are_the_layers_projections():
  _, float_cfg, _, teacher, tokens = _models()
  m = nnx.merge(model_lib.graphdef(float_cfg), teacher)
  inputs = tokens[:, :-1]
  h, (q, k, v) = m.hidden_states_and_qkv(inputs, 0)
  # Not bit-identical: the blocks around the captured one are separate scans
  # (tests/tolerances.py).
  terms = llama_k(float_cfg, inputs.size)
  depth = llama_depth(float_cfg.num_layers)
  np.testing.assert_allclose(h, m.hidden_states(inputs), rtol=1e-5,
                             atol=chain_atol(h, terms, depth))
  x = np.float64(m.embed(inputs))  # layer 0's input, normed by hand
  norm = x / np.sqrt((x * x).mean(-1, keepdims=True) + float_cfg.rms_eps)
  norm = norm * np.asarray(teacher["layers"]["attn_norm"]["scale"][0])
  for got, name in zip((q, k, v), ("q_proj", "k_proj", "v_proj")):
    w = np.float64(teacher["layers"]["attn"][name]["kernel"][0])
    # fp32: the norm's mean of squares and the dot, `hidden` terms each.
    assert_within(got, norm @ w, sum_order_bound(
        np.abs(norm) @ np.abs(w), 2 * float_cfg.hidden_size + 4), name)
  # The last layer (-1), scanned or not, gives the same hidden states.
  unscanned = nnx.merge(model_lib.graphdef(float_cfg.replace(
      scan_layers=False)), teacher)
  for layer in (-1, 1):
    a = m.hidden_states_and_qkv(inputs, layer)
    b = unscanned.hidden_states_and_qkv(inputs, layer)
    for x_, y_ in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x_, y_, rtol=1e-4,
                                 atol=chain_atol(y_, terms, depth))


def test_weight_zero_objective_is_the_next_token_loss():
  """The distillation path's arithmetic at weight 0 is the plain loss (to
  rounding: its mean is chunked); the run itself does not take that path
  (`test_distill_off_is_todays_step`)."""
  cfg, float_cfg, student, teacher, tokens = _models()
  gd, tgd = model_lib.graphdef(cfg), model_lib.graphdef(float_cfg)
  d = distill.DistillConfig(weight=0.0, attention_heads=2)
  f = lambda p: distill.objective(p, gd, teacher, tgd, tokens, d)[0]  # noqa: E731
  g = lambda p: losses.next_token_loss(p, gd, tokens)  # noqa: E731
  np.testing.assert_allclose(f(student), g(student), rtol=1e-6)
  k, depth = llama_k(cfg, tokens.size), llama_depth(cfg.num_layers, True)
  for a, b in zip(jax.tree.leaves(jax.grad(f)(student)),
                  jax.tree.leaves(jax.grad(g)(student))):  # tests/tolerances
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=chain_atol(b, k, depth))


# --------------------------------------------------------------------------
# The step: the teacher is an argument, never trained, laid out like the state
# --------------------------------------------------------------------------

def _steps(config, n, devices=None):
  """`n` steps of `config`'s compiled step on fixed random batches: the
  losses, the final state and the Train."""
  tr = train.build_train(config, devices=devices)
  state = tr.init_state()
  step = tr.step_fn()
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    batch = jax.device_put(
        rng.integers(0, 258, (config.train.batch_size,
                              config.data.seq_len + 1)).astype(np.int32),
        train.build.sharding.batch_sharding(tr.mesh))
    state, m = step(state, batch, *tr.step_args())
    out.append(jax.device_get(m))
  return out, state, tr


def _distilling(**train_overrides):
  config = _tiny(**train_overrides)
  config.distill.update(weight=1.0, temperature=2.0, attention_weight=0.5)
  return config


def test_distill_off_is_todays_step():
  """distill.weight = 0 builds no teacher and the step of a config that never
  mentions distillation, whatever the other distill fields say."""
  plain = _tiny()
  off = _tiny()
  off.distill.update(weight=0.0, temperature=3.0, kind="reverse_kl",
                     teacher="nowhere", attention_layer=0)
  a, sa, tr = _steps(plain, 3)
  b, sb, tr_off = _steps(off, 3)
  assert tr_off.distill is None and tr_off.step_args() == ()
  assert [m["loss"] for m in a] == [m["loss"] for m in b]
  assert "kd_loss" not in b[0] and "ce_loss" not in b[0]
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)
  del tr


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh, parallelism", [((1, 1), "gspmd"),
                                               ((1, 8), "gspmd"),
                                               ((8, 1), "shard_map")],
                         ids=["one_device", "fsdp8", "shard_map8"])
def test_teacher_is_never_trained(mesh, parallelism):
  config = _distilling(batch_size=8, parallelism=parallelism)
  config.mesh.update(data=mesh[0], fsdp=mesh[1])
  devices = jax.devices()[:mesh[0] * mesh[1]]
  tr = train.build_train(config, devices=devices)
  before = jax.device_get(tr.teacher.params)
  ms, state, tr = _steps(config, 3, devices)
  teacher = tr.teacher.params
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(teacher)):
    assert not y.is_deleted()  # not donated
    np.testing.assert_array_equal(x, y)
    assert y.dtype == jnp.float32  # the tiny config's compute dtype
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(teacher)}
  assert any("fsdp" in s for s in specs) == (mesh[1] > 1), specs
  assert all(m["kd_loss"] > 0 and m["attention_loss"] > 0 for m in ms)
  np.testing.assert_allclose(
      [m["loss"] for m in ms],
      [m["ce_loss"] + m["kd_loss"] + 0.5 * m["attention_loss"] for m in ms],
      rtol=1e-6)
  assert not np.array_equal(  # while the student moved
      jax.device_get(state["params"]["embed"]["embedding"]),
      before["embed"]["embedding"])
  single, _, _ = _steps(_distilling(batch_size=8), 3,
                        jax.devices()[:1])
  np.testing.assert_allclose([m["loss"] for m in ms],
                             [m["loss"] for m in single], rtol=2e-5)


# --------------------------------------------------------------------------
# Runs: metrics, resume, the teacher's record
# --------------------------------------------------------------------------

# The runs' train fields: both resume tests below compile the same step.
RESUME = dict(steps=6, log_every=1, checkpoint_every=3, eval_every=100)


def test_resume_is_exact_with_distillation(tmp_path):
  train.run(_distilling(**RESUME), tmp_path / "straight")
  train.run(_distilling(**RESUME), tmp_path / "split", stop_at=3)
  second = train.run(_distilling(**RESUME), tmp_path / "split")
  assert second["start_step"] == 3 and second["step"] == 6
  a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
  assert sorted(a) == list(range(1, 7)) and a == b
  rows = [r for r in metrics.read_jsonl(tmp_path / "split" / "metrics.jsonl")
          if "train/loss" in r]
  assert all(r["train/kd_loss"] is not None and r["train/ce_loss"] is not None
             for r in rows)
  evals = [r for r in metrics.read_jsonl(tmp_path / "split" / "metrics.jsonl")
           if "eval/loss" in r]
  assert evals and not any("eval/kd_loss" in r for r in evals)
  for x, y in zip(jax.tree.leaves(_params(tmp_path / "straight", 6)),
                  jax.tree.leaves(_params(tmp_path / "split", 6))):
    np.testing.assert_array_equal(x, y)
  record = workdir_lib.read_teacher(tmp_path / "split")
  assert record["teacher"] == "initial weights (seed 0)"
  assert record["content_hash"] is None
  assert record["shapes"]["['embed']['embedding']"] == [512, 128]
  # A record whose shapes differ (another teacher) is refused after loading.
  record["shapes"]["['embed']['embedding']"] = [512, 64]
  workdir_lib.write_teacher(tmp_path / "split", record)
  with pytest.raises(ValueError, match=r"differ in shape: \['embed'\]"):
    train.run(_distilling(**RESUME), tmp_path / "split")


def test_resume_refuses_a_changed_or_missing_teacher(tmp_path, tiny_run):
  """The teacher is a training workdir; once its files change, resuming the
  distilled run is refused, by the CLI, with one line and exit status 2.
  Once it is moved away, the refusal names it missing, where it was, and
  the fixes (allow_config_change alone cannot distill from nothing);
  pointing to its new place on purpose resumes. The teacher: the session's
  `tiny_run` as it was at step 10, which then goes on to its step 12."""
  shutil.copytree(tiny_run, tmp_path / "teacher")
  shutil.rmtree(tmp_path / "teacher" / "checkpoints" / "12")
  config = _distilling(**RESUME)
  config.distill.teacher = str(tmp_path / "teacher")
  train.run(config, tmp_path / "student", stop_at=3)
  record = json.loads((tmp_path / "student" / "teacher.json").read_text())
  assert record["teacher"] == str(tmp_path / "teacher")
  assert len(record["content_hash"]) == 16
  # The teacher run goes on: its files change.
  shutil.copytree(tiny_run / "checkpoints" / "12",
                  tmp_path / "teacher" / "checkpoints" / "12")
  out = cli.run_cli(
      "train", f"--config={TINY}", f"--workdir={tmp_path / 'student'}",
      f"--config.data.cache_dir={CORPORA}",
      *(f"--config.train.{k}={v}" for k, v in RESUME.items()),
      "--config.train.async_checkpoints=False",
      "--config.distill.weight=1.0", "--config.distill.temperature=2.0",
      "--config.distill.attention_weight=0.5",
      f"--config.distill.teacher={tmp_path / 'teacher'}", check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "content hash" in lines[-1]
  assert "Restore that teacher" in lines[-1]
  assert checkpoint.restore_state(tmp_path / "student")["step"] == 3

  (tmp_path / "teacher").rename(tmp_path / "moved")
  files = lambda: {p.name: p.read_bytes()  # noqa: E731
                   for p in (tmp_path / "student").iterdir() if p.is_file()}
  before = files()
  was = re.escape(str(tmp_path / "teacher"))
  for allow in (False, True):
    config.train.allow_config_change = allow
    with pytest.raises(ValueError, match=(
        rf"distilled from the teacher '{was}' \(content hash \w{{16}}\), but "
        rf"'{was}' is missing \(moved or deleted\)\. Restore it there, point "
        r"--config.distill.teacher to where it is now and pass "
        r"--config.train.allow_config_change=True")):
      train.run(config, tmp_path / "student")
  assert files() == before
  config.distill.teacher = str(tmp_path / "moved")
  summary = train.run(config, tmp_path / "student")
  assert summary["start_step"] == 3 and summary["step"] == 6
  assert workdir_lib.read_teacher(tmp_path / "student")["teacher"] == str(
      tmp_path / "moved")


def test_enabling_distillation_on_an_older_run_is_a_config_change():
  stored = _tiny().to_dict()
  del stored["distill"]  # a run of a version before distillation
  stored = config_lib.ml_collections.ConfigDict(stored)
  config = _tiny()
  assert train.resume.config_changes(stored, config) == []
  config.distill.weight = 1.0
  assert train.resume.config_changes(stored, config) == [
      "distill.weight: 0.0 -> 1.0"]


def test_bad_distill_configs_are_refused():
  for field, value, match in [
      ("kind", "jsd", "choose one of"), ("temperature", 0.0, "must be > 0"),
      ("attention_layer", 2, "not a layer"), ("weight", -1.0, ">= 0")]:
    config = _tiny()
    config.distill.update(**{"weight": 1.0, field: value})
    with pytest.raises(ValueError, match=match):
      train.build_train(config, devices=jax.devices()[:1])
  config = _tiny()
  config.distill.ce_weight = 0.5
  with pytest.raises(ValueError, match="only rescale"):
    train.build_train(config, devices=jax.devices()[:1])
  config = _distilling()
  config.distill.attention_heads = 3
  with pytest.raises(ValueError, match="does not divide"):
    train.build_train(config, devices=jax.devices()[:1]).teacher  # noqa: B018


def test_sweep_runs_and_benchmark_candidates_distill():
  from experiments import bench_train_step, reproduce_smollm2, sweep  # pylint: disable=g-import-not-at-top
  points = sweep.grid(["distill"])
  assert [p.get("distill.kind") for p in points] == [None, "kl", "reverse_kl"]
  for p in points:
    config = _tiny()
    config.update_from_flattened_dict(p)
    tr = train.build_train(config, devices=jax.devices()[:1])
    assert (tr.distill is None) == (p["distill.weight"] == 0)
  runs = list(reproduce_smollm2.RUNS)
  assert runs[runs.index("tequila_kd-s0"):][:2] == ["tequila_kd-s0",
                                                    "absmean_kd-s0"]
  assert reproduce_smollm2.RUNS["absmean_kd-s0"]["distill.weight"] == 1.0
  assert bench_train_step.parse_candidate("tequila:distill.weight=1.0") == (
      "tequila", "", {"distill.weight": 1.0})


@pytest.mark.multidevice
def test_1b_dry_run_states_the_teachers_bytes():
  config = config_lib.load_config_file(str(ROOT / "configs" / "llama1b.py"))
  config.mesh.update(data=1, fsdp=8)
  config.train.batch_size = 8
  config.distill.weight = 1.0
  d = train.describe(config)
  # Float parameters (no learned quantizer state) in bf16.
  float_cfg = config_lib.to_model_config(config.model).replace(
      quant=config_lib.QuantConfig(method="none"))
  n = model_lib.param_count(jax.eval_shape(
      lambda: model_lib.init_params(float_cfg)))
  assert round(n / 1e9, 2) == 1.24
  assert d["teacher_bytes"] == 2 * n
  assert abs(d["teacher_bytes_per_device"] / (d["teacher_bytes"] / 8) - 1) < 0.01


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_distill_like_one(tmp_path):
  from tests.test_multiprocess import STEPS, _launch  # pylint: disable=g-import-not-at-top
  config = _tiny(**STEPS)
  config.mesh.update(data=4, fsdp=2)
  config.diagnostics.enabled = False
  config.distill.weight = 1.0
  train.run(config, tmp_path / "single")
  _launch(tmp_path / "two", **{"mesh.fsdp": 2, "distill.weight": 1.0})
  a, b = _losses(tmp_path / "single"), _losses(tmp_path / "two")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=2e-5)
