import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import diffusion
from diffusion_lm.schedules import Schedule


@pytest.mark.parametrize("schedule", [Schedule("linear"), Schedule("cosine"), Schedule("geometric")],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_masking_rate_matches_one_minus_alpha(schedule, t):
  tokens = jnp.zeros((64, 512), jnp.int32)
  alpha = schedule.alpha(jnp.full((64,), t))
  noisy, is_masked = diffusion.forward_mask(jax.random.key(3), tokens, alpha, mask_id=7)
  rate = float(jnp.mean(is_masked))
  p = 1.0 - float(alpha[0])
  n = tokens.size
  assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-6
  assert bool(jnp.all(jnp.where(is_masked, noisy == 7, noisy == tokens)))


def test_antithetic_times_are_stratified_and_in_range():
  t = np.asarray(diffusion.antithetic_times(jax.random.key(0), 16))
  assert t.min() >= diffusion.T_MIN and t.max() <= 1.0
  # One point per 1/16 stratum.
  strata = np.floor((t - diffusion.T_MIN) / (1 - diffusion.T_MIN) * 16).astype(int)
  assert sorted(strata.tolist()) == list(range(16))


def _fixed_denoiser(logits_LxK):
  return lambda tokens, t: jnp.broadcast_to(logits_LxK, tokens.shape + logits_LxK.shape[-1:])


def test_loss_equals_hand_computed_value():
  # Two positions, vocabulary of 2; the denoiser predicts p(token 0) = 0.8 everywhere.
  logits = jnp.log(jnp.array([[0.8, 0.2], [0.8, 0.2]]))
  tokens = jnp.array([[0, 1]], jnp.int32)
  key = jax.random.key(0)
  t = jnp.array([0.5])
  out = diffusion.diffusion_loss(_fixed_denoiser(logits), tokens, key, Schedule("linear"), mask_id=2, t_B=t)
  # Recover which positions were masked from the same key split the loss uses.
  _, mask_key = jax.random.split(key)
  _, is_masked = diffusion.forward_mask(mask_key, tokens, 1.0 - t, 2)
  nll = np.where(np.asarray(is_masked[0]), [-math.log(0.8), -math.log(0.2)], 0.0).sum()
  np.testing.assert_allclose(float(out["nelbo"][0]), nll / 0.5, rtol=1e-5)
  assert float(out["num_masked"][0]) == float(is_masked.sum())


def test_loss_counts_only_masked_positions():
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 5)
  key = jax.random.key(2)
  t = jnp.full((4,), 0.4)
  _, mask_key = jax.random.split(key)
  _, is_masked = diffusion.forward_mask(mask_key, tokens, 1.0 - t, 5)
  base = jax.random.normal(jax.random.key(4), (4, 32, 5))
  # Change the logits arbitrarily at unmasked positions only: the loss must not move.
  noise = jnp.where(is_masked[..., None], 0.0, 100.0 * jax.random.normal(jax.random.key(5), base.shape))
  a = diffusion.diffusion_loss(lambda x, s: base, tokens, key, Schedule("linear"), 5, t_B=t)["nelbo"]
  b = diffusion.diffusion_loss(lambda x, s: base + noise, tokens, key, Schedule("linear"), 5, t_B=t)["nelbo"]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  # ...while changing a masked position's logits does move it.
  bump = jnp.where(is_masked[..., None], 3.0 * jax.nn.one_hot((tokens + 1) % 5, 5), 0.0)
  c = diffusion.diffusion_loss(lambda x, s: base + bump, tokens, key, Schedule("linear"), 5, t_B=t)["nelbo"]
  assert np.all(np.asarray(c) > np.asarray(a))


def test_uniform_denoiser_elbo_is_log_vocab_per_token():
  # With p = uniform over K, E_t[w(t) * #masked * log K] = L log K for any schedule: the bound of
  # an uninformed model is exactly log K per token.
  k, length = 11, 256
  tokens = jax.random.randint(jax.random.key(0), (256, length), 0, k)
  zeros = lambda x, t: jnp.zeros(x.shape + (k,))
  for schedule in (Schedule("linear"), Schedule("cosine")):
    vals = [diffusion.diffusion_loss(zeros, tokens, jax.random.key(i), schedule, k)["nelbo"]
            for i in range(8)]
    per_token = float(jnp.mean(jnp.stack(vals))) / length
    assert abs(per_token - math.log(k)) < 0.03 * math.log(k), (schedule.name, per_token)


def test_mlm_masks_at_fixed_rate():
  tokens = jnp.zeros((32, 256), jnp.int32)
  out = diffusion.diffusion_loss(lambda x, t: jnp.zeros(x.shape + (3,)), tokens, jax.random.key(0),
                                 Schedule("mlm", mask_rate=0.25), 3)
  assert abs(float(jnp.mean(out["num_masked"])) / 256 - 0.25) < 0.02
  np.testing.assert_allclose(np.asarray(out["t"]), 0.25)
