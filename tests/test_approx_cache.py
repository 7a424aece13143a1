"""Fast-dLLM's approximate caches (prefix / dual) for the blocks sampler of a bidirectional model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import objectives
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig, Transformer
from diffusion_lm.samplers import SamplerConfig
from diffusion_lm.schedules import Schedule

V = 13
CFG = ModelConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_len=16, time_conditioning=True)


def _init(cfg):
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, V + 1)
  params = model.init(jax.random.key(0), tokens, jnp.full((2,), 0.5))["params"]
  # The time-conditioning layers start at zero; random values make t matter in these tests.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  return model, params, tokens


@pytest.mark.parametrize("layers", [1, 2])
def test_reuse_matches_the_full_forward_exactly_when_nothing_outside_changed(layers):
  model, params, tokens = _init(dataclasses.replace(CFG, num_layers=layers))
  t = jnp.array([0.3, 0.8])
  full, variables = model.apply({"params": params}, tokens, t, approx_cache="store", mutable=["approx_cache"])
  np.testing.assert_allclose(full, model.apply({"params": params}, tokens, t), atol=1e-5)
  chunk = model.apply({"params": params, **variables}, tokens[:, 4:8], t, positions_L=jnp.arange(4, 8),
                      approx_cache="reuse")
  np.testing.assert_allclose(chunk, full[:, 4:8], atol=1e-5)


def test_reuse_is_exact_for_one_layer_and_approximate_for_two_when_the_chunk_changed():
  changed = None
  for layers in (1, 2):
    model, params, tokens = _init(dataclasses.replace(CFG, num_layers=layers))
    t = jnp.array([0.3, 0.8])
    _, variables = model.apply({"params": params}, tokens, t, approx_cache="store", mutable=["approx_cache"])
    changed = tokens.at[:, 4:8].set((tokens[:, 4:8] + 1) % V)
    fresh = model.apply({"params": params}, changed, t)[:, 4:8]
    reused = model.apply({"params": params, **variables}, changed[:, 4:8], t, positions_L=jnp.arange(4, 8),
                         approx_cache="reuse")
    gap = float(jnp.max(jnp.abs(reused - fresh)))
    if layers == 1:  # first-layer keys/values depend on their own token only: the kept ones are still right
      assert gap < 1e-5
    else:  # deeper layers' kept keys/values saw the old chunk
      assert gap > 1e-3


def _generate(model, params, tokens, **kwargs):
  cfg = SamplerConfig(**{"name": "blocks", "steps": 8, "block_length": 4, "temperature": 0.0, **kwargs})
  fn = jax.jit(lambda p, x: objectives.get("diffusion").generate(
      model, p, jax.random.key(3), x, jnp.arange(x.shape[0]), cfg, schedule=Schedule("cosine"), mask_id=V, bos_id=0,
      eos_id=None, return_trajectory=True))
  return fn(params, tokens)


def _prompted(batch=3):
  tokens = jnp.full((batch, 16), V, jnp.int32)
  return tokens.at[:, :3].set(jnp.arange(3 * batch).reshape(batch, 3) % V).at[:, 10].set(5)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_layer_network_decodes_exactly_as_the_uncached_blocks_sampler(mode):
  model, params, _ = _init(dataclasses.replace(CFG, num_layers=1))
  tokens = _prompted()
  ref = _generate(model, params, tokens)
  out = _generate(model, params, tokens, approx_cache=mode)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.trajectory, ref.trajectory)
  assert int(out.num_calls) == 8 and np.all(out.steps_used == ref.steps_used)
  assert np.all(out.tokens[:, :3] == tokens[:, :3]) and np.all(out.tokens[:, 10] == 5)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_step_per_block_is_exact_for_any_depth(mode):
  """Exact by construction: each block's only step takes the logits of the forward that stores the cache,
  so the cached path never runs. That path is tested by the one-layer test (2 steps per block, exact) and
  test_prefix_recomputes_the_rest_of_the_sequence_and_dual_only_the_block."""
  model, params, _ = _init(CFG)
  tokens = _prompted()
  ref = _generate(model, params, tokens, steps=4)
  np.testing.assert_array_equal(_generate(model, params, tokens, steps=4, approx_cache=mode).tokens, ref.tokens)


def test_settings_that_cannot_use_the_cache_are_refused():
  with pytest.raises(UserError, match="approx_cache='dual' with sampler='confidence'"):
    SamplerConfig(name="confidence", approx_cache="dual")
  with pytest.raises(UserError, match="approx_cache='huge'; allowed: none, prefix, dual"):
    SamplerConfig(name="blocks", approx_cache="huge")
  with pytest.raises(UserError, match="one of the two"):
    SamplerConfig(name="blocks", approx_cache="prefix", guidance=1.0)
  block_model = Transformer(dataclasses.replace(CFG, block_size=4, time_conditioning=False))
  with pytest.raises(UserError, match="bidirectional"):
    block_model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), approx_cache="store")


def test_the_sample_header_says_the_cache_is_approximate():
  from diffusion_lm.api import Generation
  cfg = SamplerConfig(name="blocks", steps=8, block_length=4, approx_cache="dual")
  header = Generation(texts=["a"], output=None, template=None, sampler=cfg, seq_len=16, seed=0, step=3,
                      block_size=0).describe()
  assert "blocks sampler with the approximate dual cache, 8 steps" in header


class _Spy:
  """The model, recording the length of every chunk run against the kept keys/values (approx_cache='reuse')."""

  def __init__(self, model):
    self.model, self.config, self.reused = model, model.config, []

  def apply(self, variables, tokens, t=None, **kwargs):
    if kwargs.get("approx_cache") == "reuse":
      self.reused.append(tokens.shape[1])
    return self.model.apply(variables, tokens, t, **kwargs)


@pytest.mark.parametrize("mode, chunks", [("prefix", [16, 12, 8, 4]), ("dual", [4, 4, 4, 4])])
def test_prefix_recomputes_the_rest_of_the_sequence_and_dual_only_the_block(mode, chunks):
  """Two steps per block of 4 in 16 positions: each block's second step runs the cached path (traced once
  per block), on [block .. end] (prefix) or on the block alone (dual)."""
  model, params, _ = _init(CFG)
  spy = _Spy(model)
  _generate(spy, params, _prompted(), approx_cache=mode)
  assert spy.reused == chunks
