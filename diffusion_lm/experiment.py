"""Builds what train, sample and evaluate share: tokenizer, data, model, optimizer, sharded state.

Everything is derived from one ml_collections config plus the workdir; the pure step functions
(`train_step`, `eval_step`) live here at module level and are bound with functools.partial.
"""

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion_lm import (autoregressive, chat, checkpointing, data, diffusion, lora, objectives, paths, sharding,
                          tokenizers)
from diffusion_lm.errors import UserError, check_seed
from diffusion_lm.model import RUNTIME_FIELDS, ModelConfig, Transformer
from diffusion_lm.schedules import Schedule


# ----------------------------------------------------------------------------- config checks


def adopt_init_model(config) -> None:
  """With config.model_from_init, config.model and config.tokenizer become init_from's (in place; the
  runtime fields asked for are kept)."""
  if not config.get("model_from_init", False):
    return
  source = config.get("init_from", "")
  if not source:
    raise UserError("model_from_init=True without init_from; allowed: --config.init_from=WORKDIR (a trained or "
                    "converted workdir, e.g. python -m diffusion_lm.convert --from_hf=FOLDER --workdir=WORKDIR)")
  path = paths.join(source, "config.json")
  if not paths.exists(path):
    raise UserError(f"init_from={source!r} holds no config.json; allowed: a trained or converted workdir")
  saved = json.loads(paths.read_bytes(path))
  runtime = {k: config.model[k] for k in RUNTIME_FIELDS if k in config.model}
  config.model = ml_collections.ConfigDict({**saved["model"], **runtime})
  config.tokenizer = ml_collections.ConfigDict(saved["tokenizer"])


def check_config(config) -> None:
  """Validates the fields that are easy to get wrong, each with a one-line error."""
  objective = objectives.get(config.objective)
  if config.model.get("block_size", 0) and objective.name != "block":
    raise UserError(f"model.block_size={config.model.block_size} with objective={objective.name!r}; allowed: 0 "
                    "(block_size is for objective='block')")
  objective.check(config)
  anneal = config.training.get("attention_anneal_steps", 0)
  if not isinstance(anneal, int) or anneal < 0 or (anneal and objective.name not in ("diffusion", "sft")):
    raise UserError(f"training.attention_anneal_steps={anneal!r} with objective={objective.name!r}; allowed: 0, or an "
                    "integer >= 1 with a masked diffusion objective (diffusion, sft)")
  if not isinstance(config.data.get("ignore_bos", False), bool):
    raise UserError(f"data.ignore_bos={config.data.ignore_bos!r}; allowed: True, False")
  if config.data.source == "jsonl" and objective.name != "sft":
    raise UserError(f"data.source='jsonl' with objective={objective.name!r}; allowed: objective='sft' (prompt/response "
                    "pairs)")
  t = config.training
  for name in ("batch_size", "num_steps", "log_every", "eval_every", "sample_every", "checkpoint_every",
               "keep_checkpoints"):
    value = t[name]
    if not isinstance(value, int) or value < (0 if name in ("eval_every", "sample_every") else 1):
      raise UserError(f"training.{name}={value!r}; allowed: an integer >= "
                      f"{0 if name in ('eval_every', 'sample_every') else 1}")
  seq_len = config.data.seq_len
  if not isinstance(seq_len, int) or seq_len < 1:
    raise UserError(f"data.seq_len={seq_len!r}; allowed: an integer >= 1")
  if seq_len > config.model.max_len:
    raise UserError(f"data.seq_len={seq_len} exceeds model.max_len={config.model.max_len}; allowed: "
                    f"seq_len <= {config.model.max_len}")
  if t.get("on_nonfinite", "stop") not in ("stop", "skip"):
    raise UserError(f"training.on_nonfinite={t.on_nonfinite!r}; allowed: stop, skip")
  o = config.optimizer
  if not o.learning_rate > 0:
    raise UserError(f"optimizer.learning_rate={o.learning_rate}; allowed: a number > 0")
  if not 0 <= o.ema_decay < 1:
    raise UserError(f"optimizer.ema_decay={o.ema_decay}; allowed: 0 <= value < 1")
  if o.decay not in ("cosine", "linear", "constant"):
    raise UserError(f"optimizer.decay={o.decay!r}; allowed: cosine, linear, constant")
  for name, value in (("seed", config.seed), ("sampling.seed", config.sampling.get("seed", 0)),
                      ("evaluation.seed", config.evaluation.get("seed", 0))):
    check_seed(value, name)
  # The model's settings now, before any data is prepared or tokenizer trained (the vocabulary is not known
  # yet: a placeholder size that any mask_token_id below it passes; the real one is checked when built).
  model_config(config, max(2, int(config.model.get("mask_token_id", -1)) + 1))
  lora.from_config(config)  # the LoRA settings, each with its one-line error


