"""The autoregressive baseline on the same network: causal attention, exact next-token likelihood."""

from diffusion_lm import autoregressive
from diffusion_lm.errors import UserError
from diffusion_lm.objectives.base import Objective, bind, check_learned_positions


class Autoregressive(Objective):
  name = "ar"
  bound = "exact"
  attention = "causal"
  default_sampler = "ar"

  def model_fields(self, config) -> dict:
    # Decoding slides a window of the trained length: the model never saw longer contexts.
    return {"causal": True, "decode_window": config.data.seq_len}

  def loss(self, model, params, tokens_BxL, key, *, schedule, mask_id, bos_id):
    del key, schedule, mask_id
    nll_B = autoregressive.next_token_nll(bind(model, params), tokens_BxL, bos_id)
    return nll_B, 0.0 * nll_B

  def noise(self, model, tokens_BxL, key, *, schedule, mask_id, bos_id):
    del model, key, schedule, mask_id, bos_id  # nothing random: the rows are the tokens
    return {"tokens": tokens_BxL}

  def row_losses(self, model, params, rows, *, bos_id):
    nll_B = autoregressive.next_token_nll(bind(model, params), rows["tokens"], bos_id)
    return nll_B, 0.0 * nll_B

  def eval_nats(self, model, params, tokens_BxL, key, *, schedule, mask_id, bos_id, num_t_samples,
                discrete_steps):
    del key, schedule, mask_id, num_t_samples, discrete_steps
    return {"nats": autoregressive.next_token_nll(bind(model, params), tokens_BxL, bos_id)}

  def generate(self, model, params, key, tokens_BxL, example_ids_B, cfg, *, schedule, mask_id, bos_id, eos_id,
               return_trajectory=False):
    del schedule, eos_id
    if cfg.approx_cache != "none":
      raise UserError(f"approx_cache={cfg.approx_cache!r} for an AR model; allowed: none (its KV cache is exact)")
    check_learned_positions(model.config, tokens_BxL.shape[1])
    if cfg.guidance > 0:
      raise UserError(f"guidance={cfg.guidance} for an autoregressive model; allowed: 0 (left-to-right decoding "
                      "has no unconditional pass)")
    return autoregressive.decode(model, params, key, tokens_BxL, example_ids_B, cfg, mask_id=mask_id,
                                 bos_id=bos_id, return_trajectory=return_trajectory)
