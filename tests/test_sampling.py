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


def _run(cfg, n=64, seed=0, tokens=None, oracle=markov_oracle, length=L, trajectory=True):
  tokens = jnp.full((n, length), MASK, jnp.int32) if tokens is None else jnp.asarray(tokens)
  fn = jax.jit(lambda k, x, ids: sampling.sample(oracle, k, x, ids, cfg, schedule=Schedule("linear"),
                                                 mask_id=MASK, return_trajectory=trajectory))
  out = fn(jax.random.key(seed), tokens, jnp.arange(tokens.shape[0]))
  return jax.tree.map(np.asarray, out)


def markov_oracle_n(length, trans=TRANS):
  """Exact conditionals of the chain over `length` positions (enumerates V**length sequences)."""
  seqs = np.array(list(itertools.product(range(V), repeat=length)))
  joint = INIT[seqs[:, 0]] * np.prod(trans[seqs[:, :-1], seqs[:, 1:]], axis=1)

  def oracle(tokens_BxL, t_B):
    del t_B
    s = jnp.asarray(seqs)
    consistent = jnp.all((tokens_BxL[:, None, :] == MASK) | (tokens_BxL[:, None, :] == s[None]), axis=-1)
    weights = consistent * jnp.asarray(joint, jnp.float32)[None]
    marg = jnp.einsum("bn,nlv->blv", weights, jax.nn.one_hot(s, V))
    return jnp.log(marg / jnp.sum(marg, axis=-1, keepdims=True) + 1e-30)

  return oracle


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


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_ancestral_grids_and_remdm_sample_the_joint(grid):
  for cfg in (sampling.SamplerConfig("ancestral", steps=256, time_grid=grid),
              sampling.SamplerConfig("remdm", steps=256, time_grid=grid, remask_eta=0.02)):
    out = _run(cfg, n=8000, trajectory=False)
    assert tv(_empirical(out.tokens), JOINT) < 0.06, cfg


def test_logit_cache_changes_nothing_but_the_call_count():
  cached = _run(sampling.SamplerConfig("ancestral", steps=64, cache=True), n=16)
  fresh = _run(sampling.SamplerConfig("ancestral", steps=64, cache=False), n=16)
  np.testing.assert_array_equal(cached.tokens, fresh.tokens)
  np.testing.assert_array_equal(cached.trajectory, fresh.trajectory)
  assert int(fresh.num_calls) == 64
  # 16 sequences x 4 tokens revealed over 64 steps: at most 64 steps change anything, most do not.
  assert int(cached.num_calls) < 64


def test_remdm_revises_committed_tokens():
  out = _run(sampling.SamplerConfig("remdm", steps=32, remask_eta=0.5), n=64)
  traj = out.trajectory
  remasked = (traj[:-1] != MASK) & (traj[1:] == MASK)
  assert remasked.any() and not (out.tokens == MASK).any()


COMMITTING = [
    sampling.SamplerConfig("confidence", steps=8, confidence="max_prob"),
    sampling.SamplerConfig("confidence", steps=8, confidence="margin", commit_schedule="cosine"),
    sampling.SamplerConfig("confidence", steps=8, confidence="entropy"),
    sampling.SamplerConfig("confidence", steps=8, confidence="random"),
    sampling.SamplerConfig("blocks", steps=8, block_length=4),
    sampling.SamplerConfig("threshold", steps=8, threshold=0.5),
]


@pytest.mark.parametrize("cfg", COMMITTING, ids=lambda c: f"{c.name}-{c.confidence}-{c.commit_schedule}")
def test_committing_samplers_keep_given_and_committed_tokens(cfg):
  length = 8
  given = np.full((32, length), MASK, np.int32)
  given[:, 0], given[:, 5] = 2, 0  # a prompt token and an infill token
  out = _run(cfg, tokens=given, length=length, oracle=markov_oracle_n(length))
  traj = out.trajectory
  assert not (out.tokens == MASK).any()
  assert (traj[:, :, 0] == 2).all() and (traj[:, :, 5] == 0).all()
  frames = np.concatenate([given[None], traj])
  committed = frames[:-1] != MASK
  assert (frames[1:][committed] == frames[:-1][committed]).all()


