"""Samplers: every unmasking strategy, each one jitted loop over a denoiser.

A denoiser is any function `(tokens_BxL int32, t_B float32) -> logits_BxLxK` over the K data tokens;
the trained model is one, an exact oracle in the tests is another. Every sampler starts from a
sequence in which [MASK] (= `mask_id`) marks the positions to generate; every other position (prefix
prompt, suffix, infill context) is given and never changed.

Randomness is per example: example b draws from fold_in(key, example_ids[b]), then fold_in(., step),
so a sequence does not depend on the batch it is drawn in, nor on the device count.

Strategies (`SamplerConfig.name`):
  ancestral   the exact reverse process of the masking schedule (MD4 / MDLM), uniform or cosine time
              grid; when a step reveals nothing, the next step reuses the logits (time-independent
              denoisers only).
  confidence  commit the k most confident masked positions per step (LLaDA low-confidence remasking,
              MaskGIT); confidence = max_prob | margin | entropy | random; k from a linear or cosine
              commit schedule.
  blocks      semi-autoregressive: left-to-right blocks of `block_length`, confidence unmasking inside
              each block (LLaDA).
  threshold   adaptive parallel decoding (Fast-dLLM): commit every position whose confidence passes
              `threshold`, at least one per step, until nothing is masked; reports the steps used.
  remdm       a fixed step budget with remasking (ReMDM-cap with confidence-weighted remasking):
              committed low-confidence tokens may be re-masked and revised.
"""

import dataclasses
import math
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule

