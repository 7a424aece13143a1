"""Masking schedules alpha(t): the probability that a token is still clean at time t.

alpha(0) = 1 (clean data), alpha(1) = 0 (all [MASK]); each schedule also gives alpha'(t), which the
continuous-time ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) needs. All functions are pure jnp and
work on scalars or arrays of t in [0, 1].
"""

import dataclasses
import math

import jax.numpy as jnp

from diffusion_lm.errors import UserError

SCHEDULES = ("linear", "cosine", "polynomial", "geometric", "mlm")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A masking schedule.

  name: one of SCHEDULES.
  power: exponent of the polynomial schedule alpha = 1 - t**power.
  sigma_min, sigma_max: rates of the geometric schedule alpha = exp(-sigma_min**(1-t) * sigma_max**t)
    (MD4); its endpoints are exp(-sigma_min) ~ 1 and exp(-sigma_max) ~ 0.
  mask_rate: the fixed mask rate of the "mlm" case (BERT as one-step diffusion). Training always masks
    at this rate; likelihood bounds and sampling of such a model use the linear schedule, for which
    the (time-agnostic) denoiser is still a valid reverse model.
  """

  name: str = "linear"
  power: float = 1.0
  sigma_min: float = 1e-4
  sigma_max: float = 20.0
  mask_rate: float = 0.15

  def __post_init__(self):
    if self.name not in SCHEDULES:
      raise UserError(f"unknown schedule {self.name!r}; allowed: {', '.join(SCHEDULES)}")
    if self.name == "polynomial" and not self.power > 0:
      raise UserError(f"polynomial schedule power={self.power}; allowed: a number > 0")
    if self.name == "geometric" and not 0 < self.sigma_min < self.sigma_max:
      raise UserError(
          f"geometric schedule sigma_min={self.sigma_min}, sigma_max={self.sigma_max};"
          " allowed: 0 < sigma_min < sigma_max")
    if self.name == "mlm" and not 0 < self.mask_rate <= 1:
      raise UserError(f"mlm mask_rate={self.mask_rate}; allowed: 0 < mask_rate <= 1")

  @property
  def bound_schedule(self) -> "Schedule":
    """The schedule used for likelihood bounds and sampling (linear for the mlm case)."""
    return Schedule("linear") if self.name == "mlm" else self

  def alpha(self, t):
    """P(token unmasked at time t); float array like t."""
    t = jnp.asarray(t, jnp.float32)
    if self.name in ("linear", "mlm"):
      return 1.0 - t
    if self.name == "cosine":
      return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))
    if self.name == "polynomial":
      return 1.0 - t**self.power
    # geometric
    return jnp.exp(-self._sigma(t))

  def dalpha(self, t):
    """d alpha / dt; float array like t."""
    t = jnp.asarray(t, jnp.float32)
    if self.name in ("linear", "mlm"):
      return -jnp.ones_like(t)
    if self.name == "cosine":
      return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))
    if self.name == "polynomial":
      return -self.power * t**(self.power - 1.0)
    sigma = self._sigma(t)
    return -jnp.exp(-sigma) * sigma * math.log(self.sigma_max / self.sigma_min)

  def weight(self, t):
    """ELBO weight w(t) = -alpha'(t) / (1 - alpha(t)) (units: 1/time); finite for t > 0."""
    t = jnp.asarray(t, jnp.float32)
    if self.name in ("linear", "mlm"):
      return 1.0 / t  # exact form, no cancellation at small t
    if self.name == "polynomial":  # exact form: 1 - alpha = t**power rounds to 0 in float32 near t = 1e-4
      return self.power / t
    if self.name == "cosine":  # exact form: 1 - alpha = sin(pi t / 2), without the cancellation
      return 0.5 * math.pi / jnp.tan(0.5 * math.pi * t)
    sigma = self._sigma(t)  # geometric
    return sigma * math.log(self.sigma_max / self.sigma_min) / jnp.expm1(sigma)

  def inverse_alpha(self, alpha):
    """The t in [0, 1] with alpha(t) = alpha (clipped to the schedule's range); float array like alpha.

    Samplers that commit by confidence use it to tell a time-conditioned denoiser the noise level of
    a row whose masked fraction is 1 - alpha.
    """
    a = jnp.clip(jnp.asarray(alpha, jnp.float32), 0.0, 1.0)
    if self.name in ("linear", "mlm"):
      t = 1.0 - a
    elif self.name == "cosine":
      t = 1.0 - jnp.arccos(1.0 - a) / (0.5 * math.pi)
    elif self.name == "polynomial":
      t = (1.0 - a)**(1.0 / self.power)
    else:  # geometric: sigma(t) = -log(alpha), log sigma is linear in t
      log_sigma = jnp.log(-jnp.log(jnp.clip(a, 1e-30, 1.0 - 1e-7)))
      t = (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)
    return jnp.clip(t, 0.0, 1.0)

  def _sigma(self, t):
    return self.sigma_min**(1.0 - t) * self.sigma_max**t