def ignores_bos(config) -> bool:
  """BD3-LM's ignore_bos (data.ignore_bos): on framed windows (data.frame_windows), whose position 0 is always
  the frame id, masked and block diffusion never mask position 0 in training and leave it out of the
  evaluation's per-token average. Workdirs from before the setting keep scoring it."""
  return bool(config.data.get("ignore_bos", False) and config.data.get("frame_windows", False)
              and config.objective in ("diffusion", "block"))


def schedule_from_config(config) -> Schedule:
  return Schedule(**config.diffusion)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_dir(workdir: str) -> str:
  return paths.resolve(workdir)


# Where text is prepared when the workdir is a bucket: array_record writes local files only (it reads
# gs:// too, so a data.cache_dir in a bucket prepared elsewhere works).
LOCAL_DATA_CACHE = os.path.join("~", ".cache", "diffusion_lm", "data")
# Tokens per device in one training microbatch on CPUs (training.microbatches = 0); 256 to 1024 measured alike.
CPU_MICROBATCH_TOKENS = 512


def data_dir(config, workdir: str) -> str:
  """Where text sources are prepared and tokenized: data.cache_dir, else WORKDIR/data for a local
  workdir, else a local cache folder (LOCAL_DATA_CACHE) for a bucket workdir."""
  if config.data.cache_dir:
    return paths.resolve(config.data.cache_dir)
  return paths.resolve(LOCAL_DATA_CACHE) if paths.is_uri(workdir) else paths.join(workdir, "data")


def load_or_train_tokenizer(config, workdir: str):
  """The workdir's tokenizer, or one trained on the train split.

  Process 0 trains and saves it; the others wait for it at a barrier and load it (on a folder that is
  not shared between hosts they find none, and train the same one themselves).
  """
  existing = None
  if jax.process_index() == 0:
    existing = tokenizers.load_tokenizer(tokenizer_dir(workdir))
    if existing is None:
      existing = _train_tokenizer(config, workdir)
  paths.sync("diffusion_lm:tokenizer")
  if existing is None:
    existing = tokenizers.load_tokenizer(tokenizer_dir(workdir))
  if existing is None:
    existing = _train_tokenizer(config, workdir)
  if not tokenizers.tokenizer_matches(existing, config.tokenizer):
    raise UserError(
        f"workdir {workdir!r} holds a {existing.kind} tokenizer with {existing.vocab_size} tokens, but the "
        f"config asks for tokenizer.kind={config.tokenizer.kind!r}"
        + (f" with vocab_size={config.tokenizer.vocab_size}" if config.tokenizer.kind == "sentencepiece" else "")
        + (f" from hf_path={config.tokenizer.hf_path!r} (another vocabulary or eos token)"
           if config.tokenizer.kind == "hf" and existing.kind == "hf" else "")
        + "; use a new --workdir or the workdir's own tokenizer settings")
  return existing


def _train_tokenizer(config, workdir: str):
  if config.get("init_from"):  # fine-tuning: the source workdir's vocabulary, ids and all
    tokenizer = tokenizers.load_tokenizer(tokenizer_dir(config.init_from))
    if tokenizer is None:
      raise UserError(f"init_from={config.init_from!r} holds no tokenizer; allowed: a trained or converted workdir")
  elif config.tokenizer.kind == "hf":  # a fixed vocabulary read from its file: no text needed
    tokenizer = tokenizers.train_tokenizer(config.tokenizer, [])
  elif config.data.source == "jsonl":  # prompt/response pairs: the vocabulary of their text
    pairs = data.read_prompt_response(config.data.path)
    tokenizer = tokenizers.train_tokenizer(config.tokenizer, (text for pair in pairs for text in pair))
  else:
    split = data.load_text_split(config.data, config.data.train_split, data_dir(config, workdir), coordinate=False)
    logging.info("training a %s tokenizer on %d train passages", config.tokenizer.kind, len(split))
    tokenizer = tokenizers.train_tokenizer(config.tokenizer, split.texts())
  tokenizers.save_tokenizer(tokenizer, tokenizer_dir(workdir))
  if config.get("init_from"):
    # An instruct model's chat template goes with its vocabulary: the tuned model chats, and chat-message
    # SFT data is rendered by it.
    chat.save_template(tokenizer_dir(workdir), chat.load_template(tokenizer_dir(config.init_from)))
  return tokenizer


