"""Learning-rate schedules: the official Tequila schedule against transformers'
own `warmup_stable_decay`, and the recipe's optimizer settings."""

import math
import pathlib

import numpy as np
import pytest

from tequila_jax import config_lib, optim

CONFIG_DIR = pathlib.Path(__file__).parent.parent / "configs"


def _official(steps, lr=1e-3):
  return optim.schedule("official", lr=lr, steps=steps, initial_fraction=0.1,
                        warmup_fraction=0.61, decay_fraction=0.3825,
                        final_fraction=0.1)


def test_official_schedule_values():
  steps, lr = 38_150, 1e-3
  f = _official(steps, lr)
  warmup = math.ceil(0.61 * steps)  # 23,272
  decay = round(0.3825 * steps)  # 14,592: the official num_decay_steps
  assert decay == 14592
  np.testing.assert_allclose(f(0), 0.1 * lr, rtol=1e-6)  # starts at 0.1·lr
  np.testing.assert_allclose(f(warmup // 2), lr * (0.1 + 0.9 * (warmup // 2)
                                                   / warmup), rtol=1e-6)
  np.testing.assert_allclose(f(warmup), lr, rtol=1e-6)  # peak at 61%, no stable
  np.testing.assert_allclose(f(warmup + 1), lr * (0.1 + 0.9 * 0.5 * (
      1 + math.cos(math.pi / decay))), rtol=1e-6)
  np.testing.assert_allclose(f(warmup + decay // 2), 0.55 * lr, rtol=1e-5)
  np.testing.assert_allclose(f(warmup + decay), 0.1 * lr, rtol=1e-6)
  np.testing.assert_allclose(f(steps - 1), 0.1 * lr, rtol=1e-6)  # held


def test_official_schedule_equals_transformers_wsd():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  steps = 1000
  warmup, decay = math.ceil(0.61 * steps), round(0.3825 * steps)
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
  hf = transformers.get_wsd_schedule(opt, num_warmup_steps=warmup,
                                     num_decay_steps=decay, num_stable_steps=0,
                                     min_lr_ratio=0.1).lr_lambdas[0]
  ours = _official(steps, lr=1.0)
  np.testing.assert_allclose([float(ours(s)) for s in range(steps)],
                             [hf(s) for s in range(steps)], rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize("name", ["llama1b", "llama3b"])
def test_llama32_recipe_uses_the_official_optimizer(name):
  opt = config_lib.load_config_file(str(CONFIG_DIR / f"{name}.py")).optim
  assert (opt.schedule, opt.initial_fraction, opt.warmup_fraction,
          opt.decay_fraction, opt.final_fraction) == (
              "official", 0.1, 0.61, 0.3825, 0.1)
  assert (opt.lr, opt.b1, opt.b2, opt.eps, opt.clip_norm,
          opt.weight_decay) == (1e-3, 0.9, 0.999, 1e-8, 1.0, 0.0)
  for small in ("tiny", "smollm2_135m"):  # keep their tuned schedules
    assert config_lib.load_config_file(
        str(CONFIG_DIR / f"{small}.py")).optim.schedule == "wsd"


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_every_schedule_starts_at_initial_fraction_and_ends_at_final(name):
  f = optim.schedule(name, lr=2.0, steps=100, warmup_fraction=0.1,
                     decay_fraction=0.3, final_fraction=0.1,
                     initial_fraction=0.25)
  np.testing.assert_allclose(f(0), 0.5, rtol=1e-6)
  np.testing.assert_allclose(f(10), 2.0, rtol=1e-6)
  np.testing.assert_allclose(f(100), 2.0 if name == "constant" else 0.2,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="Unknown schedule"):
    optim.schedule("linear", lr=1.0, steps=10, warmup_fraction=0.1)
