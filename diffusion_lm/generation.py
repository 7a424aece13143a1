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
from diffusion_lm.samplers import block_decode, published

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
    self.shifted = bool(model.config.shift_logits)
    self.block_size = model.config.block_size
    self.published = cfg.name in published.DECODERS
    if self.published and (self.causal or self.block_size or self.objective.name not in ("diffusion", "sft")):
      raise UserError(f"sampler={cfg.name!r} for a {self.objective.name} model; allowed: a masked-diffusion model "
                      f"(objective diffusion or sft; these models sample with {self.objective.default_sampler})")
    if self.block_size:
      block_decode.check(cfg, self.block_size)
    eot_id = end_of_turn_id(tokenizer)

    def run(params, key, tokens_BxL, example_ids_B, gen_start):
      extra = {"gen_start": gen_start, "eot_id": eot_id} if self.published else {}
      return self.objective.generate(model, params, key, tokens_BxL, example_ids_B, cfg, schedule=schedule,
                                     mask_id=tokenizer.mask_id, bos_id=tokenizer.eos_id, eos_id=tokenizer.eos_id,
                                     return_trajectory=return_trajectory, **extra)

    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    out = sampling.SampleOutput(batch, NamedSharding(mesh, P(None, ("data", "fsdp"))), batch, replicated, batch)
    self._run = jax.jit(run, in_shardings=(param_shardings, replicated, batch, batch), out_shardings=out,
                        static_argnums=4)
    self._compiled = {}  # (batch, length, generation start) -> compiled executable
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
    if self.published:
      published.check(self.cfg, seq_len, self.generation_start(row[None]), self.shifted)
    return np.tile(row, (num_samples, 1))

  def generation_start(self, tokens_BxL: np.ndarray) -> int:
    """The published decoders' generation start: the first [MASK] (the prompt's end), shared by the rows."""
    if not self.published:
      return 0
    masked = np.asarray(tokens_BxL) == self.tokenizer.mask_id
    if not masked.any():
      raise UserError(f"sampler={self.cfg.name!r}: nothing to generate (no [MASK] in the initial tokens)")
    starts = np.argmax(masked, axis=1)
    if np.any(starts != starts[0]):
      raise UserError(f"sampler={self.cfg.name!r} with prompts ending at {sorted(set(starts.tolist()))}; allowed: "
                      "prompts of one length in a batch (as the reference decoders)")
    return int(starts[0])

  def __call__(self, params, tokens_BxL: np.ndarray, seed: int) -> sampling.SampleOutput:
    """Samples from the initial tokens; returns host numpy arrays (trajectory int32[S, B, L]).

    Sequence i uses key stream fold_in(key(seed), i); the batch is padded up to a multiple of the
    data-parallel size and the padding rows are dropped.
    """
    num = tokens_BxL.shape[0]
    tokens = sharding.pad_rows(np.asarray(tokens_BxL, np.int32), self.mesh)
    ids = np.arange(tokens.shape[0], dtype=np.int32)
    args = (params, jax.random.key(seed), sharding.put_global(tokens, self.mesh),
            sharding.put_global(ids, self.mesh), self.generation_start(tokens_BxL))
    with self._context():
      out = self._executable(args)(*args)
    return sampling.SampleOutput(_to_host(out.tokens)[:num], _to_host(out.trajectory)[:, :num],
                                 _to_host(out.steps_used)[:num], int(out.num_calls), _to_host(out.lengths)[:num])

  def _executable(self, args):
    """The compiled sampler for these arguments' shapes, compiled ahead of time on first use (so the
    compile cost is measured apart from the run)."""
    shape, gen_start = args[2].shape, args[4]
    if (shape, gen_start) not in self._compiled:
      start = time.perf_counter()
      self._compiled[shape, gen_start] = self._run.lower(*args).compile()
      self.compile_seconds[shape] = time.perf_counter() - start
    return lambda *a: self._compiled[shape, gen_start](*a[:4])

  def compile(self, params, tokens_BxL: np.ndarray) -> float:
    """Compiles for this batch shape without running; returns the compile seconds."""
    padded = (sharding.padded_batch_size(tokens_BxL.shape[0], self.mesh), tokens_BxL.shape[1])
    batch = sharding.batch_sharding(self.mesh)
    args = (params, jax.random.key(0), jax.ShapeDtypeStruct(padded, np.int32, sharding=batch),
            jax.ShapeDtypeStruct(padded[:1], np.int32, sharding=batch), self.generation_start(tokens_BxL))
    with self._context():
      self._executable(args)
    return self.compile_seconds[padded]

  def decode(self, tokens_BxL) -> list[str]:
    return [self.tokenizer.decode(row) for row in tokens_BxL]


def end_of_turn_id(tokenizer) -> int:
  """The end-of-turn token's id (<|eot_id|>, LLaDA's confidence_eos_eot_inf), -1 when the vocabulary has none."""
  lookup = getattr(getattr(tokenizer, "tok", None), "token_to_id", None)
  found = lookup("<|eot_id|>") if lookup else None
  return -1 if found is None or found == getattr(tokenizer, "eos_id", None) else int(found)


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