def frame_ids(config, tokenizer) -> tuple[int, int]:
  """(opening, closing) ids of a framed window (data.frame_windows): end-of-document twice, or with
  data.frame_open = "bos" the tokenizer's [CLS] / <s> first (BERT-style encoders)."""
  opening = config.data.get("frame_open", "")
  if opening not in ("", "bos"):
    raise UserError(f"data.frame_open={opening!r}; allowed: '' (end-of-document) or 'bos' ([CLS] / <s>)")
  if opening and getattr(tokenizer, "bos_id", None) is None:
    raise UserError("data.frame_open='bos' with a tokenizer that has none of [CLS], <s>, <bos>; allowed: '' or "
                    "an hf tokenizer with one of them")
  return (tokenizer.bos_id if opening else tokenizer.eos_id, tokenizer.eos_id)


def chat_renderer(workdir: str, tokenizer):
  """render(messages, add_generation_prompt) by the workdir's chat template; None when it has none."""
  template = chat.load_template(tokenizer_dir(workdir))
  if not template:
    return None
  return lambda messages, add_generation_prompt: chat.render(template, messages, tokenizer, add_generation_prompt)


def load_windows(config, workdir: str, tokenizer, split: str):
  """(Windows with per-token character counts, TokenizedSplit) of a split, tokenized once and cached.

  Prompt/response pairs (data.source='jsonl'): (PromptResponseRows, None), one row per pair."""
  if config.data.source == "jsonl":
    return data.prompt_response_rows(config.data, split, tokenizer, data.token_char_counts(tokenizer),
                                     render=chat_renderer(workdir, tokenizer)), None
  text_split = data.load_text_split(config.data, split, data_dir(config, workdir))
  tokenized = data.tokenize_split(text_split, tokenizer, paths.join(data_dir(config, workdir), "tokens"),
                                  processes=config.data.get("tokenize_processes", 0))
  windows = data.Windows(tokenized.tokens, config.data.seq_len, split, data.token_char_counts(tokenizer),
                         frame_id=frame_ids(config, tokenizer) if config.data.get("frame_windows", False) else None)
  return windows, tokenized


# ----------------------------------------------------------------------------- model and state


def model_config(config, vocab_size: int) -> ModelConfig:
  """The network's shape; the objective sets its attention structure (the autoregressive baseline is the
  same network with causal attention, block diffusion with block-causal attention)."""
  adapters = lora.from_config(config)
  fields = {"lora_rank": adapters.rank, "lora_alpha": float(adapters.alpha),
            "lora_targets": adapters.target_names} if adapters.rank else {}
  return ModelConfig(vocab_size=vocab_size, **{**config.model, **objectives.get(config.objective).model_fields(config)},
                     **fields)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


@flax.struct.dataclass
class LoraTrainState(TrainState):
  """LoRA fine-tuning (training.lora.rank > 0): params, ema_params and opt_state hold the adapters only (float32);
  base holds the frozen network once (training.lora.base_dtype), never updated. model_params gives the tree
  the network applies."""

  base: Any


def model_params(state: TrainState, ema: bool = True):
  """The parameter tree the network applies: the (EMA) params, with a LoRA state's frozen base put back."""
  params = state.ema_params if ema else state.params
  return lora.combine(state.base, params) if isinstance(state, LoraTrainState) else params


def model_param_shardings(shardings: TrainState):
  """Shardings of model_params(state) from those of the state."""
  return model_params(shardings, ema=False)


def make_optimizer(config) -> optax.GradientTransformation:
  o, num_steps = config.optimizer, config.training.num_steps
  warmup = min(o.warmup_steps, num_steps)
  decay_steps = max(1, num_steps - warmup)
  end = o.learning_rate * o.min_lr_ratio
  if o.decay == "cosine":
    decay = optax.cosine_decay_schedule(o.learning_rate, decay_steps, alpha=o.min_lr_ratio)
  elif o.decay == "linear":
    decay = optax.linear_schedule(o.learning_rate, end, decay_steps)
  else:
    decay = optax.constant_schedule(o.learning_rate)
  lr = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), decay], [warmup])
  # No weight decay on norms' scales and biases (rank-1 params).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask),
  ), lr


def _boxed_state(model, tx, key, seq_len, base_dtype=jnp.float32):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(key, tokens, jnp.zeros((1,), jnp.float32))["params"]
  if model.config.lora_rank:  # only the adapters train: an optimizer state and an EMA of those alone
    base, adapters = lora.split(params)
    return LoraTrainState(step=jnp.zeros((), jnp.int32), params=adapters, ema_params=adapters,
                          opt_state=tx.init(adapters), base=lora.cast(base, base_dtype))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params))


