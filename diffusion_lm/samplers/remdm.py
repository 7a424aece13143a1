"""The reverse process on a time grid: ancestral sampling (MD4 / MDLM) and ReMDM remasking.

ReMDM (Wang et al. 2025) generalises the masked-diffusion posterior with a remasking probability
sigma_t for tokens already generated:

  z_t generated:  keep it with prob 1 - sigma,  [MASK] it with prob sigma
  z_t = [MASK]:   reveal (a draw from the denoiser) with prob (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t)

valid for 0 <= sigma <= sigma_max = min(1, (1 - alpha_s) / alpha_t). Schedules of sigma:
  cap      sigma = min(eta, sigma_max)
  rescale  sigma = eta * sigma_max
  conf     per generated position, sigma_l = sigma_max * softmax_l(-confidence at decode time): the
           step's remasking mass sigma_max is spread over generated tokens, least confident first;
           masked positions use sigma = 0 (they are revealed at the plain ancestral rate)
  loop     alpha follows a three-phase path: ancestral from alpha = 0 at t = 1 to alpha_on at t_on,
           then alpha held at alpha_on with sigma = eta until t_off (tokens revised at the rate
           they are revealed), then ancestral to alpha = 1 at t = 0
cap / rescale / conf remask only while t_off < t <= t_on ("switch"; the defaults 1 and 0 mean always).
Ancestral sampling is sigma = 0: the same loop, draw for draw. When a step changes nothing and the
denoiser ignores t, the next step reuses its logits (the "no change" cache).

The end of the loop (final_step): argmax, as MDLM's and ReMDM's code with noise_removal (the setting of
their generative-perplexity tables): the grid runs from t = 1 to t = FINAL_T (their eps, 1e-5), not to 0,
so a few positions may still be masked after the last step; one more denoiser pass at t = FINAL_T fills
those with its argmax. sample: the grid ends at t = 0 and the last step reveals every position by a draw.
One difference from their loop is kept: no position is remasked at the last step (theirs remasks with
probability about FINAL_T there).
"""

import jax
import jax.numpy as jnp

from diffusion_lm.samplers.common import (Run, SampleOutput, confidence_scores, draw_tokens, draw_tokens_with,
                                          draw_uniforms, gather_width, time_grid)
from diffusion_lm.samplers.config import FINAL_T


def _alpha_path(run: Run, t):
  """alpha at grid time t: the trained schedule, or the loop's three-phase path."""
  cfg = run.cfg
  if cfg.name == "remdm" and cfg.remask_schedule == "loop":
    a_on, t_on, t_off = cfg.remask_alpha_on, cfg.remask_t_on, cfg.remask_t_off
    before = (1.0 - t) * a_on / (1.0 - t_on)
    after = 1.0 - t * (1.0 - a_on) / t_off
    return jnp.where(t > t_on, before, jnp.where(t <= t_off, after, a_on))
  return run.schedule.alpha(t)


def step_rates(run: Run, i):
  """The step-i quantities shared by every position: (t for the denoiser, alpha_t, alpha_s, sigma, sigma_max).

  sigma is the scalar remasking probability of cap / rescale / loop (0 for ancestral, and for conf,
  whose per-position values come from sigma_max).
  """
  cfg = run.cfg
  t, s = time_grid(cfg.time_grid, i, cfg.steps), time_grid(cfg.time_grid, i + 1, cfg.steps)
  if cfg.argmax_last:  # MDLM / ReMDM: linspace(1, eps, steps + 1)
    t, s = FINAL_T + (1.0 - FINAL_T) * t, FINAL_T + (1.0 - FINAL_T) * s
  alpha_t, alpha_s = _alpha_path(run, t), _alpha_path(run, s)
  sigma_max = jnp.minimum(1.0, (1.0 - alpha_s) / jnp.maximum(alpha_t, 1e-12))
  if cfg.name == "ancestral":
    sigma = jnp.zeros(())
  else:
    active = (t <= cfg.remask_t_on) & (t > cfg.remask_t_off)
    sigma = {"cap": jnp.minimum(cfg.remask_eta, sigma_max), "rescale": cfg.remask_eta * sigma_max,
             "conf": jnp.zeros(()), "loop": jnp.minimum(cfg.remask_eta, sigma_max)}[cfg.remask_schedule]
    sigma = jnp.where(active, sigma, 0.0)
    sigma_max = jnp.where(active, sigma_max, 0.0)
  last = i == cfg.steps - 1
  sigma, sigma_max = jnp.where(last, 0.0, sigma), jnp.where(last, 0.0, sigma_max)
  # The denoiser sees the trained schedule's time of the current noise level.
  t_model = run.schedule.inverse_alpha(alpha_t) if cfg.remask_schedule == "loop" and cfg.name == "remdm" else t
  return t_model, alpha_t, alpha_s, sigma, sigma_max


