import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule

jax.config.update("jax_enable_x64", False)

NAMED = [Schedule("linear"), Schedule("cosine"), Schedule("polynomial", power=2.0),
         Schedule("polynomial", power=0.5), Schedule("geometric")]


@pytest.mark.parametrize("schedule", NAMED, ids=lambda s: f"{s.name}-{s.power}")
def test_endpoints(schedule):
  tol = 2 * schedule.sigma_min if schedule.name == "geometric" else 1e-6  # exp(-sigma_min) at t=0
  assert abs(float(schedule.alpha(0.0)) - 1.0) < tol
  assert abs(float(schedule.alpha(1.0))) < tol


@pytest.mark.parametrize("schedule", NAMED, ids=lambda s: f"{s.name}-{s.power}")
def test_derivative_matches_finite_differences(schedule):
  t = np.linspace(0.05, 0.95, 19)
  h = 1e-3
  numeric = (np.asarray(schedule.alpha(t + h), np.float64) - np.asarray(schedule.alpha(t - h), np.float64)) / (2 * h)
  np.testing.assert_allclose(np.asarray(schedule.dalpha(t)), numeric, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("schedule", NAMED, ids=lambda s: f"{s.name}-{s.power}")
def test_monotone_and_weight_consistent(schedule):
  t = jnp.linspace(0.01, 0.99, 99)
  alpha = np.asarray(schedule.alpha(t))
  assert np.all(np.diff(alpha) < 0)
  expected = -np.asarray(schedule.dalpha(t)) / (1 - alpha)
  np.testing.assert_allclose(np.asarray(schedule.weight(t)), expected, rtol=1e-3)
  assert np.all(np.asarray(schedule.weight(t)) > 0)


def test_linear_weight_is_one_over_t():
  np.testing.assert_allclose(Schedule("linear").weight(jnp.array([0.25, 0.5])), [4.0, 2.0], rtol=1e-6)


def test_mlm_bounds_with_linear():
  assert Schedule("mlm", mask_rate=0.15).bound_schedule == Schedule("linear")


@pytest.mark.parametrize("kwargs", [dict(name="sqrt"), dict(name="polynomial", power=0.0),
                                    dict(name="geometric", sigma_min=2.0, sigma_max=1.0),
                                    dict(name="mlm", mask_rate=1.5)])
def test_bad_schedule_is_one_line_error(kwargs):
  with pytest.raises(UserError) as e:
    Schedule(**kwargs)
  assert "\n" not in str(e.value) and "allowed" in str(e.value)
