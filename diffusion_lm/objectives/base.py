"""The interface every objective implements."""

from typing import Callable

import jax

from diffusion_lm.samplers import SampleOutput, SamplerConfig
from diffusion_lm.schedules import Schedule


def bind(model, params) -> Callable[..., jax.Array]:
  """apply(tokens_BxL, t_B=None, **model_kwargs) -> logits_BxLxK: the network with its parameters bound."""
  return lambda tokens, t=None, **kwargs: model.apply({"params": params}, tokens, t, **kwargs)


class Objective:
  """One training objective. Stateless; methods are pure and jit-safe (called inside jitted steps)."""

  name: str = ""
  bound: str = ""  # what `evaluate` reports: "exact" or the kind of bound
  attention: str = ""  # bidirectional | causal | block-causal
  default_sampler: str = ""

  def model_fields(self, config) -> dict:
    """ModelConfig fields this objective sets (attention structure)."""
    return {}

  def check(self, config) -> None:
    """Raises UserError (one line) for config settings this objective cannot train with."""

  def loss(self, model, params, tokens_BxL, key, *, schedule: Schedule, mask_id: int, bos_id: int):
    """(nats_B, num_masked_B): the per-sequence training loss in nats (a bound or the exact NLL)."""
    raise NotImplementedError

  def eval_nats(self, model, params, tokens_BxL, key, *, schedule: Schedule, mask_id: int, bos_id: int,
                num_t_samples: int, discrete_steps: int) -> dict:
    """{"nats": float32[B], optionally "nats_discrete": float32[B]}: the evaluation bound per sequence."""
    raise NotImplementedError

  def generate(self, model, params, key, tokens_BxL, example_ids_B, cfg: SamplerConfig, *, schedule: Schedule,
               mask_id: int, bos_id: int, eos_id: int, return_trajectory: bool = False) -> SampleOutput:
    """Fills every [MASK] of tokens_BxL; call under jax.jit."""
    raise NotImplementedError