def sample(run: Run, tokens_BxL) -> SampleOutput:
  """Every step decides first which positions it reveals and remasks (neither needs the denoiser), then
  draws tokens at the revealed positions. With a split denoiser (run.split) it computes predictions only
  there, the step's draw and scores O(revealed positions), and its "no change" cache holds the trunk."""
  cfg = run.cfg
  conf_remask = cfg.name == "remdm" and cfg.remask_schedule == "conf"
  use_cache = cfg.cache and run.time_independent
  batch_size, length, mask_id = run.batch_size, run.length, run.mask_id
  split = run.split if run.first_logits is None and not (cfg.float64 and cfg.temperature) else None
  width = gather_width(length, cfg.steps) if split is not None else 0
  t0 = jnp.zeros((batch_size,), jnp.float32)
  if split is not None:  # the cache holds the trunk
    cache0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(split.trunk, tokens_BxL, t0))
  else:  # the cache holds the logits
    vocab = jax.eval_shape(run.denoiser, tokens_BxL, t0).shape[-1]
    cache0 = jnp.zeros((batch_size, length, vocab), jnp.float32)

  def body(i, carry):
    x, conf, cache, changed, traj, used, calls = carry
    t, alpha_t, alpha_s, sigma, sigma_max = step_rates(run, i)
    t_B = jnp.full((batch_size,), t, jnp.float32)
    recompute = changed if use_cache else jnp.array(True)
    keys = run.step_keys(i)
    masked = x == mask_id
    generated = ~masked & ~run.given_BxL
    if conf_remask:
      weights = jax.nn.softmax(jnp.where(generated, -conf, -jnp.inf), axis=-1)
      sigma_BxL = sigma_max * jnp.where(generated, weights, 0.0)
    else:
      sigma_BxL = jnp.broadcast_to(sigma, x.shape)
    reveal_prob = (alpha_s - (1.0 - sigma_BxL) * alpha_t) / jnp.maximum(1.0 - alpha_t, 1e-12)
    if not cfg.argmax_last:  # the grid ends at t = 0: everything left is revealed by a draw
      reveal_prob = jnp.where(i == cfg.steps - 1, 1.0, reveal_prob)
    u_reveal = jax.vmap(lambda k: jax.random.uniform(k, (length,)))(keys[:, 1])
    reveal = masked & (u_reveal < reveal_prob)
    if cfg.name == "ancestral":
      remask = jnp.zeros_like(masked)
    else:
      u_remask = jax.vmap(lambda k: jax.random.uniform(k, (length,)))(keys[:, 2])
      remask = generated & (u_remask < sigma_BxL)
    # A step that changed nothing left the input as it was: a time-independent denoiser's trunk and logits too.
    if split is None:
      cache = jax.lax.cond(recompute, lambda: run.denoise(x, t_B, i), lambda: cache)
      proposal, probs = draw_tokens(keys[:, 0], cache, cfg)
      scores = confidence_scores(keys[:, 3], probs, proposal, cfg.confidence, cfg.confidence_rounding) if conf_remask else None
    else:
      cache = jax.lax.cond(recompute, lambda: split.trunk(x, t_B), lambda: cache)
      proposal, scores = _draw_revealed(run, split, cache, x, t_B, keys, reveal, width, conf_remask)
    used = used + jnp.any(masked | remask, axis=-1).astype(jnp.int32)
    x = jnp.where(reveal, proposal, jnp.where(remask, mask_id, x))
    if conf_remask:
      conf = jnp.where(reveal, scores, conf)
    return (x, conf, cache, jnp.any(reveal | remask), run.record(traj, i, x), used,
            calls + recompute.astype(jnp.int32))

  conf0 = jnp.zeros((batch_size, length), jnp.float32)
  init = (tokens_BxL, conf0, cache0, jnp.array(True), run.trajectory(), jnp.zeros((batch_size,), jnp.int32),
          jnp.int32(0))
  x, _, _, _, traj, used, calls = jax.lax.fori_loop(0, cfg.steps, body, init)
  if cfg.argmax_last:
    x, filled = _noise_removal(run, x)
    traj, calls = run.record(traj, cfg.steps - 1, x), calls + filled
  return SampleOutput(x, traj, used, calls, run.full_lengths())


