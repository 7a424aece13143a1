"""Compiled, sharded generation from a denoiser's parameters (used by train and sample)."""

import contextlib
import dataclasses
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_lm import objectives, sampling, sharding
from diffusion_lm.errors import UserError
from diffusion_lm.samplers import block_decode

SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(sampling.SamplerConfig))


def sampler_config(sampling_config, **overrides) -> sampling.SamplerConfig:
  """SamplerConfig from `config.sampling` (other fields there are ignored) plus overrides."""
  values = {k: sampling_config[k] for k in SAMPLER_FIELDS if k in sampling_config}
  values.update({k: v for k, v in overrides.items() if v is not None})
  return sampling.SamplerConfig(**values)


class Generator:
  """One compiled sampler per (batch, length); batch sharded over the mesh's data axes."""

  def __init__(self, model, schedule, tokenizer, mesh, param_shardings, cfg: sampling.SamplerConfig,
               return_trajectory: bool = False):
    self.tokenizer, self.mesh, self.cfg = tokenizer, mesh, cfg
    self.return_trajectory = return_trajectory
    self.objective = objectives.of_model(model.config)
    self.causal = model.config.causal
    self.block_size = model.config.block_size
    if self.block_size:
      block_decode.check(cfg, self.block_size)

    def run(params, key, tokens_BxL, example_ids_B):
      return self.objective.generate(model, params, key, tokens_BxL, example_ids_B, cfg, schedule=schedule,
                                     mask_id=tokenizer.mask_id, bos_id=tokenizer.eos_id, eos_id=tokenizer.eos_id,
                                     return_trajectory=return_trajectory)

    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    out = sampling.SampleOutput(batch, NamedSharding(mesh, P(None, ("data", "fsdp"))), batch, replicated, batch)
    self._run = jax.jit(run, in_shardings=(param_shardings, replicated, batch, batch), out_shardings=out)
    self._compiled = {}  # (batch, length) -> compiled executable
    self.compile_seconds = {}  # (batch, length) -> seconds spent compiling it

  @property
  def num_compiles(self) -> int:
    return len(self._compiled)

  def _context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
    if self.cfg.float64:
      stack.enter_context(jax.enable_x64(True))
    return stack

  def template(self, seq_len: int, num_samples: int, prompt: str = "", suffix: str = "", infill: str = ""):
    row = sampling.template_tokens(self.tokenizer, seq_len, prompt=prompt, suffix=suffix, infill=infill)
    if self.block_size and seq_len % self.block_size:
      raise UserError(f"seq_len={seq_len} for a model of {self.block_size}-token blocks; allowed: a multiple of "
                      f"{self.block_size}")
    if not (self.causal or self.block_size):
      self.cfg.check_length(seq_len, int((row == self.tokenizer.mask_id).sum()))
    return np.tile(row, (num_samples, 1))

  def __call__(self, params, tokens_BxL: np.ndarray, seed: int) -> sampling.SampleOutput:
    """Samples from the initial tokens; returns host numpy arrays (trajectory int32[S, B, L]).

    Sequence i uses key stream fold_in(key(seed), i); the batch is padded up to a multiple of the
    data-parallel size and the padding rows are dropped.
    """
    num = tokens_BxL.shape[0]
    tokens = sharding.pad_rows(np.asarray(tokens_BxL, np.int32), self.mesh)
    ids = np.arange(tokens.shape[0], dtype=np.int32)
    args = (params, jax.random.key(seed), sharding.put_global(tokens, self.mesh),
            sharding.put_global(ids, self.mesh))
    with self._context():
      out = self._executable(args)(*args)
    return sampling.SampleOutput(_to_host(out.tokens)[:num], _to_host(out.trajectory)[:, :num],
                                 _to_host(out.steps_used)[:num], int(out.num_calls), _to_host(out.lengths)[:num])

  def _executable(self, args):
    """The compiled sampler for these arguments' shapes, compiled ahead of time on first use (so the
    compile cost is measured apart from the run)."""
    shape = args[2].shape
    if shape not in self._compiled:
      start = time.perf_counter()
      self._compiled[shape] = self._run.lower(*args).compile()
      self.compile_seconds[shape] = time.perf_counter() - start
    return self._compiled[shape]

  def compile(self, params, tokens_BxL: np.ndarray) -> float:
    """Compiles for this batch shape without running; returns the compile seconds."""
    padded = (sharding.padded_batch_size(tokens_BxL.shape[0], self.mesh), tokens_BxL.shape[1])
    batch = sharding.batch_sharding(self.mesh)
    args = (params, jax.random.key(0), jax.ShapeDtypeStruct(padded, np.int32, sharding=batch),
            jax.ShapeDtypeStruct(padded[:1], np.int32, sharding=batch))
    with self._context():
      self._executable(args)
    return self.compile_seconds[padded]

  def decode(self, tokens_BxL) -> list[str]:
    return [self.tokenizer.decode(row) for row in tokens_BxL]


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
