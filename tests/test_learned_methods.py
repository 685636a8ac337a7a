"""Learned quantizers (lsq, seq, dlt) and learned λ through the whole
library: model parameters, training and exact resume, loaders, exports and
the packed CPU model. The quantizer math itself is checked against the
references in test_quant_learned_reference.py."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from tequila_jax import config_lib, diagnostics, optim, quant, train
from tequila_jax import model as model_lib
from tequila_jax.inference import InferenceSettings, PackedLlama
from tequila_jax.io import gguf, hf, load, locations, tokenizers, tqj
from tequila_jax.quant import QuantConfig
from tests.conftest import tiny_model_config
from tests.test_trainer import _losses, _state, _tiny
from tests.tolerances import (assert_within, chain_atol, llama_depth,
                              llama_k, settle_codes, sum_order_bound)

# Every learned configuration, with the reference layout (per_channel) and
# the others represented.
LEARNED = {
    "lsq": QuantConfig("lsq", group_size=64),
    "seq": QuantConfig("seq", "per_channel"),
    "dlt": QuantConfig("dlt", group_size=64),
    "dlt_tensor": QuantConfig("dlt", "per_tensor"),
    "lam_layer": QuantConfig("tequila", group_size=64, lam=0.05,
                             lam_mode="per_layer"),
    "lam_channel": QuantConfig("tequila", "per_channel", lam=0.05,
                               lam_mode="per_channel"),
    "lam_v3": QuantConfig("tequila", group_size=64, lam_mode="v3",
                          lam_std=0.05),
}


def _model(qcfg: QuantConfig, tie=True, **arch) -> model_lib.Llama:
  """A tiny fp32 model off its init: weights moved, learned α shrunk below
  max|W| (so that some weights clip), γ and θ non-zero."""
  cfg = tiny_model_config().replace(
      quant=qcfg, tie_embeddings=tie, **arch)
  m = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(m, nnx.Param))
  keys = iter(jax.random.split(jax.random.key(1), 100))

  def move(path, a):
    name = path[-1].key
    noise = jax.random.normal(next(keys), a.shape)
    if name == "alpha":
      return a * (0.7 + 0.2 * jax.random.uniform(next(keys), a.shape))
    if name == "gamma":
      return 0.01 * noise
    if name == "lam_log":
      return 0.5 * noise
    return a + 0.02 * noise

  nnx.update(m, jax.tree_util.tree_map_with_path(move, state))
  return settle_codes(m)  # codes free of summation order (tests/tolerances)


def _tokens(batch=2, length=24, seed=2):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 512,
                                                          (batch, length)))


def test_layers_carry_their_learned_parameters():
  for name, qcfg in LEARNED.items():
    params = model_lib.init_params(
        tiny_model_config().replace(
            quant=qcfg))
    q = params["layers"]["attn"]["q_proj"]
    kernel = q["kernel"]  # [layers, in, out]
    if qcfg.learned_scale:
      want = jax.vmap(lambda w: quant.init_qparams(w, qcfg))(kernel)["alpha"]
      np.testing.assert_array_equal(q["alpha"], want)
      if qcfg.granularity == "per_group":  # max|W| of each group of 64
        np.testing.assert_array_equal(
            q["alpha"][0, 1], np.abs(kernel[0, 64:128]).max(0))
    assert ("gamma" in q) == (qcfg.method == "dlt"), name
    assert ("lam_log" in q) == (qcfg.lam_mode in ("per_layer",
                                                  "per_channel")), name
    if qcfg.lam_mode == "v3":
      assert q["lam_weight"].shape == kernel.shape
      assert 0.04 < float(jnp.std(q["lam_weight"])) < 0.06
  axes = model_lib.param_axes(config_lib.to_model_config(
      config_lib.tiny().model).replace(quant=LEARNED["dlt"]))
  assert tuple(axes["layers"]["mlp"]["down_proj"]["alpha"]) == (
      "layers", "groups", "embed")


@pytest.mark.parametrize("name", list(LEARNED))
def test_export_and_packed_model_equal_the_qat_forward(name, tmp_path):
  """.tqj keeps Q = codes · alpha (+ γ) and c exactly; PackedLlama's logits
  equal the QAT forward (exact and lut kernels)."""
  m = _model(LEARNED[name])
  path = tmp_path / "m.tqj"
  tqj.write_export(m, path, tokenizer=tokenizers.ByteTokenizer())
  ex = tqj.read_export(path)
  assert ex.cfg.arch == m.cfg.arch
  layers = nnx.to_pure_dict(nnx.state(m.layers, nnx.Param))
  for proj, block in model_lib.PROJECTIONS.items():
    p = layers[block][proj]
    qp = {k: v for k, v in p.items() if k != "kernel"}
    # The training forward's kernel: y = x @ Q + c with x = I, no c.
    eye = jnp.eye(p["kernel"].shape[1], dtype=jnp.float32)
    state = jax.vmap(lambda w, q: quant.ternary_state(w, m.cfg.quant, q))(
        p["kernel"], qp)
    q_train = jax.vmap(lambda w, q, c: quant.quantized_matmul(
        eye, w, m.cfg.quant, q) - c)(p["kernel"], qp, state.c)
    # The export's state is its own (jitted) program: α (a mean over at
    # most `in` weights) and c = Σ_D λ·W to their sums' order; Σ|terms| of
    # c is c of |W| (and |Λ|), whose deadzone is W's.
    d_in = p["kernel"].shape[1]
    c_terms = np.abs(np.asarray(jax.vmap(lambda w, q: quant.ternary_state(
        w, m.cfg.quant, q))(jnp.abs(p["kernel"]), {
            k: jnp.abs(v) if k == "lam_weight" else v
            for k, v in qp.items()}).c, np.float64))
    assert_within(ex.quantized_kernel(proj), q_train, sum_order_bound(
        np.abs(q_train) + 2 * np.abs(np.asarray(state.c))[:, None],
        d_in + 3), proj)
    assert_within(ex.tensors[f"layers.{proj}.c"], state.c,
                  sum_order_bound(c_terms, d_in + 3), proj)
    assert (ex.gamma(proj) is not None) == (m.cfg.quant.method == "dlt")
  tokens = _tokens()
  want = np.asarray(m(tokens))
  atol = chain_atol(want, llama_k(m.cfg, tokens.size),  # tests/tolerances
                    llama_depth(m.cfg.num_layers))
  for strategy in ("exact", "lut"):
    packed = PackedLlama.load(path, InferenceSettings(strategy))
    got = np.asarray(packed(tokens))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
  int8 = PackedLlama.load(path, InferenceSettings("int8"))  # int8 activations
  got = np.asarray(int8(tokens))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-2


def test_seq_export_stores_the_two_thirds_level():
  m = _model(LEARNED["seq"])
  ex = tqj.build_export(m)
  alpha = nnx.to_pure_dict(nnx.state(m.layers, nnx.Param))["attn"]["q_proj"][
      "alpha"]  # [layers, 1, out]
  np.testing.assert_allclose(ex.tensors["layers.q_proj.alpha"],
                             np.asarray(alpha, np.float32) / 1.5, rtol=2e-7)
  assert set(np.unique(ex.codes("q_proj"))) == {-1, 0, 1}


@pytest.mark.parametrize("name", ["seq", "dlt", "lam_v3"])
def test_hf_ternary_export_runs_in_transformers(name, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  m = _model(LEARNED[name], tie=False)
  export = tqj.build_export(m)
  out = hf.save_ternary_hf(export, tmp_path / "hf")
  tokens = _tokens(2, 40)
  want = np.asarray(m(tokens))
  ref = transformers.LlamaForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  with torch.no_grad():
    got = ref(torch.as_tensor(np.array(tokens))).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=chain_atol(
      want, llama_k(m.cfg, tokens.size), llama_depth(m.cfg.num_layers)))
  if name == "dlt":  # Q = codes·α + γ has three levels that need not hold 0
    with pytest.raises(hf.CheckpointError, match="DLT"):
      hf.read_ternary_hf(out)
  else:
    back = hf.read_ternary_hf(out)
    for proj in model_lib.PROJECTIONS:
      np.testing.assert_array_equal(back.quantized_kernel(proj),
                                    export.quantized_kernel(proj))


def test_loaders_start_alpha_from_the_loaded_weights(tmp_path):
  """A float Hugging Face checkpoint loaded with --quant.method=seq gets α₀ =
  max|W| of its weights (GGUF sources go through the same
  `hf.model_from_tensors`), and so does a training run started from it."""
  torch = pytest.importorskip("torch")
  from tests.test_hf_io import _make_hf  # pylint: disable=g-import-not-at-top
  del torch
  _make_hf(tmp_path / "hf")
  qcfg = QuantConfig("seq", "per_channel")
  m = load.load_model(str(tmp_path / "hf"), quant=qcfg)
  p = nnx.to_pure_dict(nnx.state(m.layers, nnx.Param))["mlp"]["down_proj"]
  np.testing.assert_array_equal(p["alpha"][:, 0],
                                np.abs(p["kernel"]).max(axis=1))
  float_model = load.load_model(str(tmp_path / "hf"))
  want = nnx.to_pure_dict(nnx.state(float_model.layers, nnx.Param))["mlp"][
      "down_proj"]["kernel"]
  np.testing.assert_array_equal(p["kernel"], want)
  # A training run from it: its first state's α is that of the weights.
  config = _tiny()
  config.init.checkpoint = str(tmp_path / "hf")
  config.model.quant.update(method="seq", granularity="per_channel")
  setup = train.build_train(config, devices=jax.devices()[:1])
  state = setup.init_state(build_params := train.build.pretrained_params(
      config, setup.model_cfg))
  del build_params
  got = state["params"]["layers"]["mlp"]["down_proj"]
  np.testing.assert_array_equal(got["alpha"][:, 0],
                                np.abs(got["kernel"]).max(axis=1))
  np.testing.assert_array_equal(got["kernel"], want)
  # The run scores the float model it starts from beside the ternary one
  # (here a learned λ, whose θ the float model does not have).
  config.model.quant.update(method="tequila", granularity="per_group",
                            lam_mode="per_layer")
  config.train.update(steps=1, eval_batches=1, eval_every=100)
  config.diagnostics.enabled = False  # one compiled step, not two
  summary = train.run(config, tmp_path / "run", devices=jax.devices()[:1])
  assert summary["eval_float"]["loss"] != summary["eval_before"]["loss"]


def test_gguf_of_learned_methods(tmp_path):
  """seq and learned λ (per channel here) reach GGUF as TQ2_0 codes × α
  plus biases; DLT as Q4_1 (d·q + m holds γ − α, γ, γ + α)."""
  tok = locations.load_tokenizer("asset:smollm2_gguf")
  for name in ("seq", "lam_channel", "dlt"):
    m = _model(LEARNED[name], hidden_size=256, ffn_size=512, head_dim=64,
               vocab_size=49152)
    ex = tqj.build_export(m, tokenizer=tok)
    path = tmp_path / f"{name}.gguf"
    report = gguf.write_gguf(ex, path)
    reader = gguf.open_gguf(path)
    want_type = {"dlt": "Q4_1", "seq": "TQ2_0", "lam_channel": "TQ2_0"}[name]
    types = {t.tensor_type.name for t in reader.tensors
             if t.name.endswith("attn_q.weight")}
    assert types == {want_type}, (name, types, report)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    values = gguf.gguf.quants.dequantize(t.data, t.tensor_type)  # [out, in]
    q = ex.quantized_kernel("v_proj")[0].T
    # fp16 scales (and DLT's fp16 offset) round the levels.
    np.testing.assert_allclose(values, q, rtol=0,
                               atol=2e-3 * np.abs(q).max())
    bias = next(t for t in reader.tensors if t.name == "blk.0.attn_v.bias")
    np.testing.assert_array_equal(bias.data, ex.tensors["layers.v_proj.c"][0])


def test_weight_decay_never_touches_learned_parameters():
  params = {"layers": {"attn": {"q_proj": {
      "kernel": jnp.ones((2, 2)), "alpha": jnp.ones((1, 2)),
      "gamma": jnp.ones((1, 2)), "lam_log": jnp.ones(()),
      "lam_weight": jnp.ones((2, 2))}}}, "embed": jnp.ones((3,))}
  opt = config_lib.base_config().optim
  opt.update(weight_decay=0.5, lr=0.1, schedule="constant",
             warmup_fraction=0.0, clip_norm=0.0)
  tx, _ = optim.make_optimizer(opt, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = jax.tree_util.tree_map_with_path(
      lambda p, u: (p[-1].key, bool(jnp.any(u != 0))), updates)
  flat = {k: v for k, v in jax.tree.leaves(moved, is_leaf=lambda x:
                                           isinstance(x, tuple))}
  assert flat == {"kernel": True, "alpha": False, "gamma": False,
                  "lam_log": False, "lam_weight": False, "embed": True}


@pytest.mark.parametrize("name", [
    pytest.param("seq", marks=pytest.mark.slow),
    pytest.param("dlt", marks=pytest.mark.slow),
    pytest.param("lam_channel", marks=pytest.mark.slow), "lam_v3"])
def test_resume_is_exact_with_learned_parameters(tmp_path, name):
  """The learned α, γ, θ, Λ travel in the checkpoint: a run stopped and
  resumed equals an unbroken one bit for bit (losses, diagnostics, state)."""
  qcfg = LEARNED[name]

  def config():
    c = _tiny(steps=8, log_every=1, checkpoint_every=4,
              eval_every=100)
    c.model.quant.update({k: getattr(qcfg, k) for k in (
        "method", "granularity", "group_size", "lam", "lam_mode",
        "lam_std")})
    c.diagnostics.trap_steps = 3
    return c

  train.run(config(), tmp_path / "straight")
  train.run(config(), tmp_path / "split", stop_at=4)
  assert train.run(config(), tmp_path / "split")["start_step"] == 4
  a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
  assert [a[k] for k in sorted(a)] == [b[k] for k in sorted(a)]
  straight, split = _state(tmp_path / "straight", 8), _state(
      tmp_path / "split", 8)
  for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(split)):
    np.testing.assert_array_equal(x, y)
  start = _state(tmp_path / "split", 4)["params"]["layers"]["attn"]["q_proj"]
  end = straight["params"]["layers"]["attn"]["q_proj"]
  learned = [k for k in quant.QPARAM_NAMES if k in end]
  assert learned and all(not np.array_equal(start[k], end[k])
                         for k in learned), learned
  records = [json.loads(line) for line in
             (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
  logged = {k for r in records for k in r}
  assert ("train/lam/q_proj" in logged) == qcfg.learned_lam
  assert "train/trapped_fraction/all" in logged
  assert "train/dead_fraction/all" in logged


def test_remat_keeps_the_named_quantized_kernel():
  """The `quantized` remat policy saves the learned methods' Q (and v3's c)
  under their checkpoint names: same loss and gradients as no remat."""
  from tequila_jax import losses  # pylint: disable=g-import-not-at-top
  tokens = _tokens(2, 17)
  for name in ("dlt", "lam_v3"):
    cfg = tiny_model_config().replace(
        quant=LEARNED[name])
    params = model_lib.init_params(cfg)
    out = {}
    for remat in ("none", "quantized"):
      graphdef = model_lib.graphdef(cfg.replace(remat=remat))
      out[remat] = jax.value_and_grad(losses.next_token_loss)(
          params, graphdef, tokens)
    # Remat recomputes the forward in another program: sums may be ordered
    # differently, so the atol scales with each leaf (tests/tolerances.py).
    k, depth = llama_k(cfg, tokens.size), llama_depth(cfg.num_layers, True)
    for x, y in zip(jax.tree.leaves(out["none"]),
                    jax.tree.leaves(out["quantized"])):
      np.testing.assert_allclose(x, y, rtol=1e-5,
                                 atol=chain_atol(x, k, depth))
    # What the policy saves (layers unrolled so that residuals are named):
    # the 7 projections' Q per layer (and v3's bias c), under "quantized"
    # only.
    for remat, kept in (("quantized", 7 * cfg.num_layers), ("full", 0)):
      graphdef = model_lib.graphdef(cfg.replace(remat=remat,
                                                scan_layers=False))
      buf = io.StringIO()
      with contextlib.redirect_stdout(buf):
        print_saved_residuals(
            lambda p: losses.next_token_loss(p, graphdef, tokens), params)  # pylint: disable=cell-var-from-loop
      saved = buf.getvalue()
      assert saved.count("named 'quantized_kernel'") == kept, (name, remat)
      # c(W) keeps its name (saved where the backward needs it).
      biased = cfg.quant.lam_mode in ("v3", "per_channel") and kept
      assert (saved.count("named 'tequila_bias'") > 0) == bool(biased)


def test_meaningless_combinations_are_refused():
  with pytest.raises(ValueError, match="lam_mode='per_layer' learns Tequila"):
    QuantConfig("absmean", lam_mode="per_layer")
  with pytest.raises(ValueError, match="relative to lam, which must be > 0"):
    QuantConfig("tequila", lam=0.0, lam_mode="per_channel")
  with pytest.raises(ValueError, match="Unknown lam_mode"):
    QuantConfig("tequila", lam_mode="learned")
  with pytest.raises(ValueError, match="use float32"):
    QuantConfig("seq", stat_dtype="bfloat16")
  with pytest.raises(ValueError, match="learns .*'alpha'"):
    quant.quantized_matmul(jnp.ones((2, 64)), jnp.ones((64, 4)),
                           QuantConfig("lsq", group_size=32))
  assert "λ learned per_channel from 0.001" in QuantConfig(
      "tequila", lam_mode="per_channel").describe()


def test_resume_refuses_a_key_the_stored_config_lacks():
  """A stored config from before `lam_mode` existed compares as 'fixed':
  turning on a learned λ on resume is a change like any other."""
  stored = config_lib.tiny()
  del stored.model.quant["lam_mode"]
  del stored.model.quant["lam_std"]
  same = config_lib.tiny()
  assert train.resume.config_changes(stored, same) == []
  changed = config_lib.tiny()
  changed.model.quant.lam_mode = "per_layer"
  assert train.resume.config_changes(stored, changed) == [
      "model.quant.lam_mode: 'fixed' -> 'per_layer'"]


def test_diagnostics_use_each_methods_threshold():
  """r = |W| / Δ with Δ = α/2 (lsq, dlt) or α/3 (seq) of the learned α: the
  dead fraction the diagnostics report is that of the codes."""
  for name in ("lsq", "seq", "dlt"):
    m = _model(LEARNED[name])
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    cfg = diagnostics.DiagnosticsConfig(quant=m.cfg.quant)
    out = diagnostics.full_metrics(params, params, cfg)
    p = params["layers"]["mlp"]["up_proj"]
    codes, r = jax.vmap(lambda w, a: quant.threshold_stats(
        w, m.cfg.quant, {k: v for k, v in a.items()}))(
            p["kernel"], {k: v for k, v in p.items() if k != "kernel"})
    np.testing.assert_allclose(out["dead_fraction/up_proj"],
                               np.mean(np.asarray(codes) == 0))
    levels = 3.0 if name == "seq" else 2.0
    alpha = np.repeat(np.asarray(p["alpha"]), 64 if p["alpha"].shape[1] > 1
                      else p["kernel"].shape[1], axis=1)
    ratio = np.abs(np.asarray(p["kernel"])) * levels / alpha
    np.testing.assert_allclose(r, ratio, rtol=1e-6)
    away = np.abs(ratio - 1) > 1e-5
    np.testing.assert_array_equal((np.asarray(codes) == 0)[away],
                                  (ratio < 1)[away])


def test_learned_lambda_moves_and_starts_at_lam():
  qcfg = LEARNED["lam_channel"]
  w = jax.random.normal(jax.random.key(0), (64, 8)) * 0.02
  qp = quant.init_qparams(w, qcfg)
  np.testing.assert_array_equal(qp["lam_log"], np.zeros(8))
  fixed = quant.ternary_state(w, QuantConfig("tequila", "per_channel",
                                             lam=0.05))
  np.testing.assert_array_equal(quant.ternary_state(w, qcfg, qp).c, fixed.c)
  tx = optax.adam(1e-2)
  x = jax.random.normal(jax.random.key(1), (16, 64))
  loss = lambda q: jnp.sum(quant.quantized_matmul(x, w, qcfg, q) ** 2)  # noqa: E731
  state = tx.init(qp)
  for _ in range(3):
    updates, state = tx.update(jax.grad(loss)(qp), state)
    qp = optax.apply_updates(qp, updates)
  assert 0 < float(jnp.max(jnp.abs(qp["lam_log"]))) < 0.05  # relative steps


def test_learned_scales_start_mostly_dead():
  """docs/methods.md: with α₀ = max|W| per output unit, Gaussian rows of 2,048
  weights start 93% dead under lsq/dlt (Δ = α/2) and 77% under seq (α/3)."""
  w = jax.random.normal(jax.random.key(0), (2048, 512))
  for method, want in (("lsq", 0.93), ("dlt", 0.93), ("seq", 0.77)):
    qcfg = QuantConfig(method, "per_channel")
    codes, _ = quant.threshold_stats(w, qcfg, quant.init_qparams(w, qcfg))
    assert abs(float(jnp.mean(codes == 0)) - want) < 0.01, method


@pytest.mark.multidevice
@pytest.mark.parametrize("name, mesh, micro, parallelism", [
    pytest.param("lam_v3", (2, 4), 2, "gspmd", marks=pytest.mark.slow),
    pytest.param("dlt", (8, 1), 2, "shard_map", marks=pytest.mark.slow)])
def test_learned_parameters_train_the_same_sharded(tmp_path, name, mesh,
                                                   micro, parallelism):
  """α/γ and Λ laid out by the sharding rules (FSDP) or replicated
  (shard_map), with micro-batches, train as on one device: v3's regression
  gradient is linear in the token mean, so averaging it over micro-batches
  and devices is its gradient on the whole batch."""
  from tests.test_trainer import _params  # pylint: disable=g-import-not-at-top
  qcfg = LEARNED[name]
  fields = {k: getattr(qcfg, k) for k in (
      "method", "granularity", "group_size", "lam", "lam_mode", "lam_std")}
  steps = dict(steps=4, log_every=1, checkpoint_every=4, eval_every=100,
               batch_size=16, eval_batch_size=16)
  single = _tiny(**steps)
  single.model.quant.update(fields)
  train.run(single, tmp_path / "single", devices=jax.devices()[:1])
  par = _tiny(**steps, micro_batches=micro, parallelism=parallelism)
  par.model.quant.update(fields)
  par.mesh.update(data=mesh[0], fsdp=mesh[1])
  train.run(par, tmp_path / "par")
  a, b = _losses(tmp_path / "single"), _losses(tmp_path / "par")
  np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=2e-5)
  pa, pb = _params(tmp_path / "single", 4), _params(tmp_path / "par", 4)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    # Summation order may move an isolated weight across its threshold,
    # which changes its update (v3: α·xᵀg active vs Λ·Σg dead).
    off = ~np.isclose(x, y, rtol=1e-4, atol=1e-5)
    assert off.mean() < 1e-3 and np.abs(np.asarray(x) - y).max() < 1e-3


def test_a_workdir_keeps_its_trained_parameters_unless_another_quantizer(
    tmp_path):
  """A learned run's workdir loads with its trained α — also under a
  quantizer that learns the same parameters (another act_bits, lam or
  group_size flag default) — and restarts them only for one that learns
  others."""
  tmp = str(tmp_path)
  config = _tiny(steps=3, eval_every=100, checkpoint_every=3)
  config.model.quant.update(method="lsq", granularity="per_channel")
  config.diagnostics.enabled = False  # one compiled step, not two
  train.run(config, f"{tmp}/run", devices=jax.devices()[:1])

  def alpha(m):
    p = nnx.to_pure_dict(nnx.state(m.layers, nnx.Param))["mlp"]["up_proj"]
    return np.asarray(p["alpha"]), np.abs(np.asarray(p["kernel"])).max(1)

  trained, start = alpha(load.load_model(f"{tmp}/run"))
  assert not np.allclose(trained[:, 0], start)  # it learned
  same = QuantConfig("lsq", "per_channel", group_size=128, act_bits=8)
  np.testing.assert_array_equal(alpha(load.load_model(f"{tmp}/run",
                                                      quant=same))[0], trained)
  other, start = alpha(load.load_model(
      f"{tmp}/run", quant=QuantConfig("seq", "per_channel")))
  np.testing.assert_array_equal(other[:, 0], start)


def test_v3_backward_is_elementwise_over_the_kernel():
  """v3's backward makes no sum and no matmul over a kernel-sized operand
  (the regression's x̄·B and s = c come from the forward, as one `[out]`
  residual), and saves no float kernel-sized residual but W, Λ and the
  quantized kernel the matmul keeps (the fixed-λ step saves that one too)."""
  cfg = LEARNED["lam_v3"]
  w = jax.random.normal(jax.random.key(0), (128, 48))
  x = jax.random.normal(jax.random.key(1), (5, 128))
  qp = quant.init_qparams(w, cfg, key=jax.random.key(2))
  primals, bwd = jax.vjp(
      lambda w, lam: quant.learned.v3_kernel(w, lam, x.mean(0), cfg,
                                             jnp.float32), w, qp["lam_weight"])
  jaxpr = jax.make_jaxpr(bwd)(primals).jaxpr
  over_w = [e.primitive.name for e in jaxpr.eqns
            if any(getattr(v.aval, "shape", ()) == w.shape for v in e.invars)
            and (e.primitive.name.startswith("reduce")
                 or e.primitive.name == "dot_general")]
  assert not over_w, over_w
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(
        lambda x, w, qp: quant.quantized_matmul(x, w, cfg, qp).sum(), x, w, qp)
  big = [line for line in buf.getvalue().splitlines()
         if line.startswith("f32[128,48]") and "from the argument" not in line]
  assert len(big) == 1 and "named 'quantized_kernel'" in big[0], big