SAMPLERS = ("ancestral", "confidence", "blocks", "threshold", "remdm")
CONFIDENCES = ("max_prob", "margin", "entropy", "random")
COMMIT_SCHEDULES = ("linear", "cosine")
TIME_GRIDS = ("uniform", "cosine")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to sample; built from `config.sampling` and command-line flags."""

  name: str = "ancestral"
  steps: int = 64  # denoiser calls (the upper bound for "threshold")
  temperature: float = 1.0  # 0 = argmax
  top_k: int = 0  # keep the k most likely tokens (0 = all)
  top_p: float = 1.0  # nucleus: keep the smallest set with this much probability (1 = all)
  float64: bool = False  # draw categorical samples with float64 Gumbel noise
  time_grid: str = "uniform"  # ancestral/remdm: uniform | cosine
  cache: bool = True  # ancestral: reuse logits when a step changed nothing (time-independent models)
  confidence: str = "max_prob"  # confidence/blocks/threshold/remdm: how sure a prediction is
  commit_schedule: str = "linear"  # confidence/blocks: how many to commit per step
  block_length: int = 32  # blocks: tokens per block
  threshold: float = 0.9  # threshold: commit predictions at least this confident
  remask_eta: float = 0.05  # remdm: cap on the per-step remasking probability
  guidance: float = 0.0  # classifier-free guidance weight on the given tokens (0 = off)

  def __post_init__(self):
    _choice("sampler", self.name, SAMPLERS)
    _choice("confidence", self.confidence, CONFIDENCES)
    _choice("commit_schedule", self.commit_schedule, COMMIT_SCHEDULES)
    _choice("time_grid", self.time_grid, TIME_GRIDS)
    check_steps(self.steps)
    if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
      raise UserError(f"temperature={self.temperature}; allowed: a number >= 0")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise UserError(f"top_k={self.top_k}; allowed: an integer >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p}; allowed: 0 < top_p <= 1")
    if not 0 < self.threshold <= 1:
      raise UserError(f"threshold={self.threshold}; allowed: 0 < threshold <= 1")
    if not 0 <= self.remask_eta <= 1:
      raise UserError(f"remask_eta={self.remask_eta}; allowed: 0 <= remask_eta <= 1")
    if not (isinstance(self.block_length, int) and self.block_length >= 1):
      raise UserError(f"block_length={self.block_length}; allowed: an integer >= 1")
    if self.guidance < 0:
      raise UserError(f"guidance={self.guidance}; allowed: a number >= 0")

  def check_length(self, length: int, num_masked: int) -> None:
    """Checks the settings against a sequence of `length` with `num_masked` positions to fill."""
    if self.name == "blocks":
      if length % self.block_length:
        raise UserError(f"block_length={self.block_length} does not divide the sequence length {length};"
                        f" allowed: a divisor of {length}")
      num_blocks = length // self.block_length
      if self.steps % num_blocks:
        raise UserError(f"steps={self.steps} is not a multiple of the {num_blocks} blocks; allowed: a "
                        f"multiple of {num_blocks}")
      if self.steps // num_blocks > self.block_length:
        raise UserError(f"steps={self.steps} gives {self.steps // num_blocks} steps per block of "
                        f"{self.block_length} tokens; allowed: at most {self.block_length * num_blocks}")
    if self.name == "confidence" and self.steps > num_masked:
      raise UserError(f"steps={self.steps} exceeds the {num_masked} positions to generate; the confidence "
                      f"sampler commits at least one per step: allowed at most {num_masked}")


def _choice(name, value, allowed):
  if value not in allowed:
    raise UserError(f"{name}={value!r}; allowed: {', '.join(allowed)}")


def check_steps(steps) -> None:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise UserError(f"steps={steps!r}; allowed: an integer >= 1")


class SampleOutput(NamedTuple):
  tokens: jax.Array  # int32[B, L], no [MASK] left
  trajectory: jax.Array  # int32[S, B, L]: the sequence after each step (S = 0 when not recorded)
  steps_used: jax.Array  # int32[B]: denoiser steps that changed or could change the row
  num_calls: jax.Array  # int32[]: denoiser forward passes actually run (the cache skips some)


# ----------------------------------------------------------------------------- token draws


def filter_logits(logits_BxLxK, top_k: int = 0, top_p: float = 1.0):
  """Top-k then nucleus filtering: removed tokens get -inf. float32 in, float32 out."""
  logits = logits_BxLxK.astype(jnp.float32)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < top_p (the top token is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def draw_tokens(key_B, logits_BxLxK, cfg: SamplerConfig):
  """Samples a token per position with per-example keys: (tokens int32[B, L], probs float32[B, L, K]).

  The returned probabilities are those of the filtered, tempered distribution (for confidences).
  """
  if cfg.temperature == 0:
    logits = filter_logits(logits_BxLxK, cfg.top_k, cfg.top_p)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jax.nn.softmax(logits, axis=-1)
  logits = filter_logits(logits_BxLxK / cfg.temperature, cfg.top_k, cfg.top_p)
  probs = jax.nn.softmax(logits, axis=-1)
  if cfg.float64:
    # Gumbel-max in float64: float32 Gumbel noise truncates the tail of rare tokens, which is known
    # to lower the entropy of samples and distort generative perplexity.
    def one(k, lg):
      gumbel = jax.random.gumbel(k, lg.shape, dtype=jnp.float64)
      return jnp.argmax(jax.nn.log_softmax(lg.astype(jnp.float64), axis=-1) + gumbel, axis=-1)
    tokens = jax.vmap(one)(key_B, logits)
  else:
    # Inverse-CDF draw: one uniform per position instead of one Gumbel per (position, token), which
    # on a 1024-token vocabulary is most of a sampling step's cost beyond the forward pass.
    def one(k, p_LxK):
      u = jax.random.uniform(k, p_LxK.shape[:-1] + (1,))
      cdf = jnp.cumsum(p_LxK, axis=-1)
      # The first token whose cdf exceeds u * total: a zero-probability token is never chosen.
      return jnp.minimum(jnp.sum(cdf <= u * cdf[..., -1:], axis=-1), p_LxK.shape[-1] - 1)
    tokens = jax.vmap(one)(key_B, probs)
  return tokens.astype(jnp.int32), probs


def confidence_scores(key_B, probs_BxLxK, tokens_BxL, kind: str):
  """Higher = more confident; float32[B, L].

  Model-based scores are rounded to 2^-12 so that near-ties (common: many positions see similar
  context) are broken by position, not by float noise that differs with batch size or device count.
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
  return jnp.round(score * 4096.0) / 4096.0


