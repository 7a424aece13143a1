"""Samplers: the reverse (unmasking) process, compiled as one jitted loop.

Every sampler takes a denoiser `(tokens_BxL, t_B) -> logits_BxLxK` and an initial sequence in which
[MASK] marks the positions to generate; all other positions (a prompt) are held fixed. Randomness is
per example: example b uses key fold_in(key, example_ids[b]), so a sequence does not depend on the
batch it is drawn in or on the device count.
"""

import functools

import jax
import jax.numpy as jnp

from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule


def check_steps(steps) -> None:
  if not isinstance(steps, int) or steps < 1:
    raise UserError(f"steps={steps!r}; allowed: an integer >= 1")


def _draw_tokens(key_B, logits_BxLxK, temperature: float):
  """Categorical draw per position with per-example keys; temperature 0 is argmax."""
  if temperature == 0:
    return jnp.argmax(logits_BxLxK, axis=-1).astype(jnp.int32)
  scaled = logits_BxLxK.astype(jnp.float32) / temperature
  return jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(key_B, scaled).astype(jnp.int32)


def ancestral_sample(denoiser, key: jax.Array, tokens_BxL: jax.Array, example_ids_B: jax.Array, *,
                     steps: int, schedule: Schedule, mask_id: int, temperature: float = 1.0,
                     return_trajectory: bool = False):
  """The exact reverse process of a masking schedule (MD4 / MDLM ancestral sampling).

  On the uniform time grid t_i = 1 - i / steps, a still-masked position is revealed between t and
  s < t with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), its token drawn from the denoiser's
  p(x0 | x_t); the last step reveals every position that is left.

  Args:
    denoiser: (tokens_BxL, t_B) -> logits_BxLxK over data tokens.
    key: base PRNG key.
    tokens_BxL: int32; mask_id where to generate, anything else is kept.
    example_ids_B: int32 global example indices (the per-example key streams).
    steps: number of denoiser calls (static).
  Returns:
    tokens int32[B, L] with no mask_id left, and, if return_trajectory, int32[steps, B, L] holding
    the sequence after each step.
  """
  check_steps(steps)
  schedule = schedule.bound_schedule
  batch_size = tokens_BxL.shape[0]
  keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)

  def body(i, carry):
    tokens, trajectory = carry
    t = 1.0 - i / steps
    s = 1.0 - (i + 1) / steps
    alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
    reveal_prob = jnp.where(i == steps - 1, 1.0, (alpha_s - alpha_t) / jnp.maximum(1.0 - alpha_t, 1e-12))
    step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i)))(keys_B)
    logits = denoiser(tokens, jnp.full((batch_size,), t, jnp.float32))
    proposal = _draw_tokens(step_keys[:, 0], logits, temperature)
    u = jax.vmap(lambda k: jax.random.uniform(k, tokens.shape[1:]))(step_keys[:, 1])
    reveal = (tokens == mask_id) & (u < reveal_prob)
    tokens = jnp.where(reveal, proposal, tokens)
    if return_trajectory:
      trajectory = trajectory.at[i].set(tokens)
    return tokens, trajectory

  trajectory = jnp.zeros((steps if return_trajectory else 0,) + tokens_BxL.shape, jnp.int32)
  tokens, trajectory = jax.lax.fori_loop(0, steps, body, (tokens_BxL.astype(jnp.int32), trajectory))
  return (tokens, trajectory) if return_trajectory else tokens


def prompt_tokens(tokenizer, prompt: str, seq_len: int, num_samples: int):
  """Initial int32[num_samples, seq_len] tokens: the encoded prompt as a prefix, the rest [MASK]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = tokenizer.encode(prompt) if prompt else []
  if len(ids) > seq_len:
    raise UserError(f"prompt is {len(ids)} tokens, longer than seq_len={seq_len}; allowed: at most "
                    f"{seq_len} tokens")
  row = np.full((seq_len,), tokenizer.mask_id, np.int32)
  row[:len(ids)] = ids
  return np.tile(row, (num_samples, 1))


def make_sampler(apply_fn, *, steps: int, schedule: Schedule, mask_id: int, temperature: float,
                 return_trajectory: bool = False):
  """Returns `sample(params, key, tokens_BxL, example_ids_B)`, to be wrapped in jax.jit."""
  check_steps(steps)
  if not temperature >= 0:
    raise UserError(f"temperature={temperature}; allowed: a number >= 0")

  def sample(params, key, tokens_BxL, example_ids_B):
    denoiser = functools.partial(apply_fn, params)
    return ancestral_sample(denoiser, key, tokens_BxL, example_ids_B, steps=steps, schedule=schedule,
                            mask_id=mask_id, temperature=temperature,
                            return_trajectory=return_trajectory)

  return sample