def state_shardings(model, tx, mesh, seq_len, base_dtype: str = "float32"):
  """(abstract unboxed state with shardings, NamedSharding tree) for the train state; base_dtype: a LoRA
  state's frozen base (training.lora.base_dtype)."""
  abstract_boxed = jax.eval_shape(functools.partial(_boxed_state, model, tx, seq_len=seq_len,
                                                    base_dtype=lora.BASE_DTYPES[base_dtype]), jax.random.key(0))
  shardings = sharding.logical_shardings(abstract_boxed, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(abstract_boxed), shardings)
  return abstract, shardings


def init_state(model, tx, mesh, key, seq_len, shardings, base_dtype: str = "float32"):
  dtype = lora.BASE_DTYPES[base_dtype]
  init = jax.jit(lambda k: nn.unbox(_boxed_state(model, tx, k, seq_len, dtype)), out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return init(key)


def initialize_from(state: TrainState, source_workdir: str, mesh, shardings) -> TrainState:
  """The state with params and EMA params replaced by `source_workdir`'s EMA parameters (fine-tuning a
  trained or converted model; config.init_from), read straight into this mesh's shardings. The parameter
  trees must agree in names and shapes. A LoRA state takes them as its frozen base (in its base dtype); its
  adapters stay as initialised."""
  from diffusion_lm import loading  # pylint: disable=g-import-not-at-top
  is_lora = isinstance(state, LoraTrainState)
  target, target_shardings = (state.base, shardings.base) if is_lora else (state.params, shardings.params)
  source_config, _, source_model = loading.open_workdir(source_workdir)
  lora_source = bool(lora.from_config(source_config).rank)
  if lora_source:  # a LoRA-tuned source: its merged network
    source = loading.load_trained(source_workdir, mesh_config=None).params
  else:
    source, _ = loading.param_shardings(source_model, mesh, source_config.data.seq_len)
  want = jax.tree_util.tree_structure(target)
  if jax.tree_util.tree_structure(source) != want or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(target))):
    raise UserError(f"init_from={source_workdir!r} holds a model of another shape than config.model describes; "
                    "allowed: the source's own model settings (e.g. --config=configs/sft.py:SOURCE)")
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, target_shardings)
  if not lora_source:
    _, params = loading.restore_params(source_workdir, abstract, use_ema=True)
  else:
    cast = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, abstract), out_shardings=target_shardings)
    params = cast(source)
  if is_lora:
    return state.replace(base=params)
  # Separate buffers: the train step donates the state, and one buffer donated twice is invalid.
  return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


def state_from_params(params, tx, mesh, shardings) -> TrainState:
  """A step-0 train state around restored parameters (a converted workdir's checkpoint holds only those):
  the EMA a copy of them, a fresh optimizer state built on the devices in its shardings."""
  init_opt = jax.jit(tx.init, out_shardings=shardings.opt_state)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=init_opt(params))


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- steps


def sequence_loss(params, tokens_BxL, key, *, model, schedule, mask_id, objective="diffusion", bos_id=0, **extra):
  """Per-sequence loss in nats (a negative ELBO estimate, or the exact NLL for ar) and the mask count.
  extra: visible_future (attention-mask annealing, masked diffusion only; see train_step)."""
  return objectives.get(objective).loss(model, params, tokens_BxL, key, schedule=schedule, mask_id=mask_id,
                                        bos_id=bos_id, **extra)


