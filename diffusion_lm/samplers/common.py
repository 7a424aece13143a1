"""Pieces every strategy shares: token draws, confidence scores, rank-and-commit, time grids, keys.

A denoiser is any function `(tokens_BxL int32, t_B float32) -> logits_BxLxK` over the K data tokens.
Randomness is per example: example b draws from fold_in(key, example_ids[b]), then fold_in(., step),
so a sequence does not depend on the batch it is drawn in, nor on the device count.
"""

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_lm.samplers.config import SamplerConfig
from diffusion_lm.schedules import Schedule


class SampleOutput(NamedTuple):
  tokens: jax.Array  # int32[B, L], no [MASK] left
  trajectory: jax.Array  # int32[S, B, L]: the sequence after each step (S = 0 when not recorded)
  steps_used: jax.Array  # int32[B]: denoiser steps that changed or could change the row
  num_calls: jax.Array  # int32[]: denoiser forward passes actually run (the cache skips some)
  lengths: jax.Array  # int32[B]: tokens up to and including the end-of-document token (else all L)


# ----------------------------------------------------------------------------- token draws


def filter_logits(logits_BxLxK, top_k: int = 0, top_p: float = 1.0, rule: str = "reach"):
  """Top-k then nucleus filtering: removed tokens get -inf. float32 in, float32 out.

  Nucleus rule (the most likely token is always kept): reach keeps the smallest set whose mass reaches
  top_p (a token is kept while the mass before it is < top_p; Holtzman et al., transformers); within keeps
  the tokens whose cumulative mass, their own included, is <= top_p (ReMDM's and BD3-LM's code).
  """
  logits = logits_BxLxK.astype(jnp.float32)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    keep = cumulative <= top_p if rule == "within" else cumulative - probs < top_p
    keep = keep.at[..., 0].set(True)
    kept = jnp.where(keep, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def draw_tokens(key_B, logits_BxLxK, cfg: SamplerConfig):
  """Samples a token per position with per-example keys: (tokens int32[B, L], probs float32[B, L, K]).

  The returned probabilities are those of the filtered, tempered distribution (for confidences).
  """
  if cfg.temperature == 0 or not cfg.float64:
    # Inverse-CDF draw: one uniform per position instead of one Gumbel per (position, token), which
    # on a 1024-token vocabulary is most of a sampling step's cost beyond the forward pass.
    u_BxL = None if cfg.temperature == 0 else draw_uniforms(key_B, logits_BxLxK.shape[1])
    return draw_tokens_with(u_BxL, logits_BxLxK, cfg)
  logits = filter_logits(logits_BxLxK / cfg.temperature, cfg.top_k, cfg.top_p, cfg.nucleus_rule)
  # Gumbel-max in float64: float32 Gumbel noise is bounded (about 16 nats above its mode), so
  # tokens far below the top one are never drawn; that lowers sample entropy and distorts
  # generative perplexity.
  def one(k, lg):
    gumbel = jax.random.gumbel(k, lg.shape, dtype=jnp.float64)
    return jnp.argmax(jax.nn.log_softmax(lg.astype(jnp.float64), axis=-1) + gumbel, axis=-1)
  return jax.vmap(one)(key_B, logits).astype(jnp.int32), jax.nn.softmax(logits, axis=-1)


def draw_uniforms(key_B, length: int):
  """float32[B, L]: the uniforms of draw_tokens' inverse-CDF draw (position j's is the same whichever
  positions are drawn, so a draw at a few gathered positions equals the full draw there)."""
  return jax.vmap(lambda k: jax.random.uniform(k, (length, 1)))(key_B)[..., 0]


def draw_tokens_with(u_BxQ, logits_BxQxK, cfg: SamplerConfig):
  """draw_tokens with its uniforms given (None at temperature 0; float32 draws only): (tokens int32[B, Q],
  probs float32[B, Q, K])."""
  if cfg.temperature == 0:
    logits = filter_logits(logits_BxQxK, cfg.top_k, cfg.top_p, cfg.nucleus_rule)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.softmax(logits, axis=-1)
  probs = jax.nn.softmax(filter_logits(logits_BxQxK / cfg.temperature, cfg.top_k, cfg.top_p, cfg.nucleus_rule),
                         axis=-1)
  return inverse_cdf(u_BxQ, probs), probs


def inverse_cdf(u_BxL, probs_BxLxK):
  """int32[B, L]: the first token whose cumulative probability exceeds u * (total probability).

  Two levels, O(K) per position: block sums over blocks of about sqrt(K) tokens find the block, then
  the running sum inside that block finds the token (a full-vocabulary running sum is a window
  reduction on XLA:CPU, most of a draw's cost). A zero-probability token is never chosen.
  """
  batch, length, vocab = probs_BxLxK.shape
  blocks = math.isqrt(vocab - 1) + 1
  size = -(-vocab // blocks)
  p = jnp.pad(probs_BxLxK, ((0, 0), (0, 0), (0, blocks * size - vocab))).reshape(batch, length, blocks, size)
  block_cdf = jnp.cumsum(jnp.sum(p, axis=-1), axis=-1)
  target = u_BxL * block_cdf[..., -1]
  block = jnp.minimum(jnp.sum(block_cdf <= target[..., None], axis=-1), blocks - 1)
  before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[..., None], -1)[..., 0], 0.0)
  inside = jnp.take_along_axis(p, block[..., None, None], axis=2)[..., 0, :]
  offset = jnp.sum(before[..., None] + jnp.cumsum(inside, axis=-1) <= target[..., None], axis=-1)
  # Float rounding can leave the block's running sum at or below the target: take its last token of
  # positive probability, never a zero-probability one past it.
  last_positive = size - 1 - jnp.argmax(inside[..., ::-1] > 0, axis=-1)
  offset = jnp.where(offset >= size, last_positive, offset)
  return jnp.minimum(block * size + offset, vocab - 1).astype(jnp.int32)


