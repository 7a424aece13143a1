"""Confidence-ordered unmasking (MaskGIT, LLaDA low-confidence remasking) and its semi-autoregressive
form, blocks (LLaDA): at each step draw a token for every masked position and commit the k most
confident, k from a commit schedule over the still-masked positions (of the current block).
"""

import math

import jax
import jax.numpy as jnp

from diffusion_lm.samplers.common import Run, SampleOutput, commit_top, confidence_scores, draw_tokens


def commit_fraction(kind: str, i, steps: int):
  """Share of the still-masked positions to commit at step i of `steps` (1 at the last step)."""
  f = (lambda s: s) if kind == "linear" else (lambda s: 1.0 - jnp.cos(0.5 * math.pi * s))
  now, nxt = f(i / steps), f((i + 1) / steps)
  return jnp.where(i >= steps - 1, 1.0, (nxt - now) / jnp.maximum(1.0 - now, 1e-12))


def sample(run: Run, tokens_BxL) -> SampleOutput:
  cfg, length = run.cfg, run.length
  num_blocks = length // cfg.block_length if cfg.name == "blocks" else 1
  steps_per_block = cfg.steps // num_blocks
  block_of_position = jnp.arange(length) // (length // num_blocks)

  def body(i, carry):
    x, traj, used = carry
    logits = run.denoise(x, run.masked_time(x), i)
    keys = run.step_keys(i)
    proposal, probs = draw_tokens(keys[:, 0], logits, cfg)
    candidates = (x == run.mask_id) & (block_of_position == i // steps_per_block)[None, :]
    remaining = jnp.sum(candidates, axis=-1)
    frac = commit_fraction(cfg.commit_schedule, i % steps_per_block, steps_per_block)
    count = jnp.clip(jnp.floor(remaining * frac + 0.5).astype(jnp.int32), jnp.minimum(remaining, 1), remaining)
    commit = commit_top(confidence_scores(keys[:, 3], probs, proposal, cfg.confidence,
                                                cfg.confidence_rounding), candidates, count)
    x = jnp.where(commit, proposal, x)
    return x, run.record(traj, i, x), used + (remaining > 0).astype(jnp.int32)

  x, traj, used = jax.lax.fori_loop(0, cfg.steps, body,
                                    (tokens_BxL, run.trajectory(), jnp.zeros((run.batch_size,), jnp.int32)))
  return SampleOutput(x, traj, used, jnp.int32(cfg.steps), run.full_lengths())
