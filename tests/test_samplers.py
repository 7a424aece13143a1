"""Each sampler against the definition in its paper, with oracles whose answers are known.

References are computed here, independently of the code under test: schedules in closed form,
confidence scores in numpy, expected remasking counts from ReMDM's formulas.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import sampling
from diffusion_lm.schedules import Schedule
from test_sampling import JOINT, MASK, V, _empirical, markov_oracle, tv

# Closed forms of alpha(t), written from the papers' definitions (not from diffusion_lm.schedules).
ALPHA = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 1.0 - np.cos(0.5 * np.pi * (1.0 - t)),
    "polynomial": lambda t: 1.0 - t**2.0,
    "geometric": lambda t: np.exp(-(1e-4**(1.0 - t)) * 20.0**t),
}
SCHEDULES = {"linear": Schedule("linear"), "cosine": Schedule("cosine"),
             "polynomial": Schedule("polynomial", power=2.0), "geometric": Schedule("geometric")}


def grid(kind, steps):
  """t_0 = 1 > t_1 > ... > t_steps = 0."""
  s = np.arange(steps + 1) / steps
  return 1.0 - s if kind == "uniform" else np.cos(0.5 * np.pi * s)


def fixed_logits_oracle(logits_LxK):
  """A denoiser whose prediction at each position ignores the input: confidences known in advance."""
  logits_LxK = jnp.asarray(logits_LxK, jnp.float32)

  def oracle(tokens_BxL, t_B):
    del t_B
    return jnp.broadcast_to(logits_LxK, tokens_BxL.shape + logits_LxK.shape[-1:])

  return oracle


def run(cfg, oracle, n, length, seed=0, schedule=Schedule("linear"), tokens=None, trajectory=True):
  tokens = jnp.full((n, length), MASK if tokens is None else 0, jnp.int32) if tokens is None else tokens
  fn = jax.jit(lambda k, x, ids: sampling.sample(oracle, k, x, ids, cfg, schedule=schedule, mask_id=MASK,
                                                 return_trajectory=trajectory, time_independent=True))
  return jax.tree.map(np.asarray, fn(jax.random.key(seed), tokens, jnp.arange(n)))


def frames(out, n, length):
  """[steps + 1, B, L]: the all-[MASK] start, then the sequence after each step."""
  return np.concatenate([np.full((1, n, length), MASK), out.trajectory])


# ----------------------------------------------------------------------------- ReMDM


def test_remdm_with_sigma_zero_is_ancestral_draw_for_draw():
  ancestral = run(sampling.SamplerConfig("ancestral", steps=16), markov_oracle, 64, 4)
  for schedule in ("cap", "rescale"):
    remdm = run(sampling.SamplerConfig("remdm", steps=16, remask_schedule=schedule, remask_eta=0.0),
                markov_oracle, 64, 4)
    np.testing.assert_array_equal(remdm.trajectory, ancestral.trajectory)
    np.testing.assert_array_equal(remdm.tokens, ancestral.tokens)


# Positions 0-7 are near-certain, 8-15 flat: confidence-weighted remasking would treat them apart.
MIXED = np.concatenate([np.tile([8.0, 0.0, 0.0], (8, 1)), np.zeros((8, 3))])


def _remask_and_reveal_counts(out, n, length):
  f = frames(out, n, length)
  before, after = f[:-1], f[1:]
  generated = before != MASK
  return generated, generated & (after == MASK), (before == MASK), (before == MASK) & (after != MASK)


@pytest.mark.parametrize("schedule, eta", [("cap", 0.1), ("rescale", 0.5)])
def test_remdm_remasks_every_generated_token_with_the_steps_sigma(schedule, eta):
  n, length, steps = 3000, 16, 10
  out = run(sampling.SamplerConfig("remdm", steps=steps, remask_schedule=schedule, remask_eta=eta),
            fixed_logits_oracle(MIXED), n, length)
  generated, remasked, masked, revealed = _remask_and_reveal_counts(out, n, length)
  t = grid("uniform", steps)
  for i in range(1, steps - 1):
    a_t, a_s = ALPHA["linear"](t[i]), ALPHA["linear"](t[i + 1])
    sigma_max = min(1.0, (1 - a_s) / a_t)
    sigma = min(eta, sigma_max) if schedule == "cap" else eta * sigma_max
    for half in (slice(0, 8), slice(8, 16)):  # confident and unsure positions alike
      g = generated[i][:, half].sum()
      rate = remasked[i][:, half].sum() / g
      assert abs(rate - sigma) < 5 * math.sqrt(sigma * (1 - sigma) / g) + 1e-3, (i, half, rate, sigma)
    # Masked positions are revealed at the ReMDM posterior's rate.
    reveal = (a_s - (1 - sigma) * a_t) / (1 - a_t)
    m = masked[i].sum()
    assert abs(revealed[i].sum() / m - reveal) < 5 * math.sqrt(reveal * (1 - reveal) / m) + 1e-3, (i, reveal)
  assert not (out.tokens == MASK).any()


def test_remdm_conf_spreads_sigma_max_over_the_least_confident():
  n, length, steps = 3000, 16, 10
  out = run(sampling.SamplerConfig("remdm", steps=steps, remask_schedule="conf"), fixed_logits_oracle(MIXED),
            n, length)
  generated, remasked, masked, revealed = _remask_and_reveal_counts(out, n, length)
  t = grid("uniform", steps)
  for i in range(1, steps - 1):
    a_t, a_s = ALPHA["linear"](t[i]), ALPHA["linear"](t[i + 1])
    sigma_max = min(1.0, (1 - a_s) / a_t)
    rows = generated[i].any(-1)
    count = remasked[i][rows].sum(-1)  # per row: a sum of Bernoullis whose probabilities add to sigma_max
    assert abs(count.mean() - sigma_max) < 5 * math.sqrt(sigma_max / rows.sum()) + 1e-3, (i, count.mean())
    reveal = (a_s - a_t) / (1 - a_t)  # masked positions have sigma = 0
    m = masked[i].sum()
    assert abs(revealed[i].sum() / m - reveal) < 5 * math.sqrt(reveal * (1 - reveal) / m) + 1e-3
  # Within a row, position l gets sigma_max * exp(-p_l) / sum over generated of exp(-p), p_l the
  # probability its token had when drawn: compare each half's remask count with that expectation.
  f = frames(out, n, length)
  probs = np.exp(MIXED) / np.exp(MIXED).sum(-1, keepdims=True)
  expected, observed = np.zeros(2), np.zeros(2)
  for i in range(1, steps - 1):
    a_t, a_s = ALPHA["linear"](t[i]), ALPHA["linear"](t[i + 1])
    sigma_max = min(1.0, (1 - a_s) / a_t)
    conf = probs[np.arange(length), np.where(generated[i], f[i], 0)]
    w = np.where(generated[i], np.exp(-conf), 0.0)
    share = sigma_max * w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    expected += [share[:, :8].sum(), share[:, 8:].sum()]
    observed += [remasked[i][:, :8].sum(), remasked[i][:, 8:].sum()]
  np.testing.assert_array_less(np.abs(observed - expected), 5 * np.sqrt(expected))
  assert observed[1] > observed[0]  # unsure positions are revised more often


def test_remdm_loop_holds_alpha_on_and_revises_at_eta():
  n, length, steps = 2000, 16, 20
  t_on, t_off, a_on, eta = 0.57, 0.07, 0.8, 0.05  # window edges off the grid of t = k / 20
  cfg = sampling.SamplerConfig("remdm", steps=steps, remask_schedule="loop", remask_eta=eta, remask_t_on=t_on,
                               remask_t_off=t_off, remask_alpha_on=a_on)
  out = run(cfg, fixed_logits_oracle(MIXED), n, length)
  f = frames(out, n, length)
  t = grid("uniform", steps)
  generated, remasked, masked, revealed = _remask_and_reveal_counts(out, n, length)

  def alpha(u):  # the loop's path: 0 -> alpha_on linearly over [1, t_on], flat, then -> 1 over [t_off, 0]
    return (1 - u) * a_on / (1 - t_on) if u > t_on else (a_on if u > t_off else 1 - u * (1 - a_on) / t_off)

  looped = 0
  for i in range(steps - 1):
    if t_off < t[i] <= t_on:  # tokens revised at rate eta, revealed at eta alpha / (1 - alpha)
      looped += 1
      g = generated[i].sum()
      assert abs(remasked[i].sum() / g - eta) < 5 * math.sqrt(eta * (1 - eta) / g), i
      m = masked[i].sum()
      reveal = (alpha(t[i + 1]) - (1 - eta) * alpha(t[i])) / (1 - alpha(t[i]))
      assert abs(revealed[i].sum() / m - reveal) < 5 * math.sqrt(reveal * (1 - reveal) / m), i
    else:
      assert remasked[i].sum() == 0
    assert abs((f[i + 1] == MASK).mean() - (1 - alpha(t[i + 1]))) < 0.015, i
  assert looped == 10 and not (out.tokens == MASK).any()


@pytest.mark.parametrize("cfg", [
    sampling.SamplerConfig("remdm", steps=256, remask_schedule="conf"),
    sampling.SamplerConfig("remdm", steps=256, remask_schedule="rescale", remask_eta=0.3),
    sampling.SamplerConfig("remdm", steps=256, remask_schedule="loop", remask_eta=0.02, remask_t_on=0.55,
                           remask_t_off=0.05),
    sampling.SamplerConfig("remdm", steps=256, remask_schedule="cap", remask_eta=0.05, remask_t_on=0.5),
], ids=lambda c: c.remask_schedule)
def test_every_remdm_schedule_samples_the_joint_with_an_exact_denoiser(cfg):
  # ReMDM's posterior keeps the forward marginals, so an exact denoiser samples the data distribution.
  out = run(cfg, markov_oracle, 8000, 4, trajectory=False)
  assert tv(_empirical(out.tokens), JOINT) < 0.06


# ----------------------------------------------------------------------------- time given to the denoiser


def time_oracle(tokens_BxL, t_B):
  """Predicts token round(100 t) with certainty: the committed tokens record the t each step passed."""
  k = jnp.arange(101, dtype=jnp.float32) / 100.0
  logits = -200.0 * jnp.abs(k[None, :] - t_B[:, None])  # argmax the nearest; unsure enough for threshold
  return jnp.broadcast_to(logits[:, None, :], tokens_BxL.shape + (101,))


@pytest.mark.parametrize("cfg", [sampling.SamplerConfig("confidence", steps=4, temperature=0.0),
                                 sampling.SamplerConfig("blocks", steps=4, block_length=4, temperature=0.0),
                                 sampling.SamplerConfig("threshold", steps=8, threshold=0.95, temperature=0.0)],
                         ids=lambda c: c.name)
def test_commit_samplers_give_the_denoiser_the_time_of_the_masked_fraction(cfg):
  length, mask = 8, 101
  fn = jax.jit(lambda k, x, ids: sampling.sample(time_oracle, k, x, ids, cfg, schedule=Schedule("cosine"),
                                                 mask_id=mask, return_trajectory=True, time_independent=False))
  start = np.full((2, length), mask, np.int32)
  start[1, :3] = 7  # a row with a prompt starts less masked
  out = jax.tree.map(np.asarray, fn(jax.random.key(0), jnp.asarray(start), jnp.arange(2)))
  f = np.concatenate([start[None], out.trajectory])
  checked = 0
  for i in range(int(out.num_calls)):
    for b in range(2):
      t = 1.0 - 2.0 / np.pi * np.arccos((f[i, b] == mask).mean())  # cosine: 1 - alpha(t) = cos(pi/2 (1 - t))
      new = (f[i, b] == mask) & (f[i + 1, b] != mask)
      assert (f[i + 1, b][new] == round(100 * t)).all(), (i, b, f[i + 1, b], t)
      checked += new.any()
  assert checked >= int(out.num_calls) + 2


def test_ancestral_and_loop_give_the_denoiser_their_grid_time():
  mask, steps = 101, 10
  for cfg in (sampling.SamplerConfig("ancestral", steps=steps, temperature=0.0),
              sampling.SamplerConfig("remdm", steps=steps, temperature=0.0, remask_schedule="loop", remask_eta=0.05,
                                     remask_t_on=0.55, remask_t_off=0.05, remask_alpha_on=0.8)):
    fn = jax.jit(lambda k, x, ids, c=cfg: sampling.sample(time_oracle, k, x, ids, c, schedule=Schedule("linear"),
                                                          mask_id=mask, return_trajectory=True,
                                                          time_independent=False))
    out = jax.tree.map(np.asarray, fn(jax.random.key(0), jnp.full((64, 16), mask, jnp.int32), jnp.arange(64)))
    f = np.concatenate([np.full((1, 64, 16), mask), out.trajectory])
    t = grid("uniform", steps)
    for i in range(steps):
      if cfg.name == "ancestral":
        expected = t[i]
      else:  # the loop's alpha path, mapped back through the linear schedule: t = 1 - alpha
        alpha = (1 - t[i]) * 0.8 / 0.45 if t[i] > 0.55 else (0.8 if t[i] > 0.05 else 1 - t[i] * 0.2 / 0.05)
        expected = 1 - alpha
      new = (f[i] == mask) & (f[i + 1] != mask)
      assert (f[i + 1][new] == round(100 * expected)).all(), (cfg.remask_schedule, i, expected)


# ----------------------------------------------------------------------------- threshold budget


def test_threshold_budget_is_a_hard_upper_bound():
  # Nothing reaches the threshold: one commit per step, then everything left at the last allowed step.
  logits = np.log(np.tile([0.4, 0.35, 0.25], (8, 1)))
  out = run(sampling.SamplerConfig("threshold", steps=3, threshold=0.99, temperature=0.0),
            fixed_logits_oracle(logits), 4, 8)
  assert int(out.num_calls) == 3 and (out.steps_used == 3).all()
  assert not (out.tokens == MASK).any()
  np.testing.assert_array_equal((out.trajectory != MASK).sum(-1), [[1] * 4, [2] * 4, [8] * 4])


# ----------------------------------------------------------------------------- commit order


def _scores(probs_LxK, kind):
  top2 = np.sort(probs_LxK, axis=-1)[:, ::-1][:, :2]
  return {"max_prob": top2[:, 0], "margin": top2[:, 0] - top2[:, 1],
          "entropy": np.sum(probs_LxK * np.log(probs_LxK), axis=-1)}[kind]


def _position_logits(length=16, vocab=V, seed=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(length, vocab)) * rng.uniform(0.3, 3.0, size=(length, 1))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  orders = {kind: tuple(np.argsort(-_scores(probs, kind), kind="stable")) for kind in ("max_prob", "margin",
                                                                                          "entropy")}
  for i in range(1, 4):  # the three scores pick different sets at every step of 4 commits
    assert len({frozenset(order[:4 * i]) for order in orders.values()}) >= 2
  for kind in orders:  # no near-ties, so the order does not hinge on rounding
    assert np.min(np.abs(np.diff(np.sort(_scores(probs, kind))))) > 1e-3
  return logits, probs, orders


@pytest.mark.parametrize("kind", ["max_prob", "margin", "entropy"])
def test_confidence_commits_the_most_confident_first(kind):
  logits, _, orders = _position_logits()
  out = run(sampling.SamplerConfig("confidence", steps=4, confidence=kind, temperature=0.0),
            fixed_logits_oracle(logits), 2, 16)
  order = orders[kind]
  for i in range(4):  # linear schedule: 4 of the 16 per step, the most confident first
    committed = set(np.flatnonzero(out.trajectory[i, 0] != MASK))
    assert committed == set(order[:4 * (i + 1)]), (kind, i)


@pytest.mark.parametrize("kind", ["max_prob", "entropy"])
def test_blocks_commit_the_most_confident_of_the_current_block(kind):
  logits, probs, _ = _position_logits()
  out = run(sampling.SamplerConfig("blocks", steps=4, block_length=8, confidence=kind, temperature=0.0),
            fixed_logits_oracle(logits), 2, 16)
  scores = _scores(probs, kind)
  for i in range(4):
    block = slice(0, 8) if i < 2 else slice(8, 16)
    best = set(block.start + np.argsort(-scores[block], kind="stable")[:4 * (i % 2 + 1)])
    committed = set(np.flatnonzero(out.trajectory[i, 0, block] != MASK) + block.start)
    assert committed == best, (kind, i)


def test_threshold_commits_exactly_the_confident_positions():
  logits, probs, _ = _position_logits()
  out = run(sampling.SamplerConfig("threshold", steps=16, threshold=0.6, temperature=0.0),
            fixed_logits_oracle(logits), 2, 16)
  p_max = probs.max(-1)
  expected = set(np.flatnonzero(p_max >= 0.6)) or {int(np.argmax(p_max))}
  assert set(np.flatnonzero(out.trajectory[0, 0] != MASK)) == expected


# ----------------------------------------------------------------------------- ancestral marginals


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("time_grid", ["uniform", "cosine"])
def test_ancestral_masked_fraction_follows_the_schedule(name, time_grid):
  n, length, steps = 1000, 32, 8
  out = run(sampling.SamplerConfig("ancestral", steps=steps, time_grid=time_grid),
            fixed_logits_oracle(np.zeros((length, 3))), n, length, schedule=SCHEDULES[name])
  t = grid(time_grid, steps)
  masked = (out.trajectory == MASK).mean(axis=(1, 2))
  for i in range(steps - 1):
    p = 1.0 - ALPHA[name](t[i + 1])
    assert abs(masked[i] - p) < 5 * math.sqrt(p * (1 - p) / (n * length)) + 1e-3, (i, masked[i], p)
  assert masked[-1] == 0


# ----------------------------------------------------------------------------- float64 draws


@pytest.mark.parametrize("float64", [False, True])
def test_draws_reach_the_far_tail_of_a_peaked_distribution(float64):
  # One token at logit 0 and 32767 at -17: the tail holds 0.14% of the mass, every tail token is
  # 17 nats below the top one, beyond the reach of float32 Gumbel noise (about 16 nats above its
  # mode), which draws the tail about 25x too rarely. Expected tail draws in 20,000: 27.
  vocab, gap, n = 32768, 17.0, 2000
  logits = jnp.full((1, n, vocab), -gap).at[..., 0].set(0.0)
  tail = (vocab - 1) * math.exp(-gap) / (1 + (vocab - 1) * math.exp(-gap))
  cfg = sampling.SamplerConfig(float64=float64)
  draw = jax.jit(lambda k, lg: sampling.draw_tokens(k, lg, cfg)[0])
  hits = 0
  for chunk in range(10):
    with jax.enable_x64(float64):
      keys = jax.random.fold_in(jax.random.key(0), chunk)[None]
      hits += int((np.asarray(draw(keys, logits)) != 0).sum())
  expected = tail * n * 10
  assert abs(hits - expected) < 4 * math.sqrt(expected), (hits, expected)


# ----------------------------------------------------------------------------- the last step and the nucleus


@pytest.mark.parametrize("final_step", ["auto", "argmax", "sample"])
def test_final_step_argmax_fills_what_the_grid_end_leaves_masked(final_step):
  """MDLM / ReMDM noise removal: the grid ends at t = 1e-5 and what is still masked takes the argmax of one
  more pass. Under alpha(t) = 1 - t^0.1 one step reveals only alpha(1e-5) = 1 - 10^-0.5 of the positions by
  a draw, so the argmax token's share is alpha(1e-5) p_0 + 10^-0.5 (closed form); final_step='sample' draws
  them all (share p_0)."""
  n, length = 1000, 32
  probs = np.array([0.6, 0.3, 0.1])
  cfg = sampling.SamplerConfig("ancestral", steps=1, final_step=final_step)
  out = run(cfg, fixed_logits_oracle(np.broadcast_to(np.log(probs), (length, 3))), n, length,
            schedule=Schedule("polynomial", power=0.1))
  revealed = 1.0 - (1e-5) ** 0.1
  argmax_share = revealed * probs[0] + (1.0 - revealed) if final_step != "sample" else probs[0]
  assert not (out.tokens == MASK).any() and not (out.trajectory[-1] == MASK).any()
  assert abs((out.tokens == 0).mean() - argmax_share) < 0.01, ((out.tokens == 0).mean(), argmax_share)
  assert abs((out.tokens == 2).mean() - (revealed if final_step != "sample" else 1.0) * probs[2]) < 0.01
  assert int(out.num_calls) == (2 if final_step != "sample" else 1)


def test_nucleus_rules_within_and_reach():
  """within (ReMDM / BD3-LM): keep tokens whose cumulative mass, their own included, is <= p; reach
  (transformers): keep the token that crosses p too. Probabilities 0.5, 0.3, 0.15, 0.05 by rank."""
  logits = jnp.log(jnp.array([[[0.05, 0.5, 0.15, 0.3]]]))
  kept = lambda p, rule: np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=p, rule=rule)))[0, 0].tolist()
  assert kept(0.7, "within") == [False, True, False, False]
  assert kept(0.7, "reach") == [False, True, False, True]
  assert kept(0.81, "within") == [False, True, False, True]
  assert kept(0.81, "reach") == [False, True, True, True]
  assert kept(0.2, "within") == kept(0.2, "reach") == [False, True, False, False]  # the top token always
  assert sampling.SamplerConfig("ancestral").nucleus_rule == sampling.SamplerConfig("remdm").nucleus_rule == "within"
  assert sampling.SamplerConfig("confidence").nucleus_rule == "reach"
  # Through the sampler (probabilities 0.2, 0.5, 0.3): at top_p 0.7 ancestral draws only the top token by
  # default, also token 2 with reach.
  oracle = fixed_logits_oracle(np.broadcast_to(np.log([0.2, 0.5, 0.3]), (16, V)))
  drawn = lambda **kw: set(np.unique(run(sampling.SamplerConfig("ancestral", steps=4, top_p=0.7, **kw), oracle,
                                         64, 16).tokens).tolist())
  assert drawn() == {1} and drawn(top_p_rule="reach") == {1, 2}
