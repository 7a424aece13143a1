"""Likelihood bounds on an oracle whose exact likelihood is known (a Markov chain, all 81 sequences).

The reference bounds come from enumeration of every mask pattern, with alpha and w(t) from the
test's own closed forms (test_schedules.reference_alpha / reference_weight), not from the library.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import diffusion
from diffusion_lm.schedules import Schedule
from test_schedules import reference_alpha, reference_weight

V, L = 3, 4
MASK = V
INIT = np.array([0.5, 0.3, 0.2])
TRANS = np.array([[0.80, 0.15, 0.05], [0.10, 0.75, 0.15], [0.10, 0.10, 0.80]])  # sticky: neighbours depend
SEQS = np.array(list(itertools.product(range(V), repeat=L)))  # [81, L]
JOINT = INIT[SEQS[:, 0]] * np.prod(TRANS[SEQS[:, :-1], SEQS[:, 1:]], axis=1)


def oracle(tokens_BxL, t_B):
  """Exact log p(x0_n | x_t) of the chain for every position, by enumeration of all sequences."""
  del t_B
  seqs = jnp.asarray(SEQS)
  consistent = jnp.all((tokens_BxL[:, None, :] == MASK) | (tokens_BxL[:, None, :] == seqs[None]), axis=-1)
  weights = consistent * jnp.asarray(JOINT, jnp.float32)[None]  # [B, 81]
  marginal_BxLxV = jnp.einsum("bn,nlv->blv", weights, jax.nn.one_hot(seqs, V))
  return jnp.log(marginal_BxLxV / jnp.sum(marginal_BxLxV, axis=-1, keepdims=True) + 1e-30)


def _conditional_nll(x, masked):
  """sum over masked n of -log p(x_n | the unmasked part of x), exactly, by enumeration."""
  consistent = np.all(masked[None] | (SEQS == x[None]), axis=1)
  w = JOINT * consistent
  return -sum(math.log(w[SEQS[:, n] == x[n]].sum() / w.sum()) for n in np.flatnonzero(masked))


def exact_bounds(x, schedule, steps_list):
  """(continuous-time bound, {T: discrete T-step bound}) for sequence x, in nats, by enumeration of the
  2^L mask patterns and quadrature over t."""
  masks = [np.array(m, bool) for m in itertools.product([False, True], repeat=L)]
  nll = {tuple(m): _conditional_nll(x, m) for m in masks}

  def expected(t):  # E_{mask ~ q(.|t)} sum_masked -log p, vectorised over an array of t
    a = reference_alpha(schedule, t)
    return sum((1 - a)**m.sum() * a**(L - m.sum()) * nll[tuple(m)] for m in masks)

  grid = (np.arange(200_000) + 0.5) / 200_000
  continuous = float(np.mean(reference_weight(schedule, grid) * expected(grid)))
  discrete = {}
  for steps in steps_list:
    t = np.arange(1, steps + 1) / steps
    at, as_ = reference_alpha(schedule, t), reference_alpha(schedule, t - 1 / steps)
    discrete[steps] = float(np.sum((as_ - at) / (1 - at) * expected(t)))
  return continuous, discrete


def test_one_step_bound_is_the_all_masked_nll():
  # T = 1 unmasks everything at once from x_1 = all [MASK]: the bound is sum_n -log p(x_n) marginally.
  x = SEQS[40]
  marginals = [np.bincount(SEQS[:, n], weights=JOINT, minlength=V) for n in range(L)]
  by_hand = -sum(math.log(marginals[n][x[n]]) for n in range(L))
  _, discrete = exact_bounds(x, Schedule("cosine"), [1])
  assert abs(discrete[1] - by_hand) < 1e-9


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


def _mean_and_error(fn, x, n=40_000, seed=0):
  """Monte Carlo mean of fn's per-sequence nelbo over n copies of x, and its standard error."""
  tokens = jnp.tile(jnp.asarray(x, jnp.int32)[None], (n, 1))
  values = np.asarray(jax.jit(fn)(tokens, jax.random.key(seed))["nelbo"], np.float64)
  return values.mean(), values.std() / math.sqrt(n)


@pytest.mark.parametrize("schedule", [Schedule("linear"), Schedule("cosine")], ids=lambda s: s.name)
def test_monte_carlo_estimators_match_the_enumerated_bounds(schedule):
  x = SEQS[17]
  continuous, discrete = exact_bounds(x, schedule, [4])
  mean, error = _mean_and_error(lambda tok, k: diffusion.diffusion_loss(oracle, tok, k, schedule, MASK), x)
  assert abs(mean - continuous) < 4 * error, (mean, continuous, error)
  for u_B in (None, (jnp.arange(40_000) + 0.5) / 40_000):  # random and stratified step indices
    mean, error = _mean_and_error(
        lambda tok, k, u=u_B: diffusion.discrete_loss(oracle, tok, k, schedule, MASK, 4, u_B=u), x)
    assert abs(mean - discrete[4]) < 4 * error + 1e-4, (mean, discrete[4], error)
