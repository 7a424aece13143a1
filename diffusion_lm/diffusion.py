"""Masked diffusion maths, apart from the network: forward masking, time sampling, the ELBO.

Conventions: data tokens are ids 0..K-1, the [MASK] id is K (= `mask_id`); a denoiser maps
(tokens_BxL int32 in 0..K, t_B float32) to logits_BxLxK over data tokens only. Leaving [MASK] out of
the output and carrying unmasked tokens over unchanged is the SUBS parameterization (MDLM), under
which the continuous-time ELBO only scores masked positions. Losses are in nats unless named bits.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (tokens_BxL, t_B) -> logits_BxLxK

# Continuous time is sampled in [T_MIN, 1]: w(t) ~ 1/t near 0, and masks at t < 1e-4 are vanishingly rare.
T_MIN = 1e-4


def antithetic_times(key: jax.Array, batch_size: int, t_min: float = T_MIN) -> jax.Array:
  """Low-discrepancy times t_i = t_min + (1 - t_min) * ((u + i / B) mod 1), one uniform u per batch.

  Every row still has a uniform marginal, so the ELBO estimate stays unbiased, with lower variance
  than B independent draws. Returns float32[B].
  """
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size}; allowed: an integer >= 1")
  u = jax.random.uniform(key, ())
  grid = jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  return t_min + (1.0 - t_min) * grid


def forward_mask(key: jax.Array, tokens_BxL: jax.Array, alpha_B: jax.Array, mask_id: int):
  """Samples x_t ~ q(x_t | x_0): each token independently becomes [MASK] with prob 1 - alpha.

  alpha_B is one value per sequence, float32[B], or one per token, float32[B, L] (block diffusion).
  Returns (noisy tokens int32[B, L], is_masked bool[B, L]).
  """
  if tokens_BxL.ndim != 2:
    raise UserError(f"tokens must be rank 2 [batch, length], got shape {tokens_BxL.shape}")
  u_BxL = jax.random.uniform(key, tokens_BxL.shape)
  is_masked_BxL = u_BxL >= (alpha_B[:, None] if alpha_B.ndim == 1 else alpha_B)
  noisy_BxL = jnp.where(is_masked_BxL, mask_id, tokens_BxL).astype(jnp.int32)
  return noisy_BxL, is_masked_BxL


def masked_nll(logits_BxLxK: jax.Array, tokens_BxL: jax.Array, is_masked_BxL: jax.Array) -> jax.Array:
  """Sum over masked positions of -log p(x0_i | x_t), in nats; float32[B]."""
  log_probs = jax.nn.log_softmax(logits_BxLxK.astype(jnp.float32), axis=-1)
  token_log_probs_BxL = jnp.take_along_axis(log_probs, tokens_BxL[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(is_masked_BxL, token_log_probs_BxL, 0.0), axis=-1)


def hold_positions(noisy_BxL, is_masked_BxL, tokens_BxL, keep_BxL):
  """The draw with the `keep_BxL` positions (True: e.g. a prompt) left clean and never scored."""
  if keep_BxL is None:
    return noisy_BxL, is_masked_BxL
  return jnp.where(keep_BxL, tokens_BxL, noisy_BxL), is_masked_BxL & ~keep_BxL


def split_prompt(rows_BxL):
  """(tokens, is_prompt) of rows that store prompt tokens as their complement ~id (negative), the
  prompt/response rows of data.source='jsonl' (objective 'sft'); other rows come back unchanged."""
  is_prompt_BxL = rows_BxL < 0
  return jnp.where(is_prompt_BxL, ~rows_BxL, rows_BxL), is_prompt_BxL


def diffusion_loss(denoiser: Denoiser, tokens_BxL: jax.Array, key: jax.Array, schedule: Schedule,
                   mask_id: int, t_B: jax.Array | None = None, keep_BxL=None) -> dict[str, jax.Array]:
  """Monte Carlo estimate of the continuous-time negative ELBO (MD4 / MDLM), per sequence.

    -ELBO(x0) = E_{t ~ U(0,1)} E_{x_t} [ w(t) * sum_{i masked in x_t} -log p(x0_i | x_t) ],
    w(t) = -alpha'(t) / (1 - alpha(t)).

  The "mlm" schedule instead masks at its fixed rate m and weights by 1/m (the BERT loss scaled to a
  sequence total); that is a training objective, not a bound.

  Args:
    denoiser: (tokens_BxL, t_B) -> logits_BxLxK.
    tokens_BxL: clean int32 tokens in [0, mask_id).
    key: PRNG key; split here into time and mask keys.
    schedule: the masking schedule.
    mask_id: the [MASK] id (= number of data tokens K).
    t_B: optional times (e.g. a stratified evaluation grid); antithetic draws when None.
    keep_BxL: optional bool positions never masked nor scored (a prompt: the bound of the rest given it).
  Returns:
    dict of float32[B] arrays: `nelbo` (nats per sequence), `num_masked`, `t`.
  """
  noise = diffusion_noise(tokens_BxL, key, schedule, mask_id, t_B=t_B, keep_BxL=keep_BxL)
  return {**noised_loss(denoiser, noise), "t": noise["t"]}


def diffusion_noise(tokens_BxL: jax.Array, key: jax.Array, schedule: Schedule, mask_id: int,
                    t_B: jax.Array | None = None, keep_BxL=None) -> dict[str, jax.Array]:
  """The random part of diffusion_loss, per row: {tokens, noisy, is_masked, t, weight}, each leading with B.

  Drawn for the whole batch at once (antithetic times couple the rows); noised_loss of any subset of
  rows is then that subset's share of the loss (training in microbatches).
  """
  batch_size = tokens_BxL.shape[0]
  time_key, mask_key = jax.random.split(key)
  if schedule.name == "mlm":
    t_B = jnp.full((batch_size,), schedule.mask_rate, jnp.float32)
    alpha_B = 1.0 - t_B
    weight_B = 1.0 / t_B
  else:
    if t_B is None:
      t_B = antithetic_times(time_key, batch_size)
    alpha_B = schedule.alpha(t_B)
    weight_B = schedule.weight(t_B)
  noisy_BxL, is_masked_BxL = forward_mask(mask_key, tokens_BxL, alpha_B, mask_id)
  noisy_BxL, is_masked_BxL = hold_positions(noisy_BxL, is_masked_BxL, tokens_BxL, keep_BxL)
  return {"tokens": tokens_BxL, "noisy": noisy_BxL, "is_masked": is_masked_BxL, "t": t_B, "weight": weight_B}


def noised_loss(denoiser: Denoiser, noise: dict) -> dict[str, jax.Array]:
  """{nelbo, num_masked}, float32[B]: the loss of diffusion_noise's rows under the denoiser."""
  nll_B = masked_nll(denoiser(noise["noisy"], noise["t"]), noise["tokens"], noise["is_masked"])
  return {"nelbo": noise["weight"] * nll_B,
          "num_masked": jnp.sum(noise["is_masked"], axis=-1).astype(jnp.float32)}