def confidence_scores(key_B, probs_BxLxK, tokens_BxL, kind: str, rounding: int = 0):
  """Higher = more confident; float32[B, L].

  max_prob: probability of the drawn token; margin: top-1 minus top-2 probability; entropy: -H in
  nats; random: a uniform draw. Ranked at full precision by default (rounding = 0), as the published
  decoders rank; rounding = n rounds model-based scores to 2^-n, so that near-ties are broken by
  position rather than by float noise that may differ with batch size or device count (README:
  "Batch invariance and confidence rounding").
  """
  if kind == "random":
    return jax.vmap(lambda k: jax.random.uniform(k, tokens_BxL.shape[1:]))(key_B)
  if kind == "max_prob":
    score = jnp.take_along_axis(probs_BxLxK, tokens_BxL[..., None], axis=-1)[..., 0]
  elif kind == "margin":
    top2 = jax.lax.top_k(probs_BxLxK, 2)[0]
    score = top2[..., 0] - top2[..., 1]
  else:  # entropy
    score = jnp.sum(probs_BxLxK * jnp.log(jnp.maximum(probs_BxLxK, 1e-30)), axis=-1)
  if not rounding:
    return score
  scale = float(2 ** rounding)
  return jnp.round(score * scale) / scale


# ----------------------------------------------------------------------------- rank and commit


