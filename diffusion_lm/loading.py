"""Opening a trained or converted workdir for use: its config, tokenizer, network and one parameter tree.

A command that samples, evaluates, benchmarks or exports reads only the parameters it uses, the EMA (or
raw) parameters of a full train state, or the one tree of a converted workdir's parameters-only checkpoint,
never the optimizer state, straight into the NamedShardings of its mesh: each process reads the shards of
its own devices, and with dtype="bfloat16" they arrive in bfloat16 (half the memory; float32 on disk is
cast as it is read).
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_lm import checkpointing, experiment, lora, paths, sharding, tokenizers
from diffusion_lm.errors import UserError
from diffusion_lm.model import Transformer
from diffusion_lm.schedules import Schedule

PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Trained:
  """A trained workdir opened for sampling or evaluation."""

  config: Any
  tokenizer: Any
  model: Transformer
  schedule: Schedule
  mesh: Any
  params: Any
  param_shardings: Any
  step: int


def check_dtype(dtype) -> None:
  if dtype is not None and dtype not in PARAM_DTYPES:
    raise UserError(f"param_dtype={dtype!r}; allowed: {', '.join(PARAM_DTYPES)} (or None: as the network "
                    "initialises them, float32)")


def abstract_params(model: Transformer, seq_len: int):
  """The network's parameter tree as boxed ShapeDtypeStructs (logical axis names; nothing allocated)."""
  return jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, seq_len), jnp.int32),
                                               jnp.zeros((1,), jnp.float32))["params"], jax.random.key(0))


def param_shardings(model: Transformer, mesh, seq_len: int, dtype: str | None = None):
  """(abstract parameters with their shardings and dtype, NamedSharding tree): the parameter part of
  experiment.state_shardings, with nothing of the optimizer."""
  check_dtype(dtype)
  boxed = abstract_params(model, seq_len)
  shardings = sharding.logical_shardings(boxed, mesh)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, PARAM_DTYPES[dtype] if dtype else x.dtype, sharding=s),
      nn.unbox(boxed), shardings)
  return abstract, shardings


def open_workdir(workdir: str):
  """(config, tokenizer, network) of a workdir's newest checkpoint whose config reads."""
  paths.check_uri_support(workdir)
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise UserError(f"workdir {workdir!r} is a file, not a folder; allowed: a workdir written by "
                    "python -m diffusion_lm.train (or convert)")
  step, saved = checkpointing.read_saved_config(workdir)
  if step is None:
    raise UserError(f"workdir {workdir!r} holds no checkpoint; train first with "
                    f"python -m diffusion_lm.train --config=... --workdir={workdir}")
  config = experiment.config_from_dict(saved)
  tokenizer = tokenizers.load_tokenizer(experiment.tokenizer_dir(workdir))
  if tokenizer is None:
    raise UserError(f"workdir {workdir!r} holds a checkpoint but no tokenizer file")
  if saved.get("vocab_size") not in (None, tokenizer.vocab_size):
    raise UserError(f"workdir {workdir!r}: the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint"
                    f" was trained with {saved['vocab_size']}")
  return config, tokenizer, Transformer(experiment.model_config(config, tokenizer.vocab_size))


def restore_params(workdir: str, abstract_params, use_ema: bool = True):
  """(step, parameters) of the newest checkpoint whose parameters restore (damaged newer ones are skipped
  with a warning, see checkpointing.restore_newest), into `abstract_params`' shardings and dtypes."""
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    step, params, _ = checkpointing.restore_newest(
        manager, lambda s: checkpointing.restore_params(manager, s, abstract_params, use_ema), workdir)
  finally:
    manager.close()
  return step, params


def load_trained(workdir: str, use_ema: bool = True, mesh_config=None, dtype: str | None = None) -> Trained:
  """Loads config, tokenizer and the (EMA) parameters of the latest checkpoint in `workdir` onto the mesh
  of `mesh_config` (default: the workdir's), in `dtype` (None: float32, as trained)."""
  check_dtype(dtype)
  config, tokenizer, model = open_workdir(workdir)
  mesh = sharding.make_mesh(mesh_config or config.mesh)
  if lora.from_config(config).rank:
    return _load_lora(workdir, config, tokenizer, model, mesh, use_ema, dtype)
  abstract, shardings = param_shardings(model, mesh, config.data.seq_len, dtype)
  step, params = restore_params(workdir, abstract, use_ema)
  return Trained(config, tokenizer, model, experiment.schedule_from_config(config), mesh, params, shardings, step)