def _rank_desc(scores_BxL):
  """Rank of each position by descending score within its row (0 = highest); ties by position."""
  order = jnp.argsort(-scores_BxL, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def _commit_fraction(kind: str, i, steps: int):
  """Share of the still-masked positions to commit at step i of `steps` (1 at the last step)."""
  f = (lambda s: s) if kind == "linear" else (lambda s: 1.0 - jnp.cos(0.5 * math.pi * s))
  now, nxt = f(i / steps), f((i + 1) / steps)
  return jnp.where(i >= steps - 1, 1.0, (nxt - now) / jnp.maximum(1.0 - now, 1e-12))


def _time_grid(kind: str, i, steps: int):
  """t at step i of the reverse process (t_0 = 1, t_steps = 0)."""
  s = i / steps
  return 1.0 - s if kind == "uniform" else jnp.cos(0.5 * math.pi * s)


# ----------------------------------------------------------------------------- the samplers


def sample(denoiser: Callable, key: jax.Array, tokens_BxL: jax.Array, example_ids_B: jax.Array,
           cfg: SamplerConfig, *, schedule: Schedule, mask_id: int, return_trajectory: bool = False,
           time_independent: bool = True) -> SampleOutput:
  """Runs the configured sampler; call under jax.jit (cfg, schedule and mask_id are static).

  Args:
    denoiser: (tokens_BxL, t_B) -> logits_BxLxK.
    key: base PRNG key.
    tokens_BxL: int32; mask_id marks the positions to generate, all others are kept.
    example_ids_B: int32 global indices of the examples (their key streams).
    cfg: the strategy and its settings.
    schedule: the masking schedule the model was trained with (ancestral, remdm).
    mask_id: the [MASK] id (= K).
    return_trajectory: also return the sequence after every step.
    time_independent: the denoiser ignores t (lets ancestral reuse logits across no-op steps).
  """
  schedule = schedule.bound_schedule
  tokens_BxL = tokens_BxL.astype(jnp.int32)
  batch_size, length = tokens_BxL.shape
  given_BxL = tokens_BxL != mask_id
  keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)
  max_steps = length if cfg.name == "threshold" else cfg.steps

  if cfg.guidance > 0:
    denoiser = _guided(denoiser, given_BxL, mask_id, cfg.guidance)

  def step_keys(i):
    return jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i), 3))(keys_B)

  def record(traj, i, x):
    return traj.at[i].set(x) if return_trajectory else traj

  traj0 = jnp.zeros((max_steps if return_trajectory else 0, batch_size, length), jnp.int32)
  steps_used0 = jnp.zeros((batch_size,), jnp.int32)

  if cfg.name == "ancestral":
    use_cache = cfg.cache and time_independent
    vocab = jax.eval_shape(denoiser, tokens_BxL, jnp.zeros((batch_size,), jnp.float32)).shape[-1]

    def body(i, carry):
      x, logits, changed, traj, used, calls = carry
      t, s = _time_grid(cfg.time_grid, i, cfg.steps), _time_grid(cfg.time_grid, i + 1, cfg.steps)
      alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
      reveal_prob = jnp.where(i == cfg.steps - 1, 1.0, (alpha_s - alpha_t) / jnp.maximum(1.0 - alpha_t, 1e-12))
      t_B = jnp.full((batch_size,), t, jnp.float32)
      recompute = changed if use_cache else jnp.array(True)
      # A step that revealed nothing left the input unchanged: the logits are the same.
      logits = jax.lax.cond(recompute, lambda: denoiser(x, t_B).astype(jnp.float32), lambda: logits)
      k = step_keys(i)
      proposal, _ = draw_tokens(k[:, 0], logits, cfg)
      u = jax.vmap(lambda kk: jax.random.uniform(kk, (length,)))(k[:, 1])
      masked = x == mask_id
      reveal = masked & (u < reveal_prob)
      used = used + jnp.any(masked, axis=-1).astype(jnp.int32)
      x = jnp.where(reveal, proposal, x)
      return x, logits, jnp.any(reveal), record(traj, i, x), used, calls + recompute.astype(jnp.int32)

    logits0 = jnp.zeros((batch_size, length, vocab), jnp.float32)
    x, _, _, traj, used, calls = jax.lax.fori_loop(
        0, cfg.steps, body, (tokens_BxL, logits0, jnp.array(True), traj0, steps_used0, jnp.int32(0)))
    return SampleOutput(x, traj, used, calls)

  if cfg.name in ("confidence", "blocks"):
    num_blocks = length // cfg.block_length if cfg.name == "blocks" else 1
    steps_per_block = cfg.steps // num_blocks
    position = jnp.arange(length)

    def body(i, carry):
      x, traj, used = carry
      block = i // steps_per_block
      in_block = (position // (length // num_blocks)) == block
      logits = denoiser(x, jnp.ones((batch_size,), jnp.float32)).astype(jnp.float32)
      k = step_keys(i)
      proposal, probs = draw_tokens(k[:, 0], logits, cfg)
      candidates = (x == mask_id) & in_block[None, :]
      score = jnp.where(candidates, confidence_scores(k[:, 1], probs, proposal, cfg.confidence), -jnp.inf)
      remaining = jnp.sum(candidates, axis=-1)
      frac = _commit_fraction(cfg.commit_schedule, i % steps_per_block, steps_per_block)
      count = jnp.clip(jnp.floor(remaining * frac + 0.5).astype(jnp.int32), jnp.minimum(remaining, 1), remaining)
      commit = candidates & (_rank_desc(score) < count[:, None])
      used = used + (remaining > 0).astype(jnp.int32)
      x = jnp.where(commit, proposal, x)
      return x, record(traj, i, x), used

    x, traj, used = jax.lax.fori_loop(0, cfg.steps, body, (tokens_BxL, traj0, steps_used0))
    return SampleOutput(x, traj, used, jnp.int32(cfg.steps))

  if cfg.name == "threshold":

    def cond(carry):
      x, _, _, i = carry
      return (i < max_steps) & jnp.any(x == mask_id)

    def body(carry):
      x, traj, used, i = carry
      logits = denoiser(x, jnp.ones((batch_size,), jnp.float32)).astype(jnp.float32)
      k = step_keys(i)
      proposal, probs = draw_tokens(k[:, 0], logits, cfg)
      masked = x == mask_id
      score = jnp.where(masked, confidence_scores(k[:, 1], probs, proposal, cfg.confidence), -jnp.inf)
      best = _rank_desc(score) == 0
      confident = masked & (score >= _threshold_score(cfg))
      commit = masked & (confident | best)
      used = used + jnp.any(masked, axis=-1).astype(jnp.int32)
      x = jnp.where(commit, proposal, x)
      return x, record(traj, i, x), used, i + 1

    x, traj, used, calls = jax.lax.while_loop(cond, body, (tokens_BxL, traj0, steps_used0, jnp.int32(0)))
    if return_trajectory:
      # Steps after the loop ended show the final sequence.
      valid = (jnp.arange(max_steps) < calls)[:, None, None]
      traj = jnp.where(valid, traj, x[None])
    return SampleOutput(x, traj, used, calls)

  # remdm
  def body(i, carry):
    x, conf, traj, used = carry
    t, s = _time_grid(cfg.time_grid, i, cfg.steps), _time_grid(cfg.time_grid, i + 1, cfg.steps)
    alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
    last = i == cfg.steps - 1
    # ReMDM-cap: sigma_t <= (1 - alpha_s) / alpha_t keeps the posterior valid.
    sigma = jnp.where(last, 0.0, jnp.minimum(cfg.remask_eta, (1.0 - alpha_s) / jnp.maximum(alpha_t, 1e-12)))
    reveal_prob = jnp.where(
        last, 1.0, (alpha_s - (1.0 - sigma) * alpha_t) / jnp.maximum(1.0 - alpha_t, 1e-12))
    logits = denoiser(x, jnp.full((batch_size,), t, jnp.float32)).astype(jnp.float32)
    k = step_keys(i)
    proposal, probs = draw_tokens(k[:, 0], logits, cfg)
    new_conf = confidence_scores(k[:, 1], probs, proposal, "max_prob")
    masked = x == mask_id
    generated = (~masked) & (~given_BxL)
    # Spread the remasking mass sigma * (#generated) over generated tokens, low confidence first.
    weights = jax.nn.softmax(jnp.where(generated, -conf, -jnp.inf), axis=-1)
    weights = jnp.where(generated, weights, 0.0)
    remask_prob = jnp.clip(sigma * jnp.sum(generated, axis=-1, keepdims=True) * weights, 0.0, 1.0)
    u = jax.vmap(lambda kk: jax.random.uniform(kk, (2, length)))(k[:, 2])
    reveal = masked & (u[:, 0] < reveal_prob)
    remask = generated & (u[:, 1] < remask_prob)
    used = used + jnp.any(masked, axis=-1).astype(jnp.int32)
    x = jnp.where(reveal, proposal, jnp.where(remask, mask_id, x))
    conf = jnp.where(reveal, new_conf, conf)
    return x, conf, record(traj, i, x), used

  conf0 = jnp.ones((batch_size, length), jnp.float32)
  x, _, traj, used = jax.lax.fori_loop(0, cfg.steps, body, (tokens_BxL, conf0, traj0, steps_used0))
  return SampleOutput(x, traj, used, jnp.int32(cfg.steps))


def _guided(denoiser, given_BxL, mask_id: int, weight: float):
  """Classifier-free guidance on the given tokens: uncond + (1 + w) (cond - uncond).

  The unconditional pass sees the same sequence with every given position masked, i.e. only what
  has been generated so far (the condition-dropout view of a model trained with it).
  """

  def guided(x, t):
    cond = denoiser(x, t).astype(jnp.float32)
    uncond = denoiser(jnp.where(given_BxL, mask_id, x), t).astype(jnp.float32)
    return uncond + (1.0 + weight) * (cond - uncond)

  return guided


def _threshold_score(cfg: SamplerConfig):
  """The threshold on the configured confidence scale (entropy is scored as -H, in nats)."""
  if cfg.confidence == "entropy":
    return jnp.log(cfg.threshold)  # -H >= log(threshold): as sure as a distribution with that max prob
  return cfg.threshold


def ancestral_sample(denoiser, key, tokens_BxL, example_ids_B, *, steps: int, schedule: Schedule,
                     mask_id: int, temperature: float = 1.0, return_trajectory: bool = False):
  """The ancestral sampler with default settings; returns tokens (and the trajectory if asked)."""
  out = sample(denoiser, key, tokens_BxL, example_ids_B,
               SamplerConfig(name="ancestral", steps=steps, temperature=temperature),
               schedule=schedule, mask_id=mask_id, return_trajectory=return_trajectory)
  return (out.tokens, out.trajectory) if return_trajectory else out.tokens


# ----------------------------------------------------------------------------- conditioning


_MASK_RUN = re.compile(r"\[MASK(?:\*(\d+))?\]")


def template_tokens(tokenizer, seq_len: int, prompt: str = "", suffix: str = "", infill: str = ""):
  """The initial int32[seq_len] row: given tokens from prompt/suffix/infill, [MASK] elsewhere.

  `infill` is text with [MASK] (one token) or [MASK*n] (n tokens) marking what to generate, e.g.
  "To be, or not to be: [MASK*24] the question."; it fills the row from the start and any positions
  after it are generated too. `prompt` is a prefix and `suffix` ends the row.
  """
  if infill and (prompt or suffix):
    raise UserError("--infill already gives the whole sequence; allowed: --infill alone, or --prompt/--suffix")
  row = np.full((seq_len,), tokenizer.mask_id, np.int32)
  if infill:
    if not _MASK_RUN.search(infill):
      raise UserError(f"infill text {infill[:40]!r} has no [MASK] or [MASK*n]; allowed: text with at least one")
    ids, pos = [], 0
    for m in _MASK_RUN.finditer(infill):
      ids += tokenizer.encode(infill[pos:m.start()]) if m.start() > pos else []
      n = int(m.group(1) or 1)
      if n < 1:
        raise UserError(f"[MASK*{n}] in infill; allowed: n >= 1")
      ids += [tokenizer.mask_id] * n
      pos = m.end()
    ids += tokenizer.encode(infill[pos:]) if pos < len(infill) else []
    if len(ids) > seq_len:
      raise UserError(f"infill is {len(ids)} tokens, longer than seq_len={seq_len}; allowed: at most {seq_len}")
    row[:len(ids)] = ids
    return row
  head = tokenizer.encode(prompt) if prompt else []
  tail = tokenizer.encode(suffix) if suffix else []
  if len(head) + len(tail) > seq_len:
    what = "prompt" if not tail else ("suffix" if not head else "prompt + suffix")
    raise UserError(f"{what} is {len(head) + len(tail)} tokens, longer than seq_len={seq_len}; allowed: at "
                    f"most {seq_len} tokens")
  row[:len(head)] = head
  if tail:
    row[seq_len - len(tail):] = tail
  return row


def prompt_tokens(tokenizer, prompt: str, seq_len: int, num_samples: int):
  """int32[num_samples, seq_len]: the encoded prompt as a prefix, the rest [MASK]."""
  return np.tile(template_tokens(tokenizer, seq_len, prompt=prompt), (num_samples, 1))
