import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import sampling
from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule

V, L = 3, 4
MASK = V
# A sticky first-order Markov chain: strong dependence between neighbours, so the joint differs
# clearly from the product of its marginals.
INIT = np.array([0.6, 0.3, 0.1])
TRANS = np.array([[0.85, 0.10, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]])
SEQS = np.array(list(itertools.product(range(V), repeat=L)))  # [N, L]
JOINT = INIT[SEQS[:, 0]] * np.prod(TRANS[SEQS[:, :-1], SEQS[:, 1:]], axis=1)
MARGINALS = np.stack([np.bincount(SEQS[:, i], weights=JOINT, minlength=V) for i in range(L)])
PRODUCT = np.prod(MARGINALS[np.arange(L), SEQS], axis=1)


def markov_oracle(tokens_BxL, t_B):
  """Exact p(x0_i | x_t) of the Markov chain, by enumeration of all V**L sequences."""
  del t_B
  seqs = jnp.asarray(SEQS)
  consistent = jnp.all((tokens_BxL[:, None, :] == MASK) | (tokens_BxL[:, None, :] == seqs[None]), axis=-1)
  weights = consistent * jnp.asarray(JOINT, jnp.float32)[None]  # [B, N]
  marg = jnp.einsum("bn,nlv->blv", weights, jax.nn.one_hot(seqs, V))
  return jnp.log(marg / jnp.sum(marg, axis=-1, keepdims=True) + 1e-30)


def _empirical(samples):
  index = (samples * V**np.arange(L - 1, -1, -1)).sum(-1)
  return np.bincount(index, minlength=V**L) / len(samples)


def _sample(n, steps, schedule=Schedule("linear"), seed=0, tokens=None):
  tokens = jnp.full((n, L), MASK, jnp.int32) if tokens is None else tokens
  fn = jax.jit(lambda k, x, ids: sampling.ancestral_sample(
      markov_oracle, k, x, ids, steps=steps, schedule=schedule, mask_id=MASK))
  return np.asarray(fn(jax.random.key(seed), tokens, jnp.arange(n)))


def tv(p, q):
  return 0.5 * np.abs(p - q).sum()


def test_oracle_is_discriminative():
  assert tv(JOINT, PRODUCT) > 0.3


@pytest.mark.parametrize("schedule", [Schedule("linear"), Schedule("cosine")], ids=lambda s: s.name)
def test_many_steps_sample_the_joint(schedule):
  # 8000 draws over 81 outcomes: the empirical TV to the truth is about 0.04 (sampling noise); a
  # sampler that ignored dependence would sit near TV(joint, product) > 0.3.
  samples = _sample(8000, 256, schedule)
  assert tv(_empirical(samples), JOINT) < 0.06


def test_one_step_samples_the_product_of_marginals():
  samples = _sample(8000, 1)
  assert tv(_empirical(samples), PRODUCT) < 0.06
  assert tv(_empirical(samples), JOINT) > 0.2


def test_prompt_kept_and_no_mask_left():
  tokens = jnp.full((64, L), MASK, jnp.int32).at[:, 0].set(2)
  samples = _sample(64, 3, tokens=tokens)
  assert (samples != MASK).all() and (samples[:, 0] == 2).all()
  # Conditioning works: after a 2, the chain sticks to 2 most of the time.
  assert (samples[:, 1] == 2).mean() > 0.6


def test_per_example_keys_make_samples_batch_invariant():
  big = _sample(16, 8, seed=5)
  for i in (0, 7, 15):
    fn = jax.jit(lambda k, x, ids: sampling.ancestral_sample(
        markov_oracle, k, x, ids, steps=8, schedule=Schedule("linear"), mask_id=MASK))
    one = np.asarray(fn(jax.random.key(5), jnp.full((1, L), MASK, jnp.int32), jnp.array([i])))
    np.testing.assert_array_equal(one[0], big[i])


def test_trajectory_reveals_monotonically():
  fn = jax.jit(lambda k, x, ids: sampling.ancestral_sample(
      markov_oracle, k, x, ids, steps=6, schedule=Schedule("linear"), mask_id=MASK, return_trajectory=True))
  final, trajectory = fn(jax.random.key(0), jnp.full((32, L), MASK, jnp.int32), jnp.arange(32))
  trajectory = np.asarray(trajectory)
  masked = (trajectory == MASK).sum(axis=(1, 2))
  assert np.all(np.diff(masked) <= 0) and masked[-1] == 0
  np.testing.assert_array_equal(trajectory[-1], np.asarray(final))
  # A revealed token never changes afterwards.
  for s in range(1, 6):
    was = trajectory[s - 1] != MASK
    np.testing.assert_array_equal(trajectory[s][was], trajectory[s - 1][was])


def test_bad_inputs():
  with pytest.raises(UserError, match="steps=0"):
    sampling.check_steps(0)

  class Tok:
    mask_id = 9

    @staticmethod
    def encode(text):
      return [1] * len(text)

  with pytest.raises(UserError, match="prompt is 5 tokens, longer than seq_len=4"):
    sampling.prompt_tokens(Tok, "hello", 4, 2)
  with pytest.raises(UserError, match="temperature=-1"):
    sampling.make_sampler(None, steps=2, schedule=Schedule(), mask_id=3, temperature=-1.0)
