"""What the speed work (issue 14) must not change: the demo's first losses and updates, the skip of a
non-finite step, the draws of the inverse-CDF sampler, and which saved settings a checkpoint may differ in."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_lm import experiment, sharding
from diffusion_lm.model import Transformer

# configs/demo.py's model (vocab 1024), optimizer and schedule; init seed 0; one fixed batch
# np.random.default_rng(0).integers(0, 1024, (64, 64)); train key fold_in(key(0), 1), as train.py.
# Recorded at commit ee6a216 (before the speed work) by running _two_steps there on one CPU device.
GOLDEN = {
    "loss_1": 7.635332107543945, "grad_norm_1": 1.8065158128738403, "mask_rate_1": 0.505859375,
    "loss_2": 7.414504051208496, "grad_norm_2": 1.7440890073776245,
    "param_norm": 480.1068420410156,  # of the initial parameters (step 1 has learning rate 0)
    "update_norm": 0.03597202152013779,  # |params after step 2 - initial params|
    "ema_update_norm": 0.000359746947651729,  # |EMA after step 2 - initial params|: 0.01 x update_norm
}


def _setup(config, vocab):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = Transformer(experiment.model_config(config, vocab))
  tx, _ = experiment.make_optimizer(config)
  _, shardings = experiment.state_shardings(model, tx, mesh, config.data.seq_len)
  state = experiment.init_state(model, tx, mesh, jax.random.key(config.seed), config.data.seq_len, shardings)
  return mesh, model, tx, state


def _step_fn(config, model, tx, vocab):
  return jax.jit(functools.partial(experiment.train_step, model=model, tx=tx,
                                   schedule=experiment.schedule_from_config(config), mask_id=vocab,
                                   ema_decay=config.optimizer.ema_decay))


def _two_steps():
  from configs import demo  # pylint: disable=g-import-not-at-top
  config, vocab = demo.get_config(), 1024
  mesh, model, tx, state = _setup(config, vocab)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (config.training.batch_size, config.data.seq_len),
                                                        dtype=np.int32))
  step = _step_fn(config, model, tx, vocab)
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  initial = jax.tree.map(jnp.copy, state.params)
  out = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    for i in (1, 2):
      state, metrics = step(state, tokens, key)
      out.update({f"{name}_{i}": float(metrics[name]) for name in ("loss", "grad_norm", "mask_rate")})
  out["param_norm"] = float(metrics["param_norm"])
  out["update_norm"] = float(optax.tree.norm(jax.tree.map(jnp.subtract, state.params, initial)))
  out["ema_update_norm"] = float(optax.tree.norm(jax.tree.map(jnp.subtract, state.ema_params, initial)))
  return out


def test_demo_first_steps_match_the_recorded_values():
  got = _two_steps()
  for name in ("loss_1", "grad_norm_1", "mask_rate_1", "loss_2", "grad_norm_2", "param_norm", "update_norm"):
    np.testing.assert_allclose(got[name], GOLDEN[name], rtol=2e-5, err_msg=name)
  # The EMA moves by 1e-2 of an update of ~1e-7 per weight: float32 rounding of the weights (~6e-8)
  # is a good part of that, so this one agrees to rounding, not to 1e-5.
  np.testing.assert_allclose(got["ema_update_norm"], GOLDEN["ema_update_norm"], rtol=1e-2)


def test_nonfinite_step_leaves_every_leaf_bitwise_unchanged(tiny_config):
  vocab = 20
  mesh, model, tx, state = _setup(tiny_config, vocab)
  # An infinite embedding row makes the loss and every gradient non-finite.
  params = dict(state.params)
  params["embed"] = {"embedding": state.params["embed"]["embedding"].at[3].set(jnp.inf)}
  state = state.replace(params=params)
  before = jax.tree.map(np.asarray, state)
  tokens = jnp.full((8, tiny_config.data.seq_len), 3, jnp.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    after, metrics = _step_fn(tiny_config, model, tx, vocab)(state, tokens, jax.random.key(0))
  assert float(metrics["finite"]) == 0.0 and int(after.step) == int(before.step) + 1
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(before, name))):
      np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)


@pytest.mark.parametrize("field, value, differs", [("attention_impl", "xla", False), ("mlp_dim", 48, True)])
def test_checkpoint_loads_under_any_attention_implementation(tiny_config, field, value, differs):
  saved = experiment.config_to_dict(tiny_config)
  del saved["model"]["attention_impl"]  # a checkpoint written before the field existed
  tiny_config.model[field] = value
  assert (experiment.describe_mismatch(saved, tiny_config, 20) is not None) == differs


@pytest.mark.parametrize("vocab", [1, 2, 7, 96, 1000, 1024])
def test_two_level_inverse_cdf_is_the_flat_inverse_cdf(vocab):
  from diffusion_lm.samplers.common import inverse_cdf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(vocab)
  logits = 3.0 * rng.normal(size=(3, 40, vocab))
  if vocab > 1:
    logits[..., 1::3] = -np.inf  # zero-probability tokens, the last one among them for vocab 2 and 1000
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  u = rng.random((3, 40)).astype(np.float32)
  u[0, :4] = [0.0, np.nextafter(np.float32(1), np.float32(0)), 0.5, 1e-9]  # the ends of [0, 1)
  cdf = np.cumsum(probs.astype(np.float64), axis=-1)  # the definition, in float64
  expected = np.minimum((cdf <= u[..., None].astype(np.float64) * cdf[..., -1:]).sum(-1), vocab - 1)
  got = np.asarray(inverse_cdf(jnp.asarray(u), jnp.asarray(probs)))
  assert np.all(np.take_along_axis(probs, got[..., None], -1) > 0)
  np.testing.assert_array_equal(got, expected)