@pytest.mark.parametrize("cfg", [sampling.SamplerConfig("confidence", steps=8),
                                 sampling.SamplerConfig("confidence", steps=8, confidence="random"),
                                 sampling.SamplerConfig("blocks", steps=8, block_length=2)],
                         ids=lambda c: f"{c.name}-{c.confidence}")
def test_steps_equal_to_length_commit_one_per_step(cfg):
  length = 8
  out = _run(cfg, length=length, oracle=markov_oracle_n(length))
  masked = np.concatenate([[np.full(out.trajectory.shape[1], length)],
                           (out.trajectory == MASK).sum(-1)])
  assert (np.diff(masked, axis=0) == -1).all()


def test_blocks_fill_left_to_right():
  length = 8
  out = _run(sampling.SamplerConfig("blocks", steps=4, block_length=4), length=length,
             oracle=markov_oracle_n(length))
  traj = out.trajectory
  assert (traj[:2, :, 4:] == MASK).all()  # second block untouched during the first block's 2 steps
  assert not (traj[1, :, :4] == MASK).any()  # first block complete after its steps


def test_threshold_uses_fewer_steps_when_confident():
  length = 8
  confident = markov_oracle_n(length, trans=np.array([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01],
                                                      [0.01, 0.01, 0.98]]))
  given = np.full((16, length), MASK, np.int32)
  given[:, 0] = 1
  out = _run(sampling.SamplerConfig("threshold", steps=length, threshold=0.9), tokens=given,
             length=length, oracle=confident)
  assert not (out.tokens == MASK).any()
  assert int(out.num_calls) < length - 1 and (out.steps_used < length - 1).all()
  assert int(out.num_calls) == int(out.steps_used.max())


def test_top_k_one_is_argmax_and_top_p_keeps_the_nucleus():
  greedy = _run(sampling.SamplerConfig("ancestral", steps=4, temperature=0.0), n=8)
  top1 = _run(sampling.SamplerConfig("ancestral", steps=4, top_k=1), n=8)
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  logits = jnp.log(jnp.array([[[0.05, 0.5, 0.15, 0.3]]]))
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.7)))[0, 0]
  assert kept.tolist() == [False, True, False, True]
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.81)))[0, 0]
  assert kept.tolist() == [False, True, True, True]
  kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_k=2)))[0, 0]
  assert kept.tolist() == [False, True, False, True]


@pytest.mark.parametrize("float64", [False, True])
def test_draws_follow_the_distribution(float64):
  probs = np.array([0.6, 0.25, 0.1, 0.05])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 1, 4))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4000))
  cfg = sampling.SamplerConfig(float64=float64)
  if float64:
    with jax.enable_x64(True):
      tokens, _ = jax.jit(lambda k, lg: sampling.draw_tokens(k, lg, cfg))(keys, logits)
  else:
    tokens, _ = jax.jit(lambda k, lg: sampling.draw_tokens(k, lg, cfg))(keys, logits)
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=4) / 4000
  assert tv(freq, probs) < 0.03


def test_guidance_extrapolates_from_the_unconditional_view():
  calls = []

  def denoiser(x, t):
    calls.append(x)
    return jnp.where(x[..., None] == MASK, 0.0, 1.0) * jnp.ones((1, 1, V))

  given = jnp.array([[1, MASK, MASK, MASK]])
  guided = sampling.guided(denoiser, given != MASK, MASK, 2.0)
  out = guided(given, jnp.ones((1,)))
  assert (np.asarray(calls[1]) == MASK).all()  # the unconditional pass hides the given token
  np.testing.assert_allclose(np.asarray(out[0, 0]), 3.0)  # 0 + 3 * (1 - 0)


