"""Compiled, sharded text generation from a denoiser's parameters (used by train and sample)."""

import jax
import flax.linen as nn
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_lm import sampling, sharding


class Generator:
  """Compiles the sampler once per (num_samples, seq_len, steps) and decodes its output."""

  def __init__(self, model, schedule, tokenizer, mesh, param_shardings, *, steps: int,
               temperature: float = 1.0, return_trajectory: bool = False):
    sampling.check_steps(steps)
    self.tokenizer, self.mesh = tokenizer, mesh
    self.return_trajectory = return_trajectory
    sample = sampling.make_sampler(lambda params, x, t: model.apply({"params": params}, x, t),
                                   steps=steps, schedule=schedule, mask_id=tokenizer.mask_id,
                                   temperature=temperature, return_trajectory=return_trajectory)
    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    out = (batch, NamedSharding(mesh, P(None, ("data", "fsdp")))) if return_trajectory else batch
    self._sample = jax.jit(sample, in_shardings=(param_shardings, replicated, batch, batch),
                           out_shardings=out)

  def token_batch(self, prompt: str, seq_len: int, num_samples: int) -> np.ndarray:
    return sampling.prompt_tokens(self.tokenizer, prompt, seq_len, num_samples)

  def __call__(self, params, tokens_BxL: np.ndarray, seed: int):
    """Samples from the given initial tokens; returns (tokens int32[B, L], trajectory or None).

    The batch is padded up to a multiple of the data-parallel size; padding rows are dropped.
    """
    num = tokens_BxL.shape[0]
    dp = sharding.data_parallel_size(self.mesh)
    padded = -(-num // dp) * dp
    tokens = np.concatenate([tokens_BxL, np.repeat(tokens_BxL[:1], padded - num, axis=0)])
    ids = np.arange(padded, dtype=np.int32)
    batch = sharding.batch_sharding(self.mesh)
    put = lambda x: jax.make_array_from_callback(x.shape, batch, lambda idx: x[idx])
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      out = self._sample(params, jax.random.key(seed), put(tokens), put(ids))
    if self.return_trajectory:
      final, trajectory = out
      return _to_host(final)[:num], _to_host(trajectory)[:, :num]
    return _to_host(out)[:num], None

  def decode(self, tokens_BxL) -> list[str]:
    return [self.tokenizer.decode(row) for row in tokens_BxL]


def _to_host(x: jax.Array) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