def train_step(state: TrainState, tokens_BxL, key, *, model, tx, schedule, mask_id, ema_decay,
               objective="diffusion", bos_id=0, anneal_steps=0, microbatches=1, ignore_bos=False, clip=None,
               resample=False):
  """One optimizer step; a non-finite loss or gradient leaves the state unchanged.

  Metrics (float32 scalars): loss (nats per token), bits_per_token, grad_norm, param_norm, mask_rate,
  finite. Per-token figures count the objective's scored positions (sft: each row's loss over its
  response length, averaged over the batch, as LLaDA's SFT; the mask rate over response positions). The norms cost no pass of their own: XLA computes them in the passes that read the gradients
  and parameters for the update (param_norm under a cond, only on logging steps, added one: +1.4% HBM
  bytes per step of a 2-layer text8 model on TPU v5e 2x2, by the ahead-of-time count).
  """
  step_key = jax.random.fold_in(key, state.step)
  seq_len = tokens_BxL.shape[1]
  # Attention-mask annealing (AR -> diffusion adaptation, training.attention_anneal_steps): the share of
  # future positions each position may see grows linearly from causal to fully bidirectional.
  extra = {"visible_future": visible_future_share(state.step, anneal_steps)} if anneal_steps else {}
  if ignore_bos:  # position 0 (the frame id) never masked (see ignores_bos)
    extra["ignore_bos"] = True
  if clip is not None:  # block diffusion's clipped schedule (lo, hi) (diffusion_lm/clip_search.py)
    extra.update(clip=clip, resample=resample)

  obj = objectives.get(objective)
  # LoRA: the loss is a function of the adapters (state.params) alone; the frozen base is a constant of it.
  full = (lambda p: lora.combine(state.base, p)) if isinstance(state, LoraTrainState) else (lambda p: p)
  scored_B = obj.scored_positions(tokens_BxL)  # None: every position (sft: the response positions)
  rows = None
  if microbatches > 1:
    rows = obj.noise(model, tokens_BxL, step_key, schedule=schedule, mask_id=mask_id, bos_id=bos_id, **extra)
  if rows is None:
    def loss_fn(params):
      loss_B, masked_B = sequence_loss(full(params), tokens_BxL, step_key, model=model, schedule=schedule,
                                       mask_id=mask_id, objective=objective, bos_id=bos_id, **extra)
      return per_token_loss(loss_B, scored_B, seq_len, tokens_BxL.shape[0]), masked_B

    (loss, masked_B), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  else:
    loss, masked_B, grads = _microbatched(obj, model, state.params, rows, microbatches, bos_id=bos_id, full=full)
  new_state, grad_norm, finite = guarded_update(state, grads, loss, tx=tx, ema_decay=ema_decay)
  metrics = {
      "loss": loss,  # nats per (scored) token (diffusion: negative ELBO estimate; ar: exact)
      "bits_per_token": diffusion.nats_to_bits(loss),
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(state.params),
      "mask_rate": jnp.mean(masked_B) / seq_len if scored_B is None else jnp.sum(masked_B) / jnp.sum(scored_B),
      "finite": finite.astype(jnp.float32),
  }
  return new_state, metrics


def visible_future_share(step, anneal_steps: int):
  """The share of later positions each position sees at optimizer step `step` (0-based) of attention-mask
  annealing: (step + 1) / anneal_steps, growing from near-causal to 1 (bidirectional) at the last
  annealing step and after."""
  return jnp.minimum((step + 1) / anneal_steps, 1.0)


def per_token_loss(loss_B, scored_B, seq_len: int, batch: int):
  """The batch's training loss in nats per token from per-row losses: their sum over batch x seq_len, or,
  with scored positions per row (sft), each row's loss over its own count, averaged over the batch
  (LLaDA's SFT normalisation: a long prompt does not down-weight its row). loss_B may be a microbatch's
  rows of a batch of `batch` rows; the microbatches' values then add up to the batch's."""
  if scored_B is None:
    return jnp.mean(loss_B) / seq_len if loss_B.shape[0] == batch else jnp.sum(loss_B) / (batch * seq_len)
  return jnp.sum(loss_B / jnp.maximum(scored_B, 1.0)) / batch


def _microbatched(obj, model, params, rows: dict, microbatches: int, *, bos_id, full=lambda p: p):
  """(loss per token, num_masked_B, gradient) of the whole batch, computed microbatch by microbatch.

  The batch's random draws (rows) are made once for all rows, so the loss is the one-piece loss up to
  float summation order. Microbatch m holds rows m, m + n, m + 2n, ... (n microbatches): every device
  keeps an equal share of each one under data parallelism. Each microbatch's forward and backward
  pass run back to back, its activations small enough to stay in a CPU's caches. full(params): the tree the
  network applies (LoRA: the adapters `params` with the frozen base).
  """
  batch, seq_len = rows["tokens"].shape[:2]
  n = microbatches
  # Fused kernels: 5-10% faster microbatched steps on a 2-core CPU (md4_char, 16 x 512 tokens).
  model = model.clone(config=dataclasses.replace(model.config, fuse_kernels=True))
  chunks = jax.tree.map(lambda a: objectives.base.split_rows(a, n), rows)

  def body(carry, chunk):
    def loss_fn(p):
      loss_b, masked_b = obj.row_losses(model, full(p), chunk, bos_id=bos_id)
      return per_token_loss(loss_b, chunk.get("scored"), seq_len, batch), masked_b

    (loss, masked_b), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    total, summed = carry
    return (total + loss, jax.tree.map(jnp.add, summed, grads)), masked_b

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads), masked = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), chunks)
  return loss, objectives.base.merge_rows(masked), grads


