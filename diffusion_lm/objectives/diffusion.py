"""Masked diffusion (MD4 / MDLM): the continuous-time ELBO of a bidirectional denoiser."""

import jax
import jax.numpy as jnp

from diffusion_lm import diffusion, samplers
from diffusion_lm.objectives.base import Objective, bind, bind_forward, bind_split, hold_first
from diffusion_lm.samplers import approx_cache, published


def stratified_times(k, u_B, num_t_samples: int):
  """The k-th of n stratified draws for each row, (k + u) / n mapped into [T_MIN, 1]: float32 like u_B."""
  return diffusion.T_MIN + (1.0 - diffusion.T_MIN) * (k + u_B) / num_t_samples


class MaskedDiffusion(Objective):
  name = "diffusion"
  bound = "continuous-time ELBO"
  attention = "bidirectional"
  default_sampler = "ancestral"

  def split(self, tokens_BxL):
    """(clean tokens, positions held clean or None) of a batch; prompted objectives override it."""
    return tokens_BxL, None

  def held(self, tokens_BxL, ignore_bos: bool):
    """(clean tokens, positions held clean and unscored or None): the prompt (sft) and, with ignore_bos,
    position 0."""
    tokens_BxL, keep_BxL = self.split(tokens_BxL)
    return tokens_BxL, hold_first(keep_BxL, tokens_BxL) if ignore_bos else keep_BxL

  def loss(self, model, params, tokens_BxL, key, *, schedule, mask_id, bos_id, visible_future=None,
           ignore_bos=False):
    """visible_future (attention-mask annealing, DiffuLLaMA): each position sees every earlier one and
    this share of the later ones, drawn at random per step (one pattern for the batch). ignore_bos:
    position 0 is never masked (BD3-LM's ignore_bos on framed windows)."""
    tokens_BxL, keep_BxL = self.held(tokens_BxL, ignore_bos)
    apply = bind(model, params)
    if visible_future is not None:
      key, anneal_key = jax.random.split(key)
      length = tokens_BxL.shape[1]
      mask_LxL = jnp.tril(jnp.ones((length, length), bool)) | (
          jax.random.uniform(anneal_key, (length, length)) < visible_future)
      apply = lambda tokens, t=None, bound=apply: bound(tokens, t, mask_QxK=mask_LxL)
    out = diffusion.diffusion_loss(apply, tokens_BxL, key, schedule, mask_id, keep_BxL=keep_BxL)
    return out["nelbo"], out["num_masked"]

  def noise(self, model, tokens_BxL, key, *, schedule, mask_id, bos_id, visible_future=None, ignore_bos=False):
    if visible_future is not None:  # one attention pattern for the whole batch: not split by rows
      return None
    tokens_BxL, keep_BxL = self.held(tokens_BxL, ignore_bos)
    return diffusion.diffusion_noise(tokens_BxL, key, schedule, mask_id, keep_BxL=keep_BxL)

  def row_losses(self, model, params, rows, *, bos_id):
    out = diffusion.noised_loss(bind(model, params), rows)
    return out["nelbo"], out["num_masked"]

  def eval_nats(self, model, params, tokens_BxL, key, *, schedule, mask_id, bos_id, num_t_samples,
                discrete_steps, ignore_bos=False):
    """Time draws are stratified: the k-th of n draws for a row is at (k + u) / n with one uniform u per
    row, an unbiased low-variance estimate. ignore_bos: position 0 is neither masked nor counted ("scored":
    the L - 1 other positions)."""
    apply, schedule = bind_forward(model, params), schedule.bound_schedule
    tokens_BxL, keep_BxL = self.held(tokens_BxL, ignore_bos)
    batch_size = tokens_BxL.shape[0]
    time_key, mask_key, discrete_key = jax.random.split(key, 3)
    u_B = jax.random.uniform(time_key, (batch_size,))

    def body(k, totals):
      cont = diffusion.diffusion_loss(apply, tokens_BxL, jax.random.fold_in(mask_key, k), schedule, mask_id,
                                      t_B=stratified_times(k, u_B, num_t_samples), keep_BxL=keep_BxL)["nelbo"]
      if not discrete_steps:
        return totals[0] + cont, totals[1]
      disc = diffusion.discrete_loss(apply, tokens_BxL, jax.random.fold_in(discrete_key, k), schedule, mask_id,
                                     discrete_steps, u_B=(k + u_B) / num_t_samples, keep_BxL=keep_BxL)["nelbo"]
      return totals[0] + cont, totals[1] + disc

    zeros = jnp.zeros((batch_size,), jnp.float32)
    cont_B, disc_B = jax.lax.fori_loop(0, num_t_samples, body, (zeros, zeros))
    out = {"nats": cont_B / num_t_samples}
    if discrete_steps:
      out["nats_discrete"] = disc_B / num_t_samples
    if ignore_bos:
      out["scored"] = jnp.full((batch_size,), tokens_BxL.shape[1] - 1, jnp.float32)
    return out

  def generate(self, model, params, key, tokens_BxL, example_ids_B, cfg, *, schedule, mask_id, bos_id, eos_id,
               return_trajectory=False, gen_start=None, eot_id=-1):
    """gen_start (the published decoders, samplers/published.py): where generation starts, the prompt's end."""
    if cfg.name in published.DECODERS:
      return published.sample(model, params, key, tokens_BxL, example_ids_B, cfg, gen_start=gen_start,
                              mask_id=mask_id, eos_id=-1 if eos_id is None else eos_id, eot_id=eot_id,
                              return_trajectory=return_trajectory)
    if cfg.approx_cache != "none":
      return approx_cache.sample(model, params, key, tokens_BxL, example_ids_B, cfg, schedule=schedule,
                                 mask_id=mask_id, return_trajectory=return_trajectory)
    return samplers.sample(bind_forward(model, params), key, tokens_BxL, example_ids_B, cfg, schedule=schedule, mask_id=mask_id,
                           return_trajectory=return_trajectory, time_independent=not model.config.time_conditioning,
                           split=bind_split(model, params))
