"""Likelihood bounds on an oracle whose exact likelihood is known (a Markov chain, all 81 sequences)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import diffusion
from diffusion_lm.schedules import Schedule
from test_sampling import JOINT, L, MASK, SEQS, markov_oracle


def _conditional_nll(x, masked):
  """sum over masked n of -log p(x_n | the unmasked part of x), exactly, by enumeration."""
  consistent = np.all(masked[None] | (SEQS == x[None]), axis=1)
  w = JOINT * consistent
  total = 0.0
  for n in np.flatnonzero(masked):
    total -= math.log(w[SEQS[:, n] == x[n]].sum() / w.sum())
  return total


def exact_bounds(x, schedule, steps_list):
  """(continuous-time bound, {T: discrete T-step bound}) for sequence x, in nats, by quadrature."""
  masks = [np.array(m, bool) for m in itertools.product([False, True], repeat=L)]
  nll = {tuple(m): _conditional_nll(x, m) for m in masks}

  def expected(t):  # E_{mask ~ q(.|t)} sum_masked -log p, vectorised over an array of t
    a = np.asarray(schedule.alpha(jnp.asarray(t)), np.float64)
    return sum((1 - a)**m.sum() * a**(L - m.sum()) * nll[tuple(m)] for m in masks)

  grid = (np.arange(200_000) + 0.5) / 200_000
  continuous = float(np.mean(np.asarray(schedule.weight(jnp.asarray(grid)), np.float64) * expected(grid)))
  discrete = {}
  for steps in steps_list:
    t = np.arange(1, steps + 1) / steps
    at = np.asarray(schedule.alpha(jnp.asarray(t)), np.float64)
    as_ = np.asarray(schedule.alpha(jnp.asarray(t - 1 / steps)), np.float64)
    discrete[steps] = float(np.sum((as_ - at) / (1 - at) * expected(t)))
  return continuous, discrete


@pytest.mark.parametrize("schedule", [Schedule("linear"), Schedule("cosine")], ids=lambda s: s.name)
def test_bounds_dominate_the_exact_nll_and_tighten_with_steps(schedule):
  x = SEQS[int(np.argmax(JOINT))]
  exact = -math.log(JOINT.max())
  continuous, discrete = exact_bounds(x, schedule, [1, 2, 8, 64, 512])
  assert continuous >= exact - 1e-6
  values = [discrete[t] for t in (1, 2, 8, 64, 512)]
  assert all(a >= b - 1e-9 for a, b in zip(values, values[1:]))  # more steps: a tighter bound
  assert values[-1] >= continuous - 1e-3 and abs(values[-1] - continuous) < 0.01 * continuous
  assert values[0] > continuous + 0.1  # T = 1 (all masked at once) is clearly looser


def _mc(fn, x, n=40000, seed=0):
  tokens = jnp.tile(jnp.asarray(x, jnp.int32)[None], (n, 1))
  return float(jnp.mean(jax.jit(fn)(tokens, jax.random.key(seed))["nelbo"]))


def test_monte_carlo_estimators_match_the_exact_bounds():
  schedule = Schedule("linear")
  x = SEQS[17]
  continuous, discrete = exact_bounds(x, schedule, [4])
  cont_mc = _mc(lambda tok, k: diffusion.diffusion_loss(markov_oracle, tok, k, schedule, MASK), x)
  disc_mc = _mc(lambda tok, k: diffusion.discrete_loss(markov_oracle, tok, k, schedule, MASK, 4), x)
  assert abs(cont_mc - continuous) < 0.03 * continuous
  assert abs(disc_mc - discrete[4]) < 0.03 * discrete[4]