def microbatch_count(config, mesh) -> int:
  """training.microbatches, or for 0 (auto): on CPUs enough microbatches of about CPU_MICROBATCH_TOKENS
  tokens per device (a microbatch's activations fit the caches; measured 1.5x faster steps on a 2-core
  CPU), elsewhere 1 (accelerators are faster on the whole batch; set it to fit memory)."""
  requested = int(config.training.get("microbatches", 0))
  batch, seq_len = config.training.batch_size, config.data.seq_len
  local = batch // max(sharding.data_parallel_size(mesh), 1)
  if requested:
    if requested < 1 or local % requested:
      raise UserError(f"training.microbatches={requested} with {local} sequences per data-parallel device (batch "
                      f"{batch}); allowed: 0 (auto) or a divisor of {local}")
    return requested
  if mesh.devices.flat[0].platform != "cpu" or local * seq_len * config.model.d_model < objectives.base.CPU_CACHE_SPILL:
    return 1  # a small step's activations fit the caches already: one piece
  return objectives.base.piece_count(local, seq_len, CPU_MICROBATCH_TOKENS)


def guarded_update(state: TrainState, grads, loss, *, tx, ema_decay):
  """(new state, grad norm, finite): the optimizer and EMA update of `grads`, skipped when not finite.

  Shared by train_step and the distillation step (diffusion_lm/distillation.py).
  """
  grad_norm = optax.tree.norm(grads)  # the same sums as the clipping's norm: XLA computes them once
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A non-finite step keeps the old parameters and optimizer state (the step counter still advances:
  # it counts batches consumed, which the data order and the random keys follow). One select per new
  # value, where it is computed, and the EMA follows the guarded parameters: 0.8% fewer HBM bytes per
  # TPU step than guarding finished trees.
  keep = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(lambda p, u: keep(p + u, p), state.params, updates)
  ema = jax.tree.map(lambda e, p: keep(ema_decay * e + (1.0 - ema_decay) * p, e), state.ema_params, params)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=jax.tree.map(keep, opt_state, state.opt_state))
  return new_state, grad_norm, finite


def clip_searched(config) -> bool:
  """Block diffusion with BD3-LM's clipped schedules (block.clip_search; workdirs from before it: off)."""
  return config.objective == "block" and bool(config.get("block", {}).get("clip_search", False))


