import jax
import numpy as np
import pytest

from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule

jax.config.update("jax_enable_x64", False)

NAMED = [Schedule("linear"), Schedule("cosine"), Schedule("polynomial", power=2.0),
         Schedule("polynomial", power=0.5), Schedule("geometric")]
IDS = lambda s: f"{s.name}-{s.power}"  # noqa: E731


# Reference schedules in float64 numpy, written from the papers' definitions (MD4 table 1, MDLM) and not
# from diffusion_lm.schedules: alpha(t) in a different but equal algebraic form where one exists, and the
# ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) derived by hand for each schedule.
def reference_alpha(schedule, t):
  t = np.asarray(t, np.float64)
  if schedule.name == "linear":
    return 1.0 - t
  if schedule.name == "cosine":  # 1 - cos(pi/2 (1 - t)) = 1 - sin(pi t / 2)
    return 1.0 - np.sin(0.5 * np.pi * t)
  if schedule.name == "polynomial":
    return 1.0 - t**schedule.power
  # geometric: sigma(t) = sigma_min^(1-t) sigma_max^t is log-linear in t
  sigma = np.exp((1.0 - t) * np.log(schedule.sigma_min) + t * np.log(schedule.sigma_max))
  return np.exp(-sigma)


def reference_weight(schedule, t):
  t = np.asarray(t, np.float64)
  if schedule.name == "linear":  # alpha' = -1, 1 - alpha = t
    return 1.0 / t
  if schedule.name == "cosine":  # alpha' = -(pi/2) cos(pi t/2), 1 - alpha = sin(pi t/2)
    return 0.5 * np.pi / np.tan(0.5 * np.pi * t)
  if schedule.name == "polynomial":  # alpha' = -p t^(p-1), 1 - alpha = t^p
    return schedule.power / t
  # geometric: alpha' = -e^-sigma sigma ln(smax/smin), 1 - alpha = 1 - e^-sigma
  sigma = np.exp((1.0 - t) * np.log(schedule.sigma_min) + t * np.log(schedule.sigma_max))
  return sigma * np.log(schedule.sigma_max / schedule.sigma_min) / np.expm1(sigma)


def test_reference_cosine_form_is_md4s():
  t = np.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(reference_alpha(Schedule("cosine"), t), 1.0 - np.cos(0.5 * np.pi * (1.0 - t)),
                             atol=1e-15)


@pytest.mark.parametrize("schedule", NAMED, ids=IDS)
def test_endpoints(schedule):
  tol = 2 * schedule.sigma_min if schedule.name == "geometric" else 1e-6  # exp(-sigma_min) at t=0
  assert abs(float(schedule.alpha(0.0)) - 1.0) < tol
  assert abs(float(schedule.alpha(1.0))) < tol


@pytest.mark.parametrize("schedule", NAMED, ids=IDS)
def test_alpha_matches_the_definition(schedule):
  t = np.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(np.asarray(schedule.alpha(t), np.float64), reference_alpha(schedule, t),
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.diff(np.asarray(schedule.alpha(t))) < 0)


@pytest.mark.parametrize("schedule", NAMED, ids=IDS)
def test_derivative_matches_finite_differences_of_the_definition(schedule):
  t = np.linspace(0.05, 0.95, 19)
  h = 1e-6
  numeric = (reference_alpha(schedule, t + h) - reference_alpha(schedule, t - h)) / (2 * h)
  np.testing.assert_allclose(np.asarray(schedule.dalpha(t), np.float64), numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", NAMED, ids=IDS)
def test_weight_matches_the_hand_derived_closed_form(schedule):
  t = np.concatenate([np.geomspace(1e-4, 0.01, 5), np.linspace(0.02, 0.99, 98)])
  weight = np.asarray(schedule.weight(t), np.float64)
  # Down to t = 1e-4 (diffusion.T_MIN), where 1 - alpha computed as 1 - (1 - t^2) is 0 in float32.
  np.testing.assert_allclose(weight, reference_weight(schedule, t), rtol=1e-5)
  assert np.all(weight > 0)


def test_mlm_bounds_with_linear():
  assert Schedule("mlm", mask_rate=0.15).bound_schedule == Schedule("linear")


@pytest.mark.parametrize("kwargs", [dict(name="sqrt"), dict(name="polynomial", power=0.0),
                                    dict(name="geometric", sigma_min=2.0, sigma_max=1.0),
                                    dict(name="mlm", mask_rate=1.5)])
def test_bad_schedule_is_one_line_error(kwargs):
  with pytest.raises(UserError) as e:
    Schedule(**kwargs)
  assert "\n" not in str(e.value) and "allowed" in str(e.value)
