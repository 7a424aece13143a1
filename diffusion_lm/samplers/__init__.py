"""Samplers: every unmasking strategy, each one jitted loop over a denoiser.

A denoiser is any function `(tokens_BxL int32, t_B float32) -> logits_BxLxK` over the K data tokens;
the trained model is one, an exact oracle in the tests is another. Every sampler starts from a
sequence in which [MASK] (= `mask_id`) marks the positions to generate; every other position (prefix
prompt, suffix, infill context) is given and never changed.

Strategies (`SamplerConfig.name`), one module each over the shared pieces in `common`:
  ancestral   (remdm.py) the exact reverse process of the masking schedule (MD4 / MDLM): ReMDM with
              sigma = 0, plus the "no change, reuse logits" cache for time-independent denoisers.
  remdm       (remdm.py) remasking at a fixed step budget (Wang et al. 2025): cap | rescale | conf |
              loop schedules, switch window t_on / t_off.
  confidence  (confidence.py) commit the k most confident masked positions per step (LLaDA
              low-confidence remasking, MaskGIT); max_prob | margin | entropy | random; linear or
              cosine commit schedule.
  blocks      (confidence.py) semi-autoregressive: left-to-right blocks of `block_length`, confidence
              unmasking inside each block (LLaDA).
  threshold   (threshold.py) adaptive parallel decoding with a step budget (the project's): commit every
              position whose confidence passes `threshold`, at least one per step, everything left at
              the last of at most `steps`; every masked position of the row competes.
  llada, fast_dllm, dream
              (published.py) the authors' decoders token for token: LLaDA's generate, Fast-dLLM's
              threshold / factor decoding within the current block (no step budget) with its caches,
              Dream's diffusion_generate. Generation starts at the prompt's end.
Samplers without a time grid (confidence, blocks, threshold) give the denoiser the t whose masked
fraction 1 - alpha(t) equals the row's current one.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_lm.samplers import confidence, remdm, threshold
from diffusion_lm.samplers.common import (SampleOutput, Run, SplitDenoiser, confidence_scores, draw_tokens,
                                          filter_logits, guided, rank_desc, time_grid)
from diffusion_lm.samplers.conditioning import prompt_tokens, template_tokens
from diffusion_lm.samplers.config import (APPROX_CACHES, COMMIT_SCHEDULES, CONFIDENCE_ALIASES, CONFIDENCES, FINAL_STEPS,
                                          PUBLISHED, REMASK_SCHEDULES, SAMPLERS, TIME_GRIDS, TOP_P_RULES, SamplerConfig,
                                          check_steps)
from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule

_STRATEGY = {"ancestral": remdm, "remdm": remdm, "confidence": confidence, "blocks": confidence,
             "threshold": threshold}


def sample(denoiser: Callable, key: jax.Array, tokens_BxL: jax.Array, example_ids_B: jax.Array,
           cfg: SamplerConfig, *, schedule: Schedule, mask_id: int, return_trajectory: bool = False,
           time_independent: bool = True, split: SplitDenoiser | None = None) -> SampleOutput:
  """Runs the configured sampler; call under jax.jit (cfg, schedule and mask_id are static).

  Args:
    denoiser: (tokens_BxL, t_B) -> logits_BxLxK.
    key: base PRNG key.
    tokens_BxL: int32; mask_id marks the positions to generate, all others are kept.
    example_ids_B: int32 global indices of the examples (their key streams).
    cfg: the strategy and its settings.
    schedule: the masking schedule the model was trained with.
    mask_id: the [MASK] id (= K).
    return_trajectory: also return the sequence after every step.
    time_independent: the denoiser ignores t (lets ancestral/remdm reuse logits across no-op steps).
    split: the same denoiser in two parts (SplitDenoiser): ancestral and remdm then compute predictions
      only at the positions a step reveals (not with guidance, whose denoiser is a combination).
  """
  tokens_BxL = tokens_BxL.astype(jnp.int32)
  given_BxL = tokens_BxL != mask_id
  if cfg.guidance > 0:
    denoiser = guided(denoiser, given_BxL, mask_id, cfg.guidance)
  run = Run(denoiser=denoiser, keys_B=jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids_B),
            given_BxL=given_BxL, cfg=cfg, schedule=schedule.bound_schedule, mask_id=mask_id,
            record_steps=cfg.steps if return_trajectory else 0, time_independent=time_independent,
            split=split if cfg.guidance <= 0 else None)
  if cfg.name not in _STRATEGY:
    raise UserError(f"sampler={cfg.name!r} runs on a model (objective generate), not on a bare denoiser; allowed "
                    f"here: {', '.join(_STRATEGY)}")
  return _STRATEGY[cfg.name].sample(run, tokens_BxL)


def ancestral_sample(denoiser, key, tokens_BxL, example_ids_B, *, steps: int, schedule: Schedule,
                     mask_id: int, temperature: float = 1.0, return_trajectory: bool = False):
  """The ancestral sampler with default settings; returns tokens (and the trajectory if asked)."""
  out = sample(denoiser, key, tokens_BxL, example_ids_B,
               SamplerConfig(name="ancestral", steps=steps, temperature=temperature),
               schedule=schedule, mask_id=mask_id, return_trajectory=return_trajectory)
  return (out.tokens, out.trajectory) if return_trajectory else out.tokens


__all__ = ["APPROX_CACHES", "COMMIT_SCHEDULES", "CONFIDENCE_ALIASES", "CONFIDENCES", "FINAL_STEPS", "PUBLISHED",
           "REMASK_SCHEDULES", "TOP_P_RULES", "SAMPLERS", "TIME_GRIDS", "SampleOutput",
           "SamplerConfig", "SplitDenoiser", "ancestral_sample", "check_steps", "confidence_scores", "draw_tokens", "filter_logits",
           "guided", "prompt_tokens", "rank_desc", "sample", "template_tokens", "time_grid"]
