"""Objectives: block diffusion's loss against slow references, cached block decoding, variable length."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import diffusion, objectives
from diffusion_lm.model import ModelConfig, Transformer
from diffusion_lm.objectives.block import block_nelbo
from diffusion_lm.samplers import SamplerConfig, block_decode, remdm, threshold
from diffusion_lm.samplers.common import Run
from diffusion_lm.schedules import Schedule

VOCAB, L = 11, 16
MASK = VOCAB


def tiny(block_size, max_len=L, decode_window=0):
  model = Transformer(ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=2, mlp_dim=64,
                                  max_len=max_len, block_size=block_size, decode_window=decode_window))
  params = model.init(jax.random.key(1), jnp.zeros((1, L), jnp.int32))["params"]
  # Non-zero, varied weights so that attention patterns matter for the output.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  return model, params


def apply_fn(model, params):
  return lambda x, t=None, **kw: model.apply({"params": params}, x, t, **kw)


TOKENS = jax.random.randint(jax.random.key(7), (4, L), 0, VOCAB)


def test_whole_sequence_block_is_masked_diffusion_exactly():
  model, params = tiny(L)
  schedule, t_B = Schedule("cosine"), jnp.array([0.2, 0.5, 0.7, 0.9])
  key = jax.random.key(3)
  block = block_nelbo(apply_fn(model, params), TOKENS, key, schedule, MASK, L, t_BxN=t_B[:, None])
  masked = diffusion.diffusion_loss(apply_fn(model, params), TOKENS, key, schedule, MASK, t_B=t_B)
  np.testing.assert_allclose(np.asarray(block["nelbo"]), np.asarray(masked["nelbo"]), rtol=1e-5)
  np.testing.assert_array_equal(block["num_masked"], masked["num_masked"])


def _slow_block_nelbo(model, params, tokens, key, schedule, block_size, t_BxN):
  """Block by block: the clean prefix (block-causal among itself) and the noisy block, one forward each."""
  batch, length = tokens.shape
  _, mask_key = jax.random.split(key)
  alpha = jnp.repeat(schedule.alpha(t_BxN), block_size, axis=1)
  noisy, masked = diffusion.forward_mask(mask_key, tokens, alpha, MASK)
  total = np.zeros(batch)
  for b in range(length // block_size):
    lo, hi = b * block_size, (b + 1) * block_size
    x = jnp.concatenate([tokens[:, :lo], noisy[:, lo:hi]], axis=1)
    blk = np.arange(hi) // block_size
    attend = blk[None, :] <= blk[:, None]  # clean blocks causal; the noisy (last) block sees all before and itself
    logits = model.apply({"params": params}, x, None, positions_L=jnp.arange(hi), mask_QxK=jnp.asarray(attend))
    logp = np.asarray(jax.nn.log_softmax(logits[:, lo:hi], axis=-1))
    nll = -np.take_along_axis(logp, np.asarray(tokens[:, lo:hi])[..., None], axis=-1)[..., 0]
    total += np.asarray(schedule.weight(t_BxN[:, b])) * (nll * np.asarray(masked[:, lo:hi])).sum(-1)
  return total


@pytest.mark.parametrize("block_size", [4, 8])
def test_vectorized_block_loss_equals_the_block_by_block_reference(block_size):
  model, params = tiny(block_size)
  schedule, key = Schedule("linear"), jax.random.key(5)
  t = jax.random.uniform(jax.random.key(9), (4, L // block_size), minval=0.05, maxval=1.0)
  fast = block_nelbo(apply_fn(model, params), TOKENS, key, schedule, MASK, block_size, t_BxN=t)["nelbo"]
  slow = _slow_block_nelbo(model, params, TOKENS, key, schedule, block_size, t)
  np.testing.assert_allclose(np.asarray(fast), slow, rtol=2e-4)


def test_unit_blocks_give_the_autoregressive_likelihood_in_expectation():
  model, params = tiny(1)
  tokens = TOKENS[:1]
  # Closed form of the one-token time integral: E_t[w(t) 1{masked}] = int -alpha'(t) dt = 1, so the
  # expected loss is sum_i -log p(x_i | [MASK] at i, x_<i), a causal forward with a [MASK] appended.
  exact = 0.0
  for i in range(L):
    x = jnp.concatenate([tokens[:, :i], jnp.full((1, 1), MASK)], axis=1)
    logits = model.apply({"params": params}, x, None, positions_L=jnp.arange(i + 1),
                         mask_QxK=jnp.tril(jnp.ones((i + 1, i + 1), bool)))
    exact -= float(jax.nn.log_softmax(logits[0, -1])[tokens[0, i]])
  draws = 4000
  batch = jnp.tile(tokens, (draws, 1))
  estimate = jax.jit(lambda k: block_nelbo(apply_fn(model, params), batch, k, Schedule("linear"), MASK, 1)["nelbo"])(
      jax.random.key(0))
  estimate = np.asarray(estimate)
  se = estimate.std() / math.sqrt(draws)
  assert abs(estimate.mean() - exact) < 4 * se + 1e-3, (estimate.mean(), exact, se)


# ----------------------------------------------------------------------------- decoding


def _reference_decode(model, params, key, tokens, ids, cfg, block_size, window=None):
  """Recomputes the prefix (its last `window` - block_size positions) at every denoising step, no cache,
  with the same keys as the cached decoder."""
  keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
  x = tokens
  inner = {"ancestral": remdm, "threshold": threshold}[cfg.name]
  for b in range(tokens.shape[1] // block_size):
    lo, hi = b * block_size, (b + 1) * block_size
    first = 0 if window is None else max(0, hi - window)
    prefix = x[:, first:lo]
    blk = np.arange(first, hi) // block_size
    attend = jnp.asarray(blk[None, :] <= blk[:, None])

    def denoiser(xc, t, prefix=prefix, hi=hi, attend=attend, first=first):
      full = jnp.concatenate([prefix, xc], axis=1)
      logits = model.apply({"params": params}, full, None, positions_L=jnp.arange(first, hi), mask_QxK=attend)
      return logits[:, -block_size:]

    run = Run(denoiser=denoiser, keys_B=jax.vmap(lambda k, b=b: jax.random.fold_in(k, b))(keys_B),
              given_BxL=x[:, lo:hi] != MASK, cfg=cfg, schedule=Schedule("linear"), mask_id=MASK, record_steps=0,
              time_independent=True)
    out = inner.sample(run, x[:, lo:hi])
    x = x.at[:, lo:hi].set(out.tokens)
  return np.asarray(x)


@pytest.mark.parametrize("cfg", [SamplerConfig("ancestral", steps=4), SamplerConfig("threshold", steps=4, threshold=0.3)],
                         ids=lambda c: c.name)
def test_cached_block_decoding_matches_recomputing_the_prefix(cfg):
  model, params = tiny(4)
  start = jnp.full((3, L), MASK, jnp.int32).at[:, :2].set(3)  # a two-token prompt inside the first block
  ids = jnp.arange(3)
  fast = jax.jit(lambda k, x: block_decode.sample(model, params, k, x, ids, cfg, schedule=Schedule("linear"),
                                                  mask_id=MASK))(jax.random.key(2), start)
  slow = _reference_decode(model, params, jax.random.key(2), start, ids, cfg, 4)
  np.testing.assert_array_equal(np.asarray(fast.tokens), slow)
  assert (np.asarray(fast.tokens)[:, :2] == 3).all()
  # Every step runs the network on one block (the first also commits the block before): at least one
  # call per block, at most the step budget.
  assert 4 <= int(fast.num_calls) <= 4 * 4


def test_decoding_past_the_window_slides_over_the_last_positions():
  model, params = tiny(4, max_len=16, decode_window=8)  # each block sees the 4 positions before it
  cfg = SamplerConfig("ancestral", steps=4)
  start = jnp.full((2, 24), MASK, jnp.int32)
  ids = jnp.arange(2)
  fast = jax.jit(lambda k, x: block_decode.sample(model, params, k, x, ids, cfg, schedule=Schedule("linear"),
                                                  mask_id=MASK))(jax.random.key(4), start)
  slow = _reference_decode(model, params, jax.random.key(4), start, ids, cfg, 4, window=8)
  np.testing.assert_array_equal(np.asarray(fast.tokens), slow)
  assert not (slow == _reference_decode(model, params, jax.random.key(4), start, ids, cfg, 4)).all()


def test_one_program_for_any_number_of_blocks():
  model, params = tiny(4, max_len=L)
  cfg = SamplerConfig("ancestral", steps=2)

  def forwards(length):
    jaxpr = jax.make_jaxpr(lambda x: block_decode.sample(model, params, jax.random.key(0), x, jnp.arange(2), cfg,
                                                         schedule=Schedule("linear"), mask_id=MASK))(
        jnp.full((2, length), MASK, jnp.int32))
    return str(jaxpr).count("dot_general")

  assert forwards(8) == forwards(64) > 0  # the block loop is not unrolled


class EndsAt:
  """A stand-in network for the decoder: certain of token 1 before absolute position `end`, of EOS after.

  Implements the slice of the linen interface the block decoder uses (apply with a cache collection).
  """

  def __init__(self, end, eos, block_size):
    self.end, self.eos = end, eos
    self.config = ModelConfig(vocab_size=VOCAB, max_len=L, block_size=block_size)

  def apply(self, variables, tokens, t=None, decode=False, commit=True, mutable=()):
    cache = variables.get("cache", {"index": jnp.zeros((), jnp.int32)})
    positions = cache["index"] + jnp.arange(tokens.shape[1])
    token = jnp.where(positions >= self.end, self.eos, 1)
    logits = jnp.where(jnp.arange(VOCAB)[None, :] == token[:, None], 0.0, -30.0)
    logits = jnp.broadcast_to(logits, tokens.shape + (VOCAB,))
    kept = tokens.shape[1] if commit is True else int(commit)  # commit: True (all), False, or a count
    new_cache = {"index": cache["index"] + (kept if "cache" in variables else 0)}
    return (logits, {"cache": new_cache}) if mutable else logits


def test_generation_stops_at_the_end_of_document_token_and_may_exceed_max_len():
  eos = 2
  model = EndsAt(end=21, eos=eos, block_size=4)  # the 22nd token ends the document, past max_len = 16
  start = jnp.full((2, 40), MASK, jnp.int32)
  out = jax.jit(lambda x: block_decode.sample(model, {}, jax.random.key(0), x, jnp.arange(2),
                                              SamplerConfig("ancestral", steps=2), schedule=Schedule("linear"),
                                              mask_id=MASK, eos_id=eos))(start)
  tokens = np.asarray(out.tokens)
  assert (np.asarray(out.lengths) == 22).all()
  assert (tokens[:, :21] == 1).all() and (tokens[:, 21:] == eos).all()
  # Six blocks of four reach position 21 in two steps each; the remaining four blocks were never run.
  assert int(out.num_calls) == 6 * 2


def test_objectives_registry():
  assert objectives.OBJECTIVES == ("diffusion", "ar", "block", "sft")
  assert objectives.of_model(ModelConfig(vocab_size=5, block_size=4)).name == "block"
  assert objectives.of_model(ModelConfig(vocab_size=5, causal=True)).name == "ar"
  assert objectives.of_model(ModelConfig(vocab_size=5)).name == "diffusion"


def test_committing_a_block_gives_the_logits_of_the_block_causal_forward():
  """The forward that commits finished block 0 and starts block 1 ([block 0 | block 1], commit=4) must give
  block 1 the logits of the uncached block-causal forward, and keep block 0's keys/values as block 0 alone
  computes them: the finished block never sees the noisy block beside it (a leak moves block 1's logits by
  about 1e-4). Block 2's logits against the cache check what was kept."""
  model, params = tiny(4)
  x = TOKENS[:2, :12].at[:, 5:7].set(MASK).at[:, 8:12].set(MASK)
  attend = lambda n: jnp.asarray((np.arange(n) // 4)[None, :] <= (np.arange(n) // 4)[:, None])
  reference = model.apply({"params": params}, x, None, positions_L=jnp.arange(12), mask_QxK=attend(12))
  _, variables = model.apply({"params": params}, x[:, :4], decode=True, mutable=["cache"])
  logits0 = model.apply({"params": params, **variables}, x[:, :4], None, decode=True, commit=False)
  logits01, updated = model.apply({"params": params, **variables}, x[:, :8], None, decode=True, commit=4,
                                  mutable=["cache"])
  _, updated = model.apply({"params": params, **updated}, x[:, 4:12], None, decode=True, commit=4, mutable=["cache"])
  logits2 = model.apply({"params": params, **updated}, x[:, 8:12], None, decode=True, commit=False)
  np.testing.assert_allclose(logits0, reference[:, :4], atol=1e-5)
  np.testing.assert_allclose(logits01[:, 4:], reference[:, 4:8], atol=1e-5)
  np.testing.assert_allclose(logits2, reference[:, 8:12], atol=1e-5)


def test_every_block_of_a_row_draws_its_own_time():
  """One time per block slot, stratified over all B x N slots: within a row the blocks' times differ, and
  the B x N times fall one in each of B x N equal strata of [T_MIN, 1] (t read back from w(t) = 1/t)."""
  batch, blocks = 8, 4
  tokens = jnp.zeros((batch, blocks * 4), jnp.int32)
  for seed in range(3):
    noise = objectives.block.block_noise(tokens, jax.random.key(seed), Schedule("linear"), MASK, 4)
    t_BxN = 1.0 / np.asarray(noise["weight"], np.float64)
    assert t_BxN.shape == (batch, blocks)
    assert all(len(set(np.round(row, 6))) == blocks for row in t_BxN)
    strata = np.floor((t_BxN - diffusion.T_MIN) / (1 - diffusion.T_MIN) * batch * blocks).astype(int)
    assert sorted(strata.ravel().tolist()) == list(range(batch * blocks))


class _Uniform:
  """A denoiser giving every token the same logit: its ELBO is log VOCAB nats per scored position."""
  config = type("C", (), {"d_model": 8, "time_conditioning": False, "block_size": 4})

  def apply(self, variables, tokens, t=None, **kwargs):
    return jnp.zeros(tokens.shape + (VOCAB,), jnp.float32)


@pytest.mark.parametrize("objective", ["diffusion", "block"])
def test_ignore_bos_never_masks_position_0_and_drops_it_from_the_average(objective):
  """BD3-LM's ignore_bos on framed windows: position 0 is held clean in training draws, and evaluation
  averages over the other L - 1 positions (a uniform denoiser: log V per counted position either way)."""
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  batch = 256
  rows = jax.random.randint(jax.random.key(0), (batch, L), 0, VOCAB).at[:, 0].set(3)
  noise = objectives.get(objective).noise(_Uniform(), rows, jax.random.key(1), schedule=Schedule("linear"),
                                          mask_id=MASK, bos_id=3, ignore_bos=True)
  assert not np.asarray(noise["is_masked"])[:, 0].any() and (np.asarray(noise["noisy"])[:, 0] == 3).all()
  assert np.asarray(noise["is_masked"])[:, 1:].mean() > 0.3
  for ignore, counted in ((True, L - 1), (False, L)):
    out = experiment.eval_step(None, rows, jnp.ones((batch,), bool), jax.random.key(2), model=_Uniform(),
                               schedule=Schedule("linear"), mask_id=MASK, num_t_samples=4, objective=objective,
                               ignore_bos=ignore)
    assert int(out["tokens"]) == batch * counted
    np.testing.assert_allclose(float(out["nats"]) / float(out["tokens"]), np.log(VOCAB), rtol=0.06)


def test_ignore_bos_applies_to_framed_windows_of_diffusion_and_block_only():
  from configs import lm1b, tiny  # pylint: disable=g-import-not-at-top
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  config = lm1b.get_config()
  assert experiment.ignores_bos(config)
  config.objective = "ar"
  assert not experiment.ignores_bos(config)  # BD3-LM's AR baseline scores every position
  config = tiny.get_config()
  assert not experiment.ignores_bos(config)  # unframed windows: position 0 is ordinary text
  config.data.frame_windows = True
  assert experiment.ignores_bos(config)
  config.data.ignore_bos = False
  assert not experiment.ignores_bos(config)


def test_a_block_model_starts_from_a_masked_diffusion_workdir(trained_workdir, tmp_path, data_cache):
  """BD3-LM's LM1B recipe: block diffusion fine-tuned from a masked-diffusion checkpoint (config.init_from).
  With a learning rate of 1e-9 one step leaves the source's EMA parameters in place."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_lm import experiment, train  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.cache_dir = data_cache
  config.objective, config.model.block_size, config.init_from = "block", 8, trained_workdir
  config.optimizer.update(learning_rate=1e-9, warmup_steps=0)
  config.training.update(num_steps=1, checkpoint_every=1)
  train.train_and_evaluate(config, str(tmp_path / "block"))
  tuned, source = experiment.load_trained(str(tmp_path / "block"), use_ema=False), experiment.load_trained(
      trained_workdir)
  assert tuned.model.config.block_size == 8 and tuned.step == 1
  for a, b in zip(jax.tree.leaves(tuned.params), jax.tree.leaves(source.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
