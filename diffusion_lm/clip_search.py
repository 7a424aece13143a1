"""BD3-LM's clipped noise schedules for block diffusion (block.clip_search): the search for the range.

BD3-LM trains block models with t drawn on a range [lo, hi] instead of [T_MIN, 1] (its var_min), the range
chosen at each validation as the one of `clip_candidates` under which the per-block losses vary least: for
each candidate, each of the first batches of the validation split is noised as training would noise it
under that range (masks resampled into range), every block's weighted loss per token is taken (a B x N
matrix) and the variance of that matrix's entries; the sums over batches are compared. The validation
ELBO itself is still reported on [T_MIN, 1]. The chosen range is saved with every checkpoint, so a
resumed run trains on the range the uninterrupted one had.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_lm import data, diffusion, sharding
from diffusion_lm.errors import UserError
from diffusion_lm.objectives import block
from diffusion_lm.objectives.base import bind, hold_first

DEFAULT = (diffusion.T_MIN, 1.0)
RECORD = "block_clip"  # the checkpoint item holding {"lo": ..., "hi": ...}


def check(block_config) -> None:
  widths, delta = tuple(block_config.clip_search_widths), block_config.clip_search_delta
  if not widths or any(not 0 < w <= 1 for w in widths):
    raise UserError(f"block.clip_search_widths={widths!r}; allowed: widths in (0, 1], at least one")
  if not 0 < delta < 1:
    raise UserError(f"block.clip_search_delta={delta!r}; allowed: 0 < delta < 1")
  if not isinstance(block_config.clip_search_batches, int) or block_config.clip_search_batches < 1:
    raise UserError(f"block.clip_search_batches={block_config.clip_search_batches!r}; allowed: an integer >= 1")


def batch_variance(params, tokens_BxL, valid_B, key, lo, hi, *, model, schedule, mask_id, resample, ignore_bos):
  """Variance (unbiased, over the valid rows' B x N entries) of the blocks' weighted losses per token under
  the range [lo, hi] (traced scalars: one program for every candidate)."""
  keep = hold_first(None, tokens_BxL) if ignore_bos else None
  noise = block.block_noise(tokens_BxL, key, schedule, mask_id, model.config.block_size, keep_BxL=keep,
                            clip=(lo, hi), resample=resample)
  per_block = block.noised_block_loss(bind(model, params), noise, model.config.block_size)["per_block"]
  weight = jnp.broadcast_to(valid_B.astype(jnp.float32)[:, None], per_block.shape)
  count = jnp.sum(weight)
  mean = jnp.sum(per_block * weight) / count
  return jnp.sum(weight * (per_block - mean) ** 2) / jnp.maximum(count - 1.0, 1.0)


class ClipSearch:
  """search(params, windows) -> ((lo, hi), {range: summed variance}) over block.clip_search_batches batches."""

  def __init__(self, model, schedule, mask_id, mesh, param_shardings, config, ignore_bos=False):
    b = config.block
    check(b)
    self.candidates = block.clip_candidates(tuple(b.clip_search_widths), b.clip_search_delta)
    self.batches, self.mesh, self.eval = b.clip_search_batches, mesh, config.evaluation
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = sharding.batch_sharding(mesh)
    self._step = jax.jit(
        functools.partial(batch_variance, model=model, schedule=schedule.bound_schedule, mask_id=mask_id,
                          resample=bool(b.resample), ignore_bos=ignore_bos),
        in_shardings=(param_shardings, batch, batch, replicated, replicated, replicated), out_shardings=replicated)

  def __call__(self, params, windows):
    cfg = self.eval
    per_process = cfg.batch_size // jax.process_count()
    lo_row = jax.process_index() * per_process
    totals = {}
    key = jax.random.key(cfg.seed + 1)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      batches = list(data.eval_batches(windows, cfg.batch_size, self.batches, cfg.seed))
      for i, b in enumerate(batches):
        tokens = sharding.global_batch_from_local(b.tokens[lo_row:lo_row + per_process], self.mesh)
        valid = sharding.global_batch_from_local(b.valid[lo_row:lo_row + per_process], self.mesh)
        for lo, hi in self.candidates:
          value = self._step(params, tokens, valid, jax.random.fold_in(key, i), jnp.float32(lo), jnp.float32(hi))
          totals[(lo, hi)] = totals.get((lo, hi), 0.0) + float(value)
    best = min(self.candidates, key=lambda c: totals[c])  # ties: the earlier candidate, as BD3-LM's strict <
    return best, totals


def restore(manager, step: int) -> tuple[float, float]:
  """The range saved with checkpoint `step` (DEFAULT for a checkpoint from before the search)."""
  from diffusion_lm import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    record = checkpointing.restore_items(manager, step, records=(RECORD,))[RECORD]
  except (KeyError, ValueError, FileNotFoundError):
    return DEFAULT
  return float(record["lo"]), float(record["hi"])
