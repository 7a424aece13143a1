"""Adaptive parallel decoding by confidence threshold (Fast-dLLM): each step commits every masked
position whose confidence reaches `threshold`, and at least the most confident one; the loop stops
when nothing is masked. `steps` is a hard budget: the last allowed step commits everything left,
so a row never takes more than `steps` denoiser calls.
"""

import jax
import jax.numpy as jnp

from diffusion_lm.samplers.common import Run, SampleOutput, confidence_scores, draw_tokens, rank_desc


def threshold_score(cfg):
  """The threshold on the configured confidence scale (entropy is scored as -H, in nats)."""
  if cfg.confidence == "entropy":
    return jnp.log(cfg.threshold)  # -H >= log(threshold): as sure as a distribution with that max prob
  return cfg.threshold


def sample(run: Run, tokens_BxL) -> SampleOutput:
  cfg = run.cfg

  def cond(carry):
    x, _, _, i = carry
    return (i < cfg.steps) & jnp.any(x == run.mask_id)

  def body(carry):
    x, traj, used, i = carry
    logits = run.denoise(x, run.masked_time(x), i)
    keys = run.step_keys(i)
    proposal, probs = draw_tokens(keys[:, 0], logits, cfg)
    masked = x == run.mask_id
    score = jnp.where(masked, confidence_scores(keys[:, 3], probs, proposal, cfg.confidence, cfg.confidence_rounding), -jnp.inf)
    confident = score >= threshold_score(cfg)
    best = rank_desc(score) == 0
    commit = masked & (confident | best | (i == cfg.steps - 1))
    x = jnp.where(commit, proposal, x)
    return x, run.record(traj, i, x), used + jnp.any(masked, axis=-1).astype(jnp.int32), i + 1

  x, traj, used, calls = jax.lax.while_loop(
      cond, body, (tokens_BxL, run.trajectory(), jnp.zeros((run.batch_size,), jnp.int32), jnp.int32(0)))
  if run.record_steps:
    # Frames after the loop ended show the final sequence.
    valid = (jnp.arange(run.record_steps) < calls)[:, None, None]
    traj = jnp.where(valid, traj, x[None])
  return SampleOutput(x, traj, used, calls, run.full_lengths())
