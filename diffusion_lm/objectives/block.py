"""Block diffusion (BD3-LM, Arriola et al. 2025): masked diffusion inside blocks, autoregressive across.

The sequence is cut into blocks of L' = model.block_size tokens. Block b is masked with its own time
t_b and denoised bidirectionally, conditioned on every earlier block clean; the negative ELBO is the
sum over blocks of the per-block masked-diffusion NELBO, in nats per sequence like every objective.

All blocks train in one forward pass: the noisy copy x_t and the clean copy x_0 side by side (2L
positions, both at positions 0..L-1) under a block-structured attention mask:
  noisy block b -> noisy block b (bidirectional) and clean blocks < b
  clean block b -> clean blocks <= b
L' = L is masked diffusion exactly; L' = 1 is, in expectation over t, the autoregressive likelihood of
the same network (each token predicted from a [MASK] at its own position and the clean tokens before).
"""

import dataclasses

import jax
import jax.numpy as jnp

from diffusion_lm import diffusion
from diffusion_lm.errors import UserError
from diffusion_lm.objectives.base import Objective, bind, check_learned_positions, hold_first
from diffusion_lm.objectives.diffusion import stratified_times
from diffusion_lm.samplers import block_decode


def block_attention_mask(seq_len: int, block_size: int):
  """bool[2L, 2L] (True = may attend) over [noisy x_t | clean x_0]."""
  block = jnp.arange(seq_len) // block_size
  same = block[:, None] == block[None, :]
  earlier = block[None, :] < block[:, None]
  up_to = block[None, :] <= block[:, None]
  top = jnp.concatenate([same, earlier], axis=1)
  bottom = jnp.concatenate([jnp.zeros_like(same), up_to], axis=1)
  return jnp.concatenate([top, bottom], axis=0)


def block_nelbo(apply, tokens_BxL, key, schedule, mask_id: int, block_size: int, t_BxN=None, keep_BxL=None) -> dict:
  """Monte Carlo estimate of the block-diffusion negative ELBO per sequence (nats).

    -ELBO(x0) = sum_b E_{t_b} E_{x_t^b} [ w(t_b) sum_{i masked in block b} -log p(x0_i | x_t^b, x0^{<b}) ]

  Args:
    apply: (tokens, t, positions_L=, mask_QxK=) -> logits; the network.
    tokens_BxL: clean int32 tokens; L a multiple of block_size.
    key: split into time and mask keys as `diffusion.diffusion_loss` does (so L' = L matches it draw for draw).
    t_BxN: optional times, one per block (block_times, stratified over all B x N block slots, when None).
    keep_BxL: optional bool positions never masked nor scored (ignore_bos: position 0).
  Returns:
    {"nelbo": float32[B], "num_masked": float32[B]}.
  """
  return noised_block_loss(apply, block_noise(tokens_BxL, key, schedule, mask_id, block_size, t_BxN, keep_BxL),
                           block_size)


def block_times(key, batch_size: int, num_blocks: int, t_min: float = diffusion.T_MIN, t_max: float = 1.0):
  """float32[B, N]: one time per block slot, stratified over the B x N slots as BD3-LM draws them: slot k
  (row-major) takes (u_k + k) / (B N) with its own uniform u_k, mapped onto [t_min, t_max]. Every slot is
  uniform on that range (an unbiased ELBO estimate on [T_MIN, 1]) and the slots cover it evenly."""
  slots = batch_size * num_blocks
  u_BxN = jax.random.uniform(key, (batch_size, num_blocks))
  grid_BxN = (u_BxN + jnp.arange(slots, dtype=jnp.float32).reshape(batch_size, num_blocks)) / slots
  return t_min + (t_max - t_min) * grid_BxN


