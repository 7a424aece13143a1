"""Instruction fine-tuning of a masked diffusion model (LLaDA's SFT): the response given the prompt.

Rows come from data.source='jsonl' (see data.PromptResponseRows): prompt tokens stored as their
complement ~id, then the response, then end-of-text padding up to the row length. The prompt is never
masked and never scored; every other position is, the padding included, so the model learns where an
answer ends (LLaDA pads with |EOS| and counts it as response). The loss is the masked-diffusion ELBO
of those positions, so a prompt-conditioned sample (`sample --prompt`) answers.

Normalisation as LLaDA's SFT guidelines: each row's loss is divided by that row's answer length (its
scored positions, padding included), then averaged over the batch; every per-token figure (training
loss, mask rate, evaluation nats / perplexity / bits per token) counts the scored positions only.
"""

import jax.numpy as jnp

from diffusion_lm import diffusion
from diffusion_lm.errors import UserError
from diffusion_lm.objectives.diffusion import MaskedDiffusion


class PromptedDiffusion(MaskedDiffusion):
  name = "sft"
  bound = "continuous-time ELBO of the response given the prompt"

  def split(self, tokens_BxL):
    return diffusion.split_prompt(tokens_BxL)

  def scored_positions(self, tokens_BxL):
    return jnp.sum(~self.split(tokens_BxL)[1], axis=-1).astype(jnp.float32)

  def noise(self, model, tokens_BxL, key, *, schedule, mask_id, bos_id, **extra):
    rows = super().noise(model, tokens_BxL, key, schedule=schedule, mask_id=mask_id, bos_id=bos_id, **extra)
    return None if rows is None else {**rows, "scored": self.scored_positions(tokens_BxL)}

  def eval_nats(self, model, params, tokens_BxL, key, **kwargs):
    return {**super().eval_nats(model, params, tokens_BxL, key, **kwargs),
            "scored": self.scored_positions(tokens_BxL)}

  def check(self, config) -> None:
    if config.data.source != "jsonl":
      raise UserError(f"objective='sft' with data.source={config.data.source!r}; allowed: data.source='jsonl' "
                      "(prompt/response pairs in data.path)")
