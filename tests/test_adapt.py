"""AR -> masked diffusion adaptation: the shift operation and attention-mask annealing."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import diffusion, objectives
from diffusion_lm.model import ModelConfig, Transformer
from diffusion_lm.schedules import Schedule

CFG = ModelConfig(vocab_size=11, num_layers=2, d_model=16, num_heads=2, mlp_dim=32, max_len=16)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def test_shifted_model_under_a_causal_mask_is_the_ar_model(params):
  """At the start of adaptation nothing changes: the shifted network under a causal mask gives, at
  position i, the AR model's next-token logits from position i - 1."""
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 12)
  ar = Transformer(dataclasses.replace(CFG, causal=True)).apply({"params": params}, tokens)
  shifted = Transformer(dataclasses.replace(CFG, shift_logits=True)).apply(
      {"params": params}, tokens, mask_QxK=jnp.tril(jnp.ones((8, 8), bool)))
  np.testing.assert_allclose(shifted[:, 1:], ar[:, :-1], atol=1e-5)
  np.testing.assert_allclose(shifted[:, 0], ar[:, 0], atol=1e-5)  # position 0 keeps its own output


@pytest.mark.parametrize("visible,causal", [(0.0, True), (1.0, False)])
def test_annealing_ends_are_causal_and_bidirectional(params, visible, causal):
  """visible_future 0 is the causal network's loss, 1 the bidirectional one's (same noise draws)."""
  tokens = jax.random.randint(jax.random.key(2), (4, 8), 0, 11)
  key = jax.random.key(3)
  got, _ = objectives.get("diffusion").loss(Transformer(CFG), params, tokens, key, schedule=Schedule("linear"),
                                            mask_id=11, bos_id=0, visible_future=visible)
  reference = Transformer(dataclasses.replace(CFG, causal=causal))
  want = diffusion.diffusion_loss(lambda x, t: reference.apply({"params": params}, x, t), tokens,
                                  jax.random.split(key)[0], Schedule("linear"), 11)["nelbo"]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_annealing_shows_that_share_of_the_future(params):
  """Halfway, about half of the later positions are visible: the loss lies strictly between the ends."""
  seen = []

  class Spy:
    config = CFG

    def apply(self, variables, tokens, t, mask_QxK=None):
      seen.append(mask_QxK)
      return jnp.zeros(tokens.shape + (11,))

  objectives.get("diffusion").loss(Spy(), params, jnp.zeros((1, 64), jnp.int32), jax.random.key(4),
                                   schedule=Schedule("linear"), mask_id=11, bos_id=0, visible_future=0.5)
  mask = np.asarray(seen[0])
  upper = mask[np.triu_indices(64, 1)]
  assert np.all(mask[np.tril_indices(64)]) and 0.45 < upper.mean() < 0.55


def test_training_anneals_from_causal_towards_bidirectional():
  """Over training.attention_anneal_steps = 4 optimizer steps the visible share of later positions grows
  1/4, 1/2, 3/4, 1, then stays bidirectional (a backwards schedule would end causal)."""
  import optax  # pylint: disable=g-import-not-at-top
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  shares = []

  class Spy:
    config = CFG

    def apply(self, variables, tokens, t, mask_QxK=None):
      shares.append(float(np.asarray(mask_QxK)[np.triu_indices(tokens.shape[1], 1)].mean()))
      return jnp.zeros(tokens.shape + (11,)) + variables["params"]["w"]

  tx = optax.sgd(0.1)
  weights = {"w": jnp.zeros(())}
  state = experiment.TrainState(step=jnp.int32(0), params=weights, ema_params=weights, opt_state=tx.init(weights))
  for _ in range(6):
    state, _ = experiment.train_step(state, jnp.zeros((2, 96), jnp.int32), jax.random.key(0), model=Spy(), tx=tx,
                                     schedule=Schedule("linear"), mask_id=11, ema_decay=0.0, anneal_steps=4)
  np.testing.assert_allclose(shares, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], atol=0.03)