def discrete_loss(denoiser: Denoiser, tokens_BxL: jax.Array, key: jax.Array, schedule: Schedule,
                  mask_id: int, num_steps: int, u_B: jax.Array | None = None, keep_BxL=None) -> dict[str, jax.Array]:
  """Monte Carlo estimate of the exact T-step discrete-time negative ELBO, per sequence (nats).

    -ELBO_T(x0) = sum_{i=1..T} E_{x_{t_i}} [ (alpha(s_i) - alpha(t_i)) / (1 - alpha(t_i))
                                             * sum_{masked n} -log p(x0_n | x_{t_i}) ],
    t_i = i / T, s_i = (i - 1) / T,

  estimated with one step index i per row (uniform; stratified when u_B holds one uniform per row
  placed on a grid by the caller) and weight T. The bound of a T-step sampler; it decreases to the
  continuous-time bound as T grows.
  """
  if num_steps < 1:
    raise UserError(f"num_steps={num_steps}; allowed: an integer >= 1")
  batch_size = tokens_BxL.shape[0]
  step_key, mask_key = jax.random.split(key)
  if u_B is None:
    u_B = jax.random.uniform(step_key, (batch_size,))
  i_B = jnp.minimum(jnp.floor(u_B * num_steps), num_steps - 1) + 1.0  # 1..T
  t_B, s_B = i_B / num_steps, (i_B - 1.0) / num_steps
  schedule = schedule.bound_schedule
  alpha_t, alpha_s = schedule.alpha(t_B), schedule.alpha(s_B)
  weight_B = num_steps * (alpha_s - alpha_t) / jnp.maximum(1.0 - alpha_t, 1e-12)
  noisy_BxL, is_masked_BxL = forward_mask(mask_key, tokens_BxL, alpha_t, mask_id)
  noisy_BxL, is_masked_BxL = hold_positions(noisy_BxL, is_masked_BxL, tokens_BxL, keep_BxL)
  nll_B = masked_nll(denoiser(noisy_BxL, t_B), tokens_BxL, is_masked_BxL)
  return {"nelbo": weight_B * nll_B, "t": t_B}


def nats_to_bits(nats):
  return nats / math.log(2.0)