def jit_train_step(config, model, tx, mesh, shardings, mask_id: int, bos_id: int, clip=None):
  """train_step jitted over the mesh: state sharded (and donated), batch over data x fsdp. clip: the block
  objective's clipped range (lo, hi) when block.clip_search is on (a new range compiles a new step)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule_from_config(config), mask_id=mask_id,
                        ema_decay=config.optimizer.ema_decay, objective=config.objective, bos_id=bos_id,
                        anneal_steps=int(config.training.get("attention_anneal_steps", 0)),
                        microbatches=microbatch_count(config, mesh), ignore_bos=ignores_bos(config),
                        clip=tuple(clip) if clip is not None and clip_searched(config) else None,
                        resample=bool(config.get("block", {}).get("resample", False))),
      in_shardings=(shardings, sharding.batch_sharding(mesh), replicated),
      out_shardings=(shardings, replicated), donate_argnums=0)


def eval_step(params, tokens_BxL, valid_B, key, *, model, schedule, mask_id, num_t_samples,
              objective="diffusion", bos_id=0, discrete_steps=0, ignore_bos=False):
  """Summed bounds (nats) over the valid rows, and their token count.

  Returns {"nats": the objective's bound (ar: exact NLL), "nats_discrete": the T-step bound (masked
  diffusion, when discrete_steps > 0), "tokens": the count of scored tokens (sft: response positions)}.
  """
  valid = valid_B.astype(jnp.float32)
  per_row = objectives.get(objective).eval_nats(model, params, tokens_BxL, key, schedule=schedule, mask_id=mask_id,
                                                bos_id=bos_id, num_t_samples=num_t_samples,
                                                discrete_steps=discrete_steps,
                                                **({"ignore_bos": True} if ignore_bos else {}))
  scored_B = per_row.pop("scored", None)  # sft: the response positions; ignore_bos: all but position 0
  tokens = jnp.sum(valid) * tokens_BxL.shape[1] if scored_B is None else jnp.sum(valid * scored_B)
  return {**{name: jnp.sum(nats_B * valid) for name, nats_B in per_row.items()}, "tokens": tokens}


class Evaluator:
  """ELBO on a split: nats and bits per token, perplexity bound, bits per character.

  With `evaluation.max_batches` = N > 0 and a split of more than N * batch_size windows, the score is
  over a seeded stratified subset of N * batch_size windows spread over the whole split (see
  `data.eval_window_ids`), the same at every call, so numbers from different steps compare.
  """

  def __init__(self, model, schedule, mask_id, mesh, param_shardings, eval_config, objective="diffusion",
               bos_id=0, ignore_bos=False):
    self.objective = objective
    self.discrete_steps = int(eval_config.get("discrete_steps", 0)) if objective == "diffusion" else 0
    if eval_config.batch_size % sharding.data_parallel_size(mesh):
      raise UserError(f"evaluation.batch_size={eval_config.batch_size} is not divisible by the data-parallel"
                      f" size {sharding.data_parallel_size(mesh)}")
    if eval_config.num_t_samples < 1:
      raise UserError(f"evaluation.num_t_samples={eval_config.num_t_samples}; allowed: an integer >= 1")
    _check_max_batches(eval_config.max_batches)
    if not isinstance(eval_config.seed, int) or eval_config.seed < 0:
      raise UserError(f"evaluation.seed={eval_config.seed!r}; allowed: an integer >= 0")
    self.mesh, self.config = mesh, eval_config
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._step = jax.jit(
        functools.partial(eval_step, model=model, schedule=schedule, mask_id=mask_id,
                          num_t_samples=eval_config.num_t_samples, objective=objective, bos_id=bos_id,
                          discrete_steps=self.discrete_steps, ignore_bos=ignore_bos),
        in_shardings=(param_shardings, sharding.batch_sharding(mesh), sharding.batch_sharding(mesh), replicated),
        out_shardings=replicated)

  def __call__(self, params, windows: data.Windows, max_batches: int | None = None) -> dict:
    """Scores `windows` (built with token_chars); returns per-token and per-character figures.

    Keys: nll_per_token (nats), bits_per_token, perplexity (bound), bits_per_char (total bits over the
    total characters of the scored windows), capped, windows_scored, windows_in_split, tokens_scored,
    chars_scored; with discrete_steps, the same figures of the T-step bound suffixed _discrete.
    """
    cfg = self.config
    key = jax.random.key(cfg.seed)
    max_batches = cfg.max_batches if max_batches is None else max_batches
    _check_max_batches(max_batches)
    if windows.token_chars is None:
      raise ValueError("Evaluator needs windows built with token_chars (experiment.load_windows builds them)")
    totals = {}
    chars = windows_scored = 0
    per_process = cfg.batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      for i, batch in enumerate(data.eval_batches(windows, cfg.batch_size, max_batches, cfg.seed)):
        tokens = sharding.global_batch_from_local(batch.tokens[lo:lo + per_process], self.mesh)
        valid = sharding.global_batch_from_local(batch.valid[lo:lo + per_process], self.mesh)
        for name, value in jax.device_get(self._step(params, tokens, valid, jax.random.fold_in(key, i))).items():
          totals[name] = totals.get(name, 0.0) + float(value)
        # Every process knows the whole global batch, so these host-side sums need no collective.
        chars += int(batch.chars.sum())
        windows_scored += int(batch.valid.sum())
    result = _per_token(totals["nats"], totals["tokens"], chars)
    result.update({"capped": windows_scored < len(windows), "windows_scored": windows_scored,
                   "windows_in_split": len(windows), "tokens_scored": int(totals["tokens"]), "chars_scored": chars})
    if self.discrete_steps:
      discrete = _per_token(totals["nats_discrete"], totals["tokens"], chars)
      result.update({f"{k}_discrete": v for k, v in discrete.items()})
      result["discrete_steps"] = self.discrete_steps
    return result


def _check_max_batches(max_batches) -> None:
  if not isinstance(max_batches, int) or max_batches < 0:
    raise UserError(f"evaluation.max_batches={max_batches!r}; allowed: an integer >= 0 (0: the whole split)")


def _per_token(nats: float, tokens: float, chars: int) -> dict:
  """Figures from summed nats over `tokens` tokens that encode `chars` characters of text."""
  nll = nats / tokens
  bits = nll / math.log(2.0)
  return {"nll_per_token": nll, "bits_per_token": bits, "perplexity": math.exp(nll),
          "bits_per_char": nats / math.log(2.0) / chars}


def config_to_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def config_from_dict(payload: dict):
  payload = {"objective": "diffusion", **payload}  # checkpoints from before the AR baseline
  payload.pop("vocab_size", None)
  return ml_collections.ConfigDict(payload)


def describe_mismatch(saved: dict, config, vocab_size: int) -> str | None:
  """Names the first model/vocabulary difference between a saved config and the current one."""
  current = config_to_dict(config)
  if saved.get("objective", "diffusion") != current["objective"]:
    return f"objective={saved.get('objective', 'diffusion')!r} in the checkpoint, {current['objective']!r} requested"
  for key in sorted(set(saved.get("model", {})) | set(current["model"])):
    if key in RUNTIME_FIELDS:  # how the network computes, not what: any value loads the checkpoint
      continue
    a, b = saved.get("model", {}).get(key), current["model"].get(key)
    if a != b:
      return f"model.{key}={a!r} in the checkpoint, {b!r} requested"
  for key in sorted(set(saved.get("tokenizer", {})) | set(current["tokenizer"])):
    a, b = saved.get("tokenizer", {}).get(key), current["tokenizer"].get(key)
    if a != b:
      return f"tokenizer.{key}={a!r} in the checkpoint, {b!r} requested"
  saved_lora = lora.LoraConfig(**saved.get("training", {}).get("lora", {}))
  if saved_lora != lora.from_config(config) and (saved_lora.rank or lora.from_config(config).rank):
    return f"training.lora={dataclasses.asdict(saved_lora)} in the checkpoint, " \
           f"{dataclasses.asdict(lora.from_config(config))} requested"
  if saved.get("vocab_size") not in (None, vocab_size):
    return f"vocabulary of {saved['vocab_size']} tokens in the checkpoint, {vocab_size} in the workdir's tokenizer"
  return None


def __getattr__(name: str):
  """Trained and load_trained live in loading.py (imported on first use: loading imports this module)."""
  if name in ("Trained", "load_trained"):
    from diffusion_lm import loading  # pylint: disable=g-import-not-at-top
    return getattr(loading, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ar_scorer(trained: "Trained"):
  """Returns score(tokens int32[N, L]) -> mean NLL per token (nats) under an AR checkpoint (a judge)."""
  if not trained.model.config.causal:
    raise UserError("the judge holds a diffusion model; allowed: an autoregressive checkpoint "
                    "(trained with objective='ar', e.g. configs/demo_ar.py)")
  mesh, batch = trained.mesh, sharding.batch_sharding(trained.mesh)
  bos = trained.tokenizer.eos_id

  @functools.partial(jax.jit, in_shardings=(trained.param_shardings, batch, batch))
  def nll_sum(params, tokens_BxL, valid_B):
    nll_B = autoregressive.next_token_nll(lambda x: trained.model.apply({"params": params}, x), tokens_BxL, bos)
    return jnp.sum(nll_B * valid_B)

  def score(tokens_NxL: np.ndarray) -> float:
    n = tokens_NxL.shape[0]
    tokens = sharding.pad_rows(np.asarray(tokens_NxL, np.int32), mesh)
    valid = (np.arange(tokens.shape[0]) < n).astype(np.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      total = float(nll_sum(trained.params, sharding.put_global(tokens, mesh), sharding.put_global(valid, mesh)))
    return total / (n * tokens_NxL.shape[1])

  return score


def _entropy_bits(flat_tokens: np.ndarray) -> float:
  if flat_tokens.size == 0:
    return 0.0
  counts = np.bincount(flat_tokens).astype(np.float64)
  p = counts[counts > 0] / flat_tokens.size
  return float(-(p * np.log2(p)).sum())


def unigram_entropy_bits(tokens_NxL: np.ndarray, ignore=()) -> float:
  """Sample entropy as MDLM and ReMDM report it: the entropy (bits) of each sequence's own token
  histogram, averaged over the N sequences. Low for degenerate, repetitive samples; unlike the
  pooled figure it does not grow with N, so it compares across batch sizes and with their tables.
  Ids in `ignore` are dropped first (a sequence left empty counts as 0 bits)."""
  rows = np.asarray(tokens_NxL)
  if rows.ndim != 2 or rows.shape[0] == 0:
    raise UserError(f"sample tokens of shape {rows.shape}; allowed: [num_sequences >= 1, length]")
  return float(np.mean([_entropy_bits(row[~np.isin(row, list(ignore))] if ignore else row) for row in rows]))


def pooled_unigram_entropy_bits(tokens: np.ndarray, ignore=()) -> float:
  """Entropy (bits) of the token histogram of all sequences together (at most log2 of the vocabulary)."""
  flat = np.asarray(tokens).ravel()
  return _entropy_bits(flat[~np.isin(flat, list(ignore))] if ignore else flat)