def rank_desc(scores_BxL):
  """Rank of each position by descending score within its row (0 = highest); ties by position."""
  order = jnp.argsort(-scores_BxL, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def commit_top(scores_BxL, candidates_BxL, count_B):
  """bool[B, L]: the `count_B` highest-scoring candidates of each row."""
  scores = jnp.where(candidates_BxL, scores_BxL, -jnp.inf)
  return candidates_BxL & (rank_desc(scores) < count_B[:, None])


# ----------------------------------------------------------------------------- time


def time_grid(kind: str, i, steps: int):
  """t at step i of the reverse process (t_0 = 1, t_steps = 0)."""
  s = i / steps
  return 1.0 - s if kind == "uniform" else jnp.cos(0.5 * math.pi * s)


class SplitDenoiser(NamedTuple):
  """A denoiser in two parts, for samplers that need predictions at a few positions per step.

  trunk(tokens_BxL, t_B) -> state: everything that depends on the tokens alone (the network up to its last
  block); logits_at(state, tokens_BxL, t_B, positions_BxQ or None) -> logits_BxQxK (None: every
  position, [B, L, K]). logits_at(trunk(x, t), x, t, None) is the plain denoiser's output.
  """

  trunk: Callable
  logits_at: Callable


def gather_width(length: int, steps: int) -> int:
  """Positions a reveal-first sampler computes predictions for per step (0: all of them).

  About twice the mean reveals per step, plus slack, rounded up to 8; a step that reveals more in some
  row computes every position instead (exact either way). Not worth it above half the sequence.
  """
  width = -(-(2 * -(-length // steps) + 6) // 8) * 8
  return width if 2 * width <= length else 0


@dataclasses.dataclass(frozen=True)
class Run:
  """One sampling call's fixed pieces, shared by the strategy loops."""

  denoiser: Callable
  keys_B: jax.Array
  given_BxL: jax.Array
  cfg: SamplerConfig
  schedule: Schedule  # the bound schedule (linear for the mlm case)
  mask_id: int
  record_steps: int  # trajectory frames to keep (0 = none)
  time_independent: bool
  first_logits: jax.Array | None = None  # the logits of step 0 when already computed (block decoding)
  step_offset: int = 0  # step i draws with the keys of step i + step_offset (a loop run block by block)
  split: SplitDenoiser | None = None  # the same denoiser in two parts (see SplitDenoiser), when it has them

  @property
  def batch_size(self) -> int:
    return self.given_BxL.shape[0]

  @property
  def length(self) -> int:
    return self.given_BxL.shape[1]

  def denoise(self, x_BxL, t_B, i):
    """float32 logits of step i: the denoiser's, or `first_logits` at step 0 when given (no forward pass)."""
    if self.first_logits is None:
      return self.denoiser(x_BxL, t_B).astype(jnp.float32)
    return jax.lax.cond(i == 0, lambda: self.first_logits.astype(jnp.float32),
                        lambda: self.denoiser(x_BxL, t_B).astype(jnp.float32))

  def step_keys(self, i):
    """[B, 4] keys of step i: the token draw, the reveal draw, the remask draw, the random confidence."""
    return jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i + self.step_offset), 4))(self.keys_B)

  def masked_time(self, x_BxL):
    """float32[B]: the t at which a row with this many [MASK] is typical, 1 - alpha(t) = masked fraction.

    The commit-by-confidence samplers have no time grid of their own; a time-conditioned denoiser
    must still see the noise level it was trained at for the row's current masking.
    """
    fraction_B = jnp.mean(x_BxL == self.mask_id, axis=-1, dtype=jnp.float32)
    return self.schedule.inverse_alpha(1.0 - fraction_B)

  def full_lengths(self):
    return jnp.full((self.batch_size,), self.length, jnp.int32)

  def trajectory(self):
    return jnp.zeros((self.record_steps, self.batch_size, self.length), jnp.int32)

  def record(self, traj, i, x_BxL):
    return traj.at[i].set(x_BxL) if self.record_steps else traj


def guided(denoiser, given_BxL, mask_id: int, weight: float):
  """Classifier-free guidance on the given tokens: uncond + (1 + w) (cond - uncond).

  The unconditional pass sees the same sequence with every given position masked, i.e. only what
  has been generated so far (the condition-dropout view of a model trained with it).
  """

  def fn(x, t):
    cond = denoiser(x, t).astype(jnp.float32)
    uncond = denoiser(jnp.where(given_BxL, mask_id, x), t).astype(jnp.float32)
    return uncond + (1.0 + weight) * (cond - uncond)

  return fn