def test_infill_and_suffix_templates():
  class Tok:
    mask_id = 9

    @staticmethod
    def encode(text):
      return [ord(c) % 9 for c in text]

  row = sampling.template_tokens(Tok, 12, infill="ab[MASK*3]c[MASK]d")
  assert row.tolist() == [7, 8, 9, 9, 9, 0, 9, 1, 9, 9, 9, 9]
  row = sampling.template_tokens(Tok, 6, prompt="a", suffix="cd")
  assert row.tolist() == [7, 9, 9, 9, 0, 1]
  with pytest.raises(UserError, match="has no \\[MASK\\]"):
    sampling.template_tokens(Tok, 12, infill="no masks here")
  with pytest.raises(UserError, match=r"prompt \+ suffix is 7 tokens, longer than seq_len=6"):
    sampling.template_tokens(Tok, 6, prompt="abcd", suffix="efg")
  with pytest.raises(UserError, match="prompt is 5 tokens, longer than seq_len=4"):
    sampling.prompt_tokens(Tok, "hello", 4, 2)


def test_compiled_once_per_shape():
  cfg = sampling.SamplerConfig("confidence", steps=4)
  fn = jax.jit(lambda k, x, ids: sampling.sample(markov_oracle, k, x, ids, cfg, schedule=Schedule(),
                                                 mask_id=MASK))
  x = jnp.full((8, L), MASK, jnp.int32)
  fn(jax.random.key(0), x, jnp.arange(8))
  fn(jax.random.key(1), x, jnp.arange(8, 16))
  assert fn._cache_size() == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="beam"), "sampler='beam'; allowed: ancestral, confidence, blocks, threshold, remdm"),
    (dict(threshold=0.0), "threshold=0.0; allowed: 0 < threshold <= 1"),
    (dict(threshold=1.5), "threshold=1.5"),
    (dict(top_p=0.0), "top_p=0.0; allowed: 0 < top_p <= 1"),
    (dict(steps=0), "steps=0; allowed: an integer >= 1"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(confidence="vibes"), "confidence='vibes'"),
])
def test_bad_sampler_settings(kwargs, message):
  with pytest.raises(UserError) as e:
    sampling.SamplerConfig(**kwargs)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_lengths():
  with pytest.raises(UserError, match="block_length=5 does not divide the sequence length 16"):
    sampling.SamplerConfig("blocks", steps=4, block_length=5).check_length(16, 16)
  with pytest.raises(UserError, match="steps=20 exceeds the 16 positions"):
    sampling.SamplerConfig("confidence", steps=20).check_length(16, 16)
  with pytest.raises(UserError, match="steps=6 is not a multiple of the 4 blocks"):
    sampling.SamplerConfig("blocks", steps=6, block_length=4).check_length(16, 16)


def test_logit_cache_recomputes_after_a_step_that_only_remasked():
  """ReMDM: a step that reveals nothing but remasks a token changed the input; the next step must see fresh
  logits. The cached run calls the denoiser at step 0 and after every step whose output differs from its
  input (read off the trajectory), and draws what the uncached run draws."""
  cfg = dict(name="remdm", steps=48, remask_schedule="cap", remask_eta=0.5, final_step="sample")
  cached = _run(sampling.SamplerConfig(**cfg, cache=True), n=2)
  fresh = _run(sampling.SamplerConfig(**cfg, cache=False), n=2)
  frames = np.concatenate([np.full((1, 2, L), MASK), cached.trajectory])  # frames[k]: the input of step k
  revealed = ((frames[:-1] == MASK) & (frames[1:] != MASK)).any(axis=(1, 2))
  remasked = ((frames[:-1] != MASK) & (frames[1:] == MASK)).any(axis=(1, 2))
  assert (remasked[:-1] & ~revealed[:-1]).any()  # the case under test occurs
  assert int(cached.num_calls) == 1 + int((revealed | remasked)[:-1].sum())
  np.testing.assert_array_equal(cached.trajectory, fresh.trajectory)
  np.testing.assert_array_equal(cached.tokens, fresh.tokens)
