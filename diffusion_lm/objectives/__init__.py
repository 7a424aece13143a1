"""Training objectives as one concept: loss, evaluation bound, attention structure, default sampler.

  diffusion  masked diffusion: bidirectional denoiser, continuous-time ELBO (MD4 / MDLM)
  ar         the autoregressive baseline: causal attention, exact next-token likelihood, KV-cache decoding
  block      block diffusion (BD3-LM): masked diffusion inside blocks of `model.block_size` tokens,
             conditioned on every earlier block clean; block-causal attention, KV-cache block decoding
  sft        instruction fine-tuning (LLaDA SFT): masked diffusion of the response given the prompt

Adding an objective is one module here with an `Objective` subclass, registered below.
"""

from diffusion_lm.errors import UserError
from diffusion_lm.objectives.ar import Autoregressive
from diffusion_lm.objectives.base import Objective
from diffusion_lm.objectives.block import BlockDiffusion
from diffusion_lm.objectives.diffusion import MaskedDiffusion
from diffusion_lm.objectives.sft import PromptedDiffusion

_REGISTRY = {o.name: o for o in (MaskedDiffusion(), Autoregressive(), BlockDiffusion(), PromptedDiffusion())}
OBJECTIVES = tuple(_REGISTRY)


def get(name: str) -> Objective:
  if name not in _REGISTRY:
    raise UserError(f"objective={name!r}; allowed: {', '.join(OBJECTIVES)}")
  return _REGISTRY[name]


def of_model(model_config) -> Objective:
  """The objective a network was built for, read off its attention structure."""
  return get("ar" if model_config.causal else "block" if model_config.block_size else "diffusion")


__all__ = ["OBJECTIVES", "Objective", "get", "of_model"]