def block_noise(tokens_BxL, key, schedule, mask_id: int, block_size: int, t_BxN=None, keep_BxL=None, clip=None,
                resample: bool = False) -> dict:
  """The random part of block_nelbo, per row: {tokens, noisy, is_masked, weight_BxN}, each leading with B.

  clip = (lo, hi), BD3-LM's clipped schedule (block.clip_search): times drawn on [lo, hi] instead of
  [T_MIN, 1], and with `resample` a block whose masked share falls outside [1 - alpha(lo), 1 - alpha(hi)]
  is masked again until it does (bounds at T_MIN and 1 are not enforced, as theirs). Lower-variance
  training; not an ELBO estimate.
  """
  batch_size, seq_len = tokens_BxL.shape
  num_blocks = seq_len // block_size
  time_key, mask_key = jax.random.split(key)
  lo, hi = (diffusion.T_MIN, 1.0) if clip is None else clip
  if t_BxN is None:
    t_BxN = block_times(time_key, batch_size, num_blocks, lo, hi)
  alpha_BxL = jnp.repeat(schedule.alpha(t_BxN), block_size, axis=1)
  noisy_BxL, masked_BxL = diffusion.forward_mask(mask_key, tokens_BxL, alpha_BxL, mask_id)
  if resample and clip is not None:  # lo, hi: floats or traced scalars (the search runs every range in one program)
    low = jnp.where(lo > diffusion.T_MIN, 1.0 - schedule.alpha(jnp.asarray(lo, jnp.float32)), -1.0)
    high = jnp.where(hi < 1.0, 1.0 - schedule.alpha(jnp.asarray(hi, jnp.float32)), 2.0)
    masked_BxL = resample_masks(jax.random.fold_in(mask_key, 1), masked_BxL, alpha_BxL, block_size, low, high)
    noisy_BxL = jnp.where(masked_BxL, mask_id, tokens_BxL).astype(jnp.int32)
  noisy_BxL, masked_BxL = diffusion.hold_positions(noisy_BxL, masked_BxL, tokens_BxL, keep_BxL)
  return {"tokens": tokens_BxL, "noisy": noisy_BxL, "is_masked": masked_BxL, "weight": schedule.weight(t_BxN)}


# Redraws of an out-of-range block before it is kept as it is (BD3-LM loops without a bound; a range no
# block of this size can meet, e.g. [0.3, 0.8] for blocks of 1, would never end).
MAX_RESAMPLES = 100


