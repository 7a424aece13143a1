"""The blocks sampler on a bidirectional model with Fast-dLLM's approximate key/value caches.

A masked-diffusion model attends both ways, so no position's keys/values are final until the whole
sequence is: an exact cache does not exist (block diffusion's does, see block_decode). Fast-dLLM
(Wu et al. 2025) observes that within one block the keys/values outside the block barely move, and
reuses them:

  prefix  each block starts with one full forward that keeps every layer's keys/values; the block's
          later steps run the network on [current block .. end] only, attending to the kept prefix.
  dual    the same, and the positions after the block are kept too: the later steps run the network
          on the current block only (block_length positions per forward).

Both are refreshed at every block's first step (that forward also gives the step's logits, so a
refresh costs no extra pass) and both are approximations: the kept keys/values were computed while
the current block held its older tokens. With one step per block, or a one-layer network (whose
keys/values depend on nothing but their own token), they are exact; the tests check both.

Everything else is the blocks sampler's: the same commit schedule, confidences and per-step keys, so
at temperature 0 the only difference from `blocks` is the cache.
"""

import dataclasses

import jax
import jax.numpy as jnp

from diffusion_lm.errors import UserError
from diffusion_lm.samplers import confidence
from diffusion_lm.samplers.common import Run, SampleOutput
from diffusion_lm.samplers.config import SamplerConfig


def sample(model, params, key, tokens_BxL, example_ids_B, cfg: SamplerConfig, *, schedule, mask_id: int,
           return_trajectory: bool = False) -> SampleOutput:
  """Fills every [MASK] of tokens_BxL with the blocks sampler under cfg.approx_cache; call under jax.jit."""
  if model.config.shift_logits:
    # A chunk's first position is predicted by the position before it, which the chunk does not compute.
    raise UserError("approx_cache with model.shift_logits=True (Dream-style) and sampler='blocks'; allowed: "
                    "sampler=fast_dllm (Fast-dLLM's cached Dream decoding) or --approx_cache=none")
  tokens_BxL = tokens_BxL.astype(jnp.int32)
  batch_size, length = tokens_BxL.shape
  cfg.check_length(length, length)
  block = cfg.block_length
  num_blocks = length // block
  steps_per_block = cfg.steps // num_blocks
  schedule = schedule.bound_schedule
  time_conditioned = model.config.time_conditioning
  keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)
  inner_cfg = dataclasses.replace(cfg, name="confidence", steps=steps_per_block, approx_cache="none")
  frames = steps_per_block if return_trajectory else 0

  def row_time(x_BxL):  # the t of the whole row's masked fraction, as the uncached sampler computes it
    if not time_conditioned:
      return None
    return schedule.inverse_alpha(1.0 - jnp.mean(x_BxL == mask_id, axis=-1, dtype=jnp.float32))

  x, trajs, used = tokens_BxL, [], jnp.zeros((batch_size,), jnp.int32)
  for b in range(num_blocks):  # static: the prefix chunk's length differs per block
    start = b * block
    end = length if cfg.approx_cache == "prefix" else start + block
    logits, variables = model.apply({"params": params}, x, row_time(x), approx_cache="store",
                                    mutable=["approx_cache"])
    outside_B = x[:, start + block:end]  # prefix: the later blocks ride along in every chunk, unchanged
    positions = jnp.arange(start, end)
    before, after = x[:, :start], x[:, end:]

    def denoiser(block_x, t_B, cache=variables["approx_cache"], outside=outside_B, positions=positions,
                 before=before, after=after):
      chunk = jnp.concatenate([block_x, outside], axis=1)
      t = row_time(jnp.concatenate([before, chunk, after], axis=1))
      out = model.apply({"params": params, "approx_cache": cache}, chunk, t, positions_L=positions,
                        approx_cache="reuse")
      return out[:, :block]

    run = Run(denoiser=denoiser, keys_B=keys_B, given_BxL=x[:, start:start + block] != mask_id, cfg=inner_cfg,
              schedule=schedule, mask_id=mask_id, record_steps=frames, time_independent=not time_conditioned,
              first_logits=logits[:, start:start + block], step_offset=b * steps_per_block)
    out = confidence.sample(run, x[:, start:start + block])
    if frames:
      trajs.append(jax.vmap(lambda frame, x=x: jax.lax.dynamic_update_slice_in_dim(x, frame, start, axis=1))(
          out.trajectory))
    x = jax.lax.dynamic_update_slice_in_dim(x, out.tokens, start, axis=1)
    used = used + out.steps_used
  traj = jnp.concatenate(trajs, axis=0) if frames else jnp.zeros((0, batch_size, length), jnp.int32)
  return SampleOutput(x, traj, used, jnp.int32(cfg.steps), jnp.full((batch_size,), length, jnp.int32))