def _load_lora(workdir: str, config, tokenizer, model, mesh, use_ema: bool, dtype) -> Trained:
  """A LoRA workdir (training.lora.rank > 0) opens as the network it fine-tuned: the base's tree with the
  (EMA) adapters merged into the kernels, the model and config those without adapters (rank 0), so that
  sample, evaluate, chat and export need nothing of LoRA. Its state (frozen base, adapters and their small
  optimizer state) is restored whole."""
  tx, _ = experiment.make_optimizer(config)
  adapters = lora.from_config(config)
  abstract, shardings = experiment.state_shardings(model, tx, mesh, config.data.seq_len, adapters.base_dtype)
  step, state, _, _ = checkpointing.restore_latest(workdir, abstract)
  target = PARAM_DTYPES[dtype] if dtype else jnp.float32
  merge = jax.jit(lambda s: lora.merge(experiment.model_params(s, use_ema), adapters.scale, dtype=target),
                  out_shardings=shardings.base)
  with jax.set_mesh(mesh):
    params = merge(state)
  model = _without_adapters(config, tokenizer)
  return Trained(config, tokenizer, model, experiment.schedule_from_config(config), mesh, params, shardings.base,
                 step)


def _without_adapters(config, tokenizer) -> Transformer:
  """The network a LoRA workdir fine-tuned (config.training.lora.rank set to 0 in place): what its merged
  parameters apply to."""
  config.training.lora.rank = 0
  return Transformer(experiment.model_config(config, tokenizer.vocab_size))


class StoredParams(Mapping):
  """A workdir's (EMA) parameters by top-level name (embed, block_0, ...), each part read from the newest
  checkpoint onto the host (numpy, float32) when asked for; only the last part asked for is kept, so a
  reader that goes part by part (export) never holds the whole tree.

  A LoRA workdir reads as the network it fine-tuned (config, model and tree without adapters): each part
  is its frozen base part with that part's (EMA) adapters merged into the kernels (lora.merge), so an
  exported LoRA fine-tune of a large model needs no more host memory than any other export."""

  def __init__(self, workdir: str, use_ema: bool = True):
    self.config, self.tokenizer, self.model = open_workdir(workdir)
    self._adapters = lora.from_config(self.config)
    self._abstract = nn.unbox(abstract_params(self.model, self.config.data.seq_len))
    self._adapter_abstract = {}
    if self._adapters.rank:
      self._abstract, self._adapter_abstract = lora.split(self._abstract)
      self.model = _without_adapters(self.config, self.tokenizer)
    self._use_ema = use_ema
    self._manager = checkpointing.make_manager(workdir, read_only=True)
    first = next(iter(self._abstract))
    self.step, part, _ = checkpointing.restore_newest(
        self._manager, lambda s: self._restore(s, first, check_config=True), workdir)
    self._last = (first, part)

  def _restore(self, step: int, name: str, check_config: bool = False):
    """One part; `check_config` reads the step's config too (the first part read, so a damaged step is
    passed over by restore_newest), not again for every part after it."""
    if not self._adapters.rank:
      return checkpointing.restore_params(self._manager, step, {name: self._abstract[name]}, self._use_ema,
                                          check_config=check_config)[name]
    base = checkpointing.restore_params(self._manager, step, {name: self._abstract[name]}, key="base",
                                        check_config=check_config)[name]
    if name not in self._adapter_abstract:
      return base
    adapters = checkpointing.restore_params(self._manager, step, {name: self._adapter_abstract[name]},
                                            self._use_ema, check_config=False)[name]
    return jax.device_get(lora.merge_part(base, adapters, self._adapters.scale))

  def __getitem__(self, name: str):
    if self._last[0] != name:
      self._last = None  # dropped before the next part is read
      self._last = (name, self._restore(self.step, name))
    return self._last[1]

  def __iter__(self):
    return iter(self._abstract)

  def __len__(self) -> int:
    return len(self._abstract)

  def close(self) -> None:
    self._last = None
    self._manager.close()