def _noise_removal(run: Run, x_BxL):
  """(tokens, denoiser calls made): the positions still masked after the loop take the argmax of one more
  denoiser pass at t = FINAL_T (MDLM's noise_removal); no pass when nothing is masked."""
  masked = x_BxL == run.mask_id
  t_B = jnp.full((run.batch_size,), FINAL_T, jnp.float32)

  def fill():
    best = jnp.argmax(run.denoise(x_BxL, t_B, run.cfg.steps), axis=-1).astype(jnp.int32)
    return jnp.where(masked, best, x_BxL), jnp.int32(1)

  return jax.lax.cond(jnp.any(masked), fill, lambda: (x_BxL, jnp.int32(0)))


def _draw_revealed(run: Run, split, trunk, x_BxL, t_B, keys, reveal_BxL, width: int, with_scores: bool):
  """(tokens int32[B, L], confidence scores float32[B, L] or None), valid at the revealed positions: the
  draw of draw_tokens there, from predictions computed at the first `width` revealed positions of each
  row when no row reveals more (else at every position)."""
  cfg = run.cfg
  u_BxL = draw_uniforms(keys[:, 0], run.length) if cfg.temperature else None
  kind = cfg.confidence

  def draw(positions_BxQ):
    logits = split.logits_at(trunk, x_BxL, t_B, positions_BxQ).astype(jnp.float32)
    at = (lambda a: a) if positions_BxQ is None else (lambda a: jnp.take_along_axis(a, positions_BxQ, axis=1))
    tokens, probs = draw_tokens_with(None if u_BxL is None else at(u_BxL), logits, cfg)
    scores = None
    if with_scores:
      scores = (at(confidence_scores(keys[:, 3], None, x_BxL, "random")) if kind == "random"
                else confidence_scores(keys[:, 3], probs, tokens, kind, cfg.confidence_rounding))
    if positions_BxQ is None:
      return tokens, scores
    rows = jnp.arange(x_BxL.shape[0])[:, None]
    scatter = lambda a, fill: jnp.full(x_BxL.shape, fill, a.dtype).at[rows, positions_BxQ].set(a)
    return scatter(tokens, 0), None if scores is None else scatter(scores, 0.0)

  if not width:
    return draw(None)
  # Revealed positions first (in order), then the others: `width` distinct positions per row.
  positions = jnp.argsort(~reveal_BxL, axis=-1, stable=True)[:, :width].astype(jnp.int32)
  fits = jnp.max(jnp.sum(reveal_BxL, axis=-1)) <= width
  return jax.lax.cond(fits, lambda: draw(positions), lambda: draw(None))
