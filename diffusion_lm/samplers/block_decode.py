"""Block-diffusion decoding with an exact KV cache (BD3-LM): blocks left to right, any strategy inside.

Finished blocks never change, so their keys and values are computed once and every denoising step
runs the network on the current block only, attending to the cache. The clean block's keys and values
are computed in the first step of the next block: that forward runs over [finished block | next block]
(2 x block positions, block-causal: the finished block sees only itself and the cache), keeps the
finished block in the cache and gives the next block's first logits, so committing costs no forward
pass of its own. Inside a block any strategy runs unchanged (ancestral, remdm, confidence, threshold)
with `steps` steps per block, on a denoiser that is the network over that block.

The loop over blocks is one `lax.while_loop` (one compile for any number of blocks); it stops when
every row has produced an end-of-document token or the sequence is full. Rows that finished early
still ride along in the batch (shapes are static), and the loop ends as soon as all have finished.
After a row's end-of-document token every position holds that token; `lengths` counts up to it.
The cache is a ring of about max_len positions, so the sequence may be longer than max_len: each
block then sees the last max_len positions, the window the model was trained on.
"""

import jax
import jax.numpy as jnp

from diffusion_lm.errors import UserError
from diffusion_lm.samplers import confidence, remdm, threshold
from diffusion_lm.samplers.common import Run, SampleOutput
from diffusion_lm.samplers.config import SamplerConfig

_INNER = {"ancestral": remdm, "remdm": remdm, "confidence": confidence, "threshold": threshold}


def check(cfg: SamplerConfig, block_size: int) -> None:
  if cfg.approx_cache != "none":
    raise UserError(f"approx_cache={cfg.approx_cache!r} for a block-diffusion model; allowed: none (its cache of "
                    "finished blocks is exact)")
  if cfg.name not in _INNER:
    raise UserError(f"sampler={cfg.name!r} for a block-diffusion model; allowed: {', '.join(_INNER)} (run inside "
                    "each block)")
  if cfg.name == "confidence" and cfg.steps > block_size:
    raise UserError(f"steps={cfg.steps} exceeds the block of {block_size} tokens; the confidence sampler "
                    f"commits at least one per step: allowed at most {block_size}")


def sample(model, params, key, tokens_BxL, example_ids_B, cfg: SamplerConfig, *, schedule, mask_id: int,
           eos_id: int | None = None, return_trajectory: bool = False) -> SampleOutput:
  """Fills every [MASK] of tokens_BxL (L a multiple of the block size) block by block; call under jax.jit."""
  block = model.config.block_size
  check(cfg, block)
  tokens_BxL = tokens_BxL.astype(jnp.int32)
  batch_size, length = tokens_BxL.shape
  if length % block:
    raise UserError(f"sequence length {length} is not a multiple of the block size {block}")
  num_blocks = length // block
  given_BxL = tokens_BxL != mask_id
  keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B)
  _, variables = model.apply({"params": params}, tokens_BxL[:, :block], decode=True, mutable=["cache"])
  frames = cfg.steps if return_trajectory else 0
  traj0 = jnp.zeros((frames * num_blocks, batch_size, length), jnp.int32)

  def cond(carry):
    b, _, _, _, _, _, done_B = carry
    return (b < num_blocks) & ~jnp.all(done_B)

  def body(carry):
    b, x, cache, traj, used, calls, done_B = carry
    start = b * block
    chunk = jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)
    finished = jax.lax.dynamic_slice_in_dim(x, jnp.maximum(start - block, 0), block, axis=1)

    def commit_and_start():  # commits the finished block b - 1; the first logits of block b
      logits, updated = model.apply({"params": params, "cache": cache}, jnp.concatenate([finished, chunk], axis=1),
                                    None, decode=True, commit=block, mutable=["cache"])
      return logits[:, block:].astype(jnp.float32), updated["cache"]

    def start_only():  # block 0: nothing to commit yet
      logits = model.apply({"params": params, "cache": cache}, chunk, None, decode=True, commit=False)
      return logits.astype(jnp.float32), cache

    first_logits, cache = jax.lax.cond(b > 0, commit_and_start, start_only)
    denoiser = lambda xc, t: model.apply({"params": params, "cache": cache}, xc, None, decode=True, commit=False)
    run = Run(denoiser=denoiser, keys_B=jax.vmap(lambda k: jax.random.fold_in(k, b))(keys_B),
              given_BxL=chunk != mask_id, cfg=cfg, schedule=schedule.bound_schedule, mask_id=mask_id,
              record_steps=frames, time_independent=True, first_logits=first_logits)
    out = _INNER[cfg.name].sample(run, chunk)
    if frames:
      before = jnp.broadcast_to(x[None], (frames, batch_size, length))
      traj = jax.lax.dynamic_update_slice(traj, jax.lax.dynamic_update_slice(before, out.trajectory, (0, 0, start)),
                                          (b * frames, 0, 0))
    x = jax.lax.dynamic_update_slice_in_dim(x, out.tokens, start, axis=1)
    if eos_id is not None:
      generated = jax.lax.dynamic_slice_in_dim(~given_BxL, start, block, axis=1)
      done_B = done_B | jnp.any(generated & (out.tokens == eos_id), axis=-1)
    return b + 1, x, cache, traj, used + out.steps_used, calls + out.num_calls, done_B

  init = (jnp.int32(0), tokens_BxL, variables["cache"], traj0, jnp.zeros((batch_size,), jnp.int32), jnp.int32(0),
          jnp.zeros((batch_size,), bool))
  blocks_run, x, _, traj, used, calls, _ = jax.lax.while_loop(cond, body, init)
  lengths = jnp.full((batch_size,), length, jnp.int32)
  if eos_id is not None:
    ends = (x == eos_id) & ~given_BxL
    first = jnp.argmax(ends, axis=-1)
    lengths = jnp.where(jnp.any(ends, axis=-1), first + 1, length).astype(jnp.int32)
    x = jnp.where(jnp.arange(length)[None, :] >= lengths[:, None], eos_id, x)
  if frames:
    valid = (jnp.arange(frames * num_blocks) < blocks_run * frames)[:, None, None]
    traj = jnp.where(valid, traj, x[None])
  return SampleOutput(x, traj, used, calls, lengths)