def resample_masks(key, is_masked_BxL, alpha_BxL, block_size: int, low, high):
  """bool[B, L]: is_masked_BxL with every block whose masked share is below `low` or above `high` masked
  again from its alpha, until none is (at most MAX_RESAMPLES rounds)."""
  batch, length = is_masked_BxL.shape

  def outside(masked):
    share = jnp.mean(masked.reshape(batch, length // block_size, block_size), axis=-1, dtype=jnp.float32)
    return (share < low) | (share > high)

  def body(carry):
    i, masked = carry
    redraw = jnp.repeat(outside(masked), block_size, axis=1)
    fresh = jax.random.uniform(jax.random.fold_in(key, i), masked.shape) >= alpha_BxL
    return i + 1, jnp.where(redraw, fresh, masked)

  cond = lambda carry: (carry[0] < MAX_RESAMPLES) & jnp.any(outside(carry[1]))
  return jax.lax.while_loop(cond, body, (jnp.int32(0), is_masked_BxL))[1]


def clip_candidates(widths, delta: float) -> list[tuple[float, float]]:
  """BD3-LM's clipped-schedule search grid: [T_MIN, 1] first, then for each width w the ranges [i, i + w] for
  i = 0, delta, ... up to 1 - w (bounds raised to at least T_MIN)."""
  out = [(diffusion.T_MIN, 1.0)]
  for width in widths:
    for i in range(int(round((1.0 - width) / delta)) + 1):
      lo, hi = max(round(i * delta, 6), diffusion.T_MIN), min(round(i * delta + width, 6), 1.0)
      if (lo, hi) not in out:
        out.append((lo, hi))
  return out


def noised_block_loss(apply, noise: dict, block_size: int) -> dict:
  """{nelbo, num_masked}, float32[B]: block_noise's rows under the network (noisy and clean copies in one pass)."""
  tokens_BxL, masked_BxL = noise["tokens"], noise["is_masked"]
  batch_size, seq_len = tokens_BxL.shape
  positions = jnp.arange(seq_len)
  logits = apply(jnp.concatenate([noise["noisy"], tokens_BxL], axis=1), None,
                 positions_L=jnp.concatenate([positions, positions]),
                 mask_QxK=block_attention_mask(seq_len, block_size))[:, :seq_len]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll_BxL = -jnp.take_along_axis(log_probs, tokens_BxL[..., None], axis=-1)[..., 0] * masked_BxL
  nll_BxN = nll_BxL.reshape(batch_size, seq_len // block_size, block_size).sum(-1)
  return {"nelbo": jnp.sum(noise["weight"] * nll_BxN, axis=-1),
          "per_block": noise["weight"] * nll_BxN / block_size,  # each block's weighted loss per token
          "num_masked": jnp.sum(masked_BxL, axis=-1).astype(jnp.float32)}


class BlockDiffusion(Objective):
  name = "block"
  bound = "block-diffusion ELBO"
  attention = "block-causal"
  default_sampler = "ancestral"

  def model_fields(self, config) -> dict:
    # Block decoding slides a window of the trained length: the model never saw longer contexts.
    return {"decode_window": config.data.seq_len}

  def check(self, config) -> None:
    size, seq_len = config.model.get("block_size", 0), config.data.seq_len
    if not isinstance(size, int) or size < 1 or seq_len % size:
      raise UserError(f"model.block_size={size!r} with data.seq_len={seq_len}; allowed for objective='block': "
                      f"a divisor of {seq_len}")
    if config.model.time_conditioning:
      raise UserError("model.time_conditioning=True with objective='block'; allowed: False (each block has its "
                      "own time; the block-diffusion denoiser reads the noise level from its masks)")
    if config.get("block", {}).get("clip_search", False):
      from diffusion_lm import clip_search  # pylint: disable=g-import-not-at-top
      clip_search.check(config.block)
    if config.diffusion.name == "mlm":
      raise UserError("diffusion.name='mlm' with objective='block'; allowed: a schedule with a bound "
                      "(linear, cosine, polynomial, geometric)")

  def loss(self, model, params, tokens_BxL, key, *, schedule, mask_id, bos_id, **extra):
    rows = self.noise(model, tokens_BxL, key, schedule=schedule, mask_id=mask_id, bos_id=bos_id, **extra)
    out = noised_block_loss(bind(model, params), rows, model.config.block_size)
    return out["nelbo"], out["num_masked"]

  def noise(self, model, tokens_BxL, key, *, schedule, mask_id, bos_id, ignore_bos=False, clip=None,
            resample=False):
    """ignore_bos: position 0 never masked; clip, resample: BD3-LM's clipped schedule (see block_noise)."""
    del bos_id
    keep = hold_first(None, tokens_BxL) if ignore_bos else None
    return block_noise(tokens_BxL, key, schedule, mask_id, model.config.block_size, keep_BxL=keep, clip=clip,
                       resample=resample)

  def row_losses(self, model, params, rows, *, bos_id):
    out = noised_block_loss(bind(model, params), rows, model.config.block_size)
    return out["nelbo"], out["num_masked"]

  def eval_nats(self, model, params, tokens_BxL, key, *, schedule, mask_id, bos_id, num_t_samples,
                discrete_steps, ignore_bos=False):
    del discrete_steps  # the T-step bound is defined for masked diffusion only
    keep = hold_first(None, tokens_BxL) if ignore_bos else None
    apply, block_size = bind(model, params), model.config.block_size
    batch_size, seq_len = tokens_BxL.shape
    time_key, mask_key = jax.random.split(key)
    u_BxN = jax.random.uniform(time_key, (batch_size, seq_len // block_size))

    def body(k, total):
      t_BxN = stratified_times(k, u_BxN, num_t_samples)
      return total + block_nelbo(apply, tokens_BxL, jax.random.fold_in(mask_key, k), schedule, mask_id, block_size,
                                 t_BxN=t_BxN, keep_BxL=keep)["nelbo"]

    total = jax.lax.fori_loop(0, num_t_samples, body, jnp.zeros((batch_size,), jnp.float32))
    out = {"nats": total / num_t_samples}
    if ignore_bos:  # the average counts the L - 1 other positions
      out["scored"] = jnp.full((batch_size,), seq_len - 1, jnp.float32)
    return out

  def generate(self, model, params, key, tokens_BxL, example_ids_B, cfg, *, schedule, mask_id, bos_id, eos_id,
               return_trajectory=False):
    check_learned_positions(model.config, tokens_BxL.shape[1])
    if cfg.guidance > 0:
      raise UserError(f"guidance={cfg.guidance} for a block-diffusion model; allowed: 0 (block decoding has no "
                      "unconditional pass)")
    if cfg.final_step == "auto":  # BD3-LM's block sampler has no final argmax pass
      cfg = dataclasses.replace(cfg, final_step="sample")
    return block_decode.sample(model, params, key, tokens_BxL, example_ids_B, cfg, schedule=schedule,
                               mask_id=mask_id, eos_id=eos_id, return_trajectory=return_trajectory)
