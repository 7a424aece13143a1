"""Ahead-of-time compilation for a TPU slice, on any machine: does the config fit, how fast is it?

  pip install -r requirements-tpu.txt     # brings libtpu (the TPU compiler) from PyPI
  python -m diffusion_lm.aot --config=configs/text8.py --topology=v5e:4x4
  python -m diffusion_lm.aot --config=configs/llada_8b.py --topology=v5e:2x4 --only=sample \
      --param_dtype=bfloat16 --sample_batch=1,8 --decoders=confidence,llada,llada+prefix \
      --config.mesh.fsdp=1 --config.mesh.tensor=8

Compiles the train step and the sampler for the named topology without a TPU, then prints per-chip
memory against the chip's HBM, XLA's flop count and estimated step time, and from them the estimated
tokens/s per chip and model-FLOPs utilisation. Exit code 1 when something does not fit.

--only=sample compiles no train step (a model whose train state cannot fit may still sample): one sampler per
(decoder, batch) with parameters in --param_dtype, each with its per-chip memory, and the roofline time of one
denoiser call, max(FLOPs / peak, HBM bytes / HBM bandwidth) of XLA's cost analysis of that forward, from which
come tokens/s for AR-equivalent decoding (one token per call) and for parallel decoding (gen_length /
sampling.steps tokens per call). See sample_check for the lengths and what each decoder is.
"""

import dataclasses
import json
import math
import os
import sys
import types

from absl import app, flags
from ml_collections import config_flags

from diffusion_lm.errors import UserError, cli_main, parse_flags

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's published figures per chip (= one JAX device), dense: no structured sparsity."""

  name: str  # as printed, e.g. "TPU v5e"
  platform: str  # jax platform: "tpu" or "gpu"
  device_kinds: tuple[str, ...]  # spellings of jax Device.device_kind for this chip
  peak_bf16_flops: float  # dense bfloat16 matmul FLOP/s
  # Dense FLOP/s of float32 matmuls at JAX's default precision, which runs them as one bfloat16 pass
  # on a TPU's MXU and on TF32 tensor cores on an Ampere or newer GPU (JAX "Matmul precision" docs).
  peak_f32_default_flops: float
  f32_default_unit: str  # what float32 matmuls run on at that precision
  source: str  # where the figures are published
  hbm_bytes: float | None = None  # TPU rows only: the aot memory and roofline checks
  hbm_bandwidth: float | None = None  # bytes/s

  def peak_flops(self, dtype: str, precision=None) -> float | None:
    """Published dense peak for a config compute dtype, or None where none applies (then measure).

    precision: jax_default_matmul_precision; a float32 config has a published peak only at the default,
    since "highest" runs several bf16 passes (TPU) or CUDA cores (GPU) at a rate nobody publishes here.
    """
    if dtype == "bfloat16":
      return self.peak_bf16_flops
    if dtype == "float32" and str(precision or "default").lower() in ("default", "fastest"):
      return self.peak_f32_default_flops
    return None

  def peak_source(self, dtype: str) -> str:
    """Names the figure peak_flops(dtype) returns and where it is published."""
    if dtype == "bfloat16":
      return f"{self.name} published bfloat16 peak, {self.source}"
    return f"{self.name} published peak of {self.f32_default_unit}, which float32 matmuls use at JAX's default " \
           f"precision, {self.source}"


# Sources: Google Cloud TPU docs, "TPU v4" / "TPU v5e" / "TPU v5p" / "TPU v6e" system architecture pages
# (peak compute per chip, HBM capacity and bandwidth); NVIDIA A100, H100 and H200 Tensor Core GPU
# datasheets, whose tensor-core figures are quoted with sparsity: the dense peak is half of them.
CHIPS = {
    "v4": Chip("TPU v4", "tpu", ("TPU v4",), 275e12, 275e12, "one bfloat16 MXU pass",
               "Google Cloud TPU v4 docs", 32 * 2**30, 1.2e12),
    "v5e": Chip("TPU v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 197e12, 197e12, "one bfloat16 MXU pass",
                "Google Cloud TPU v5e docs", 16 * 2**30, 0.82e12),
    "v5p": Chip("TPU v5p", "tpu", ("TPU v5", "TPU v5p"), 459e12, 459e12, "one bfloat16 MXU pass",
                "Google Cloud TPU v5p docs", 95 * 2**30, 2.76e12),
    "v6e": Chip("TPU v6e", "tpu", ("TPU v6 lite", "TPU v6e"), 918e12, 918e12, "one bfloat16 MXU pass",
                "Google Cloud TPU v6e docs", 32 * 2**30, 1.64e12),
    "a100": Chip("NVIDIA A100", "gpu", ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB",
                                        "NVIDIA A100 80GB PCIe"), 312e12, 156e12, "TF32 tensor cores",
                 "NVIDIA A100 datasheet, dense"),
    "h100-sxm": Chip("NVIDIA H100 SXM", "gpu", ("NVIDIA H100 80GB HBM3",), 989.5e12,
                     494.5e12, "TF32 tensor cores", "NVIDIA H100 datasheet, dense"),
    "h100-pcie": Chip("NVIDIA H100 PCIe", "gpu", ("NVIDIA H100 PCIe",), 756.5e12, 378e12, "TF32 tensor cores",
                      "NVIDIA H100 datasheet, dense"),
    "h200": Chip("NVIDIA H200", "gpu", ("NVIDIA H200",), 989.5e12, 494.5e12, "TF32 tensor cores",
                 "NVIDIA H200 datasheet, dense"),
}
TPU_CHIPS = {name: chip for name, chip in CHIPS.items() if chip.platform == "tpu"}


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The table row of a JAX device kind (e.g. "TPU v5 lite", "NVIDIA H200"), None when it has none."""
  for chip in CHIPS.values():
    if device_kind in chip.device_kinds:
      return chip
  return None


def topology_devices(topology: str):
  """The devices of a named TPU topology (no TPU needed; libtpu compiles for it)."""
  chip, _, shape = topology.partition(":")
  if chip not in TPU_CHIPS or not shape:
    raise UserError(f"topology {topology!r}; allowed: CHIP:SHAPE with CHIP one of {', '.join(TPU_CHIPS)}, "
                    "e.g. v5e:4x4, v4:2x2x1, v5p:2x2x2, v6e:8x8")
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UserError("libtpu is not installed, so nothing can compile for TPU here; allowed: "
                    "pip install -r requirements-tpu.txt (jax[tpu]) and rerun") from None
  # Compiling needs no TPU, so several processes (tests, a second shell) may use libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return TPU_CHIPS[chip], topologies.get_topology_desc(topology, "tpu").devices
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"unknown topology {topology!r} ({first}); allowed e.g. v5e:2x2, v5e:4x4, v4:2x2x1, "
                    "v5p:2x2x2, v6e:4x4") from None


def _memory_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes + m.generated_code_size_in_bytes)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost) or {}


def estimated_seconds(cost: dict, chip: Chip) -> tuple[float, str]:
  """XLA's own time estimate when it gives one, else the roofline of its flop and byte counts."""
  optimal = float(cost.get("optimal_seconds", -1.0))
  if optimal > 0:
    return optimal, "xla"
  flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  return max(flops / chip.peak_bf16_flops, moved / chip.hbm_bandwidth), "roofline"


def roofline_seconds(flops: float, bytes_accessed: float, peak_flops: float, bandwidth: float) -> tuple[float, str]:
  """(seconds, what binds) of a program that does `flops` at `peak_flops` FLOP/s and moves `bytes_accessed`
  through HBM at `bandwidth` bytes/s, whichever takes longer: "compute" or "memory"."""
  compute, memory = flops / peak_flops, bytes_accessed / bandwidth
  return (compute, "compute") if compute >= memory else (memory, "memory")


def _compile(lowered, what: str, topology: str):
  """lowered.compile(); XLA running out of device memory becomes one line naming what does not fit."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    detail = next((line.strip() for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message)
    raise UserError(f"{what} does not fit on {topology}: {detail[:300]}; allowed: more chips, a larger fsdp axis, "
                    "bfloat16, remat or a smaller batch") from None


def check(config, topology: str, vocab_size: int | None = None, sample_batch: int = 0, log=print) -> dict:
  """Compiles train step and sampler for `topology`; returns the figures (also printed via log)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from diffusion_lm import experiment, objectives, sharding  # pylint: disable=g-import-not-at-top
  from diffusion_lm.generation import sampler_config  # pylint: disable=g-import-not-at-top
  from diffusion_lm.model import Transformer  # pylint: disable=g-import-not-at-top

  experiment.check_config(config)
  chip, devices = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  batch, seq_len = config.training.batch_size, config.data.seq_len
  dp = sharding.data_parallel_size(mesh)
  if batch % dp:
    raise UserError(f"training.batch_size={batch} is not divisible by the data-parallel size {dp} of "
                    f"{topology} with mesh {dict(mesh.shape)}; allowed: a multiple of {dp}")
  if vocab_size is None:
    vocab_size = config.tokenizer.vocab_size if config.tokenizer.kind in ("sentencepiece", "hf") else 256
  model = Transformer(experiment.model_config(config, vocab_size))
  tx, _ = experiment.make_optimizer(config)
  abstract_state, shardings = experiment.state_shardings(model, tx, mesh, seq_len,
                                                         experiment.lora.from_config(config).base_dtype)
  # The tree the network applies: the params, or with LoRA the frozen base with the adapters.
  applied, applied_shardings = experiment.model_params(abstract_state), experiment.model_param_shardings(shardings)
  replicated = NamedSharding(mesh, P())
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh))
  mask_id = vocab_size
  step = experiment.jit_train_step(config, model, tx, mesh, shardings, mask_id, bos_id=0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    train = _compile(step.lower(abstract_state, tokens, key), "the train step", topology)

    sample_batch = sample_batch or batch
    cfg = sampler_config(config.sampling)

    objective = objectives.of_model(model.config)

    def run(params, k, x, ids):  # the objective's own sampler: masked diffusion, block decoding or AR decoding
      return objective.generate(model, params, k, x, ids, cfg, schedule=experiment.schedule_from_config(config),
                                mask_id=mask_id, bos_id=0, eos_id=None).tokens

    sample_tokens = jax.ShapeDtypeStruct((sample_batch, seq_len), jnp.int32, sharding=sharding.batch_sharding(mesh))
    ids = jax.ShapeDtypeStruct((sample_batch,), jnp.int32, sharding=sharding.batch_sharding(mesh))
    forward = None
    sample = jax.jit(run, in_shardings=(applied_shardings, replicated, sharding.batch_sharding(mesh),
                                        sharding.batch_sharding(mesh)))
    sampler = _compile(sample.lower(applied, key, sample_tokens, ids), "the sampler", topology)
    if objective.name == "diffusion":
      # XLA's cost model counts a loop body once: the sampler's time is estimated as T forwards.
      t_B = jax.ShapeDtypeStruct((sample_batch,), jnp.float32, sharding=sharding.batch_sharding(mesh))
      forward = _compile(jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)).lower(
          applied, sample_tokens, t_B), "the denoiser forward", topology)

  cost = _cost(train)
  seconds, method = estimated_seconds(cost, chip)
  chips = len(devices)
  tokens_per_chip = batch * seq_len / chips / seconds if seconds > 0 else 0.0
  flops_per_token = model.config.flops_per_token(seq_len)
  dtype = model.config.dtype
  peak = chip.peak_flops(dtype, jax.config.jax_default_matmul_precision)
  peak_source = chip.peak_source(dtype)
  if peak is None:  # float32 at a raised matmul precision: nothing published, and it cannot beat bfloat16
    peak, peak_source = chip.peak_bf16_flops, chip.peak_source("bfloat16") + " (an upper bound for this precision)"
  result = {
      "config_model": f"{model.config.num_layers}x{model.config.d_model}", "topology": topology, "chips": chips,
      "mesh": dict(mesh.shape), "batch": batch, "seq_len": seq_len,
      "params": int(sum(x.size for x in jax.tree.leaves(applied))),
      "trained_params": int(sum(x.size for x in jax.tree.leaves(abstract_state.params))),
      "train_memory_gib_per_chip": _memory_bytes(train) / 2**30, "hbm_gib": chip.hbm_bytes / 2**30,
      "xla_flops_per_chip_step": float(cost.get("flops", 0.0)),
      "xla_bytes_per_chip_step": float(cost.get("bytes accessed", 0.0)), "xla_estimated_step_s": seconds,
      "estimate": method,
      "tokens_per_s_per_chip": tokens_per_chip,
      "peak_flops_per_chip": peak, "peak_source": peak_source,
      "mfu_estimate": tokens_per_chip * flops_per_token / peak if seconds else 0.0,
  }
  result.update({"objective": objective.name, "sampler": cfg.name, "sampler_steps": cfg.steps,
                 "sample_batch": sample_batch, "sampler_memory_gib_per_chip": _memory_bytes(sampler) / 2**30})
  if forward is not None:
    forward_s, _ = estimated_seconds(_cost(forward), chip)
    result.update({"forward_estimated_s": forward_s, "sampler_estimated_s": cfg.steps * forward_s,
                   "forward_xla_flops": float(_cost(forward).get("flops", 0.0)),
                   "forward_xla_bytes": float(_cost(forward).get("bytes accessed", 0.0))})
  result["fits"] = result["train_memory_gib_per_chip"] <= result["hbm_gib"] and \
      result.get("sampler_memory_gib_per_chip", 0.0) <= result["hbm_gib"]
  lora_note = ""
  if isinstance(abstract_state, experiment.LoraTrainState):
    adapters = experiment.lora.from_config(config)
    lora_note = (f" (LoRA rank {adapters.rank}: {result['trained_params'] / 1e6:.1f}M trained, the base frozen in "
                 f"{adapters.base_dtype})")
  log(f"{topology} ({chips} chips, mesh {result['mesh']}): {result['params'] / 1e6:.1f}M params{lora_note}, "
      f"batch {batch} x {seq_len}")
  log(f"  train step: {result['train_memory_gib_per_chip']:.2f} GiB per chip of {result['hbm_gib']:.0f} GiB HBM; "
      f"XLA: {result['xla_flops_per_chip_step'] / 1e12:.3f} TFLOP and "
      f"{result['xla_bytes_per_chip_step'] / 1e9:.2f} GB accessed per chip, est. ({method}) {seconds * 1e3:.1f} ms/step "
      f"-> {tokens_per_chip:,.0f} tokens/s per chip, MFU ~{result['mfu_estimate']:.0%} of {peak / 1e12:.1f} TFLOP/s "
      f"per chip ({peak_source})")
  microbatches = experiment.microbatch_count(config, mesh)
  if microbatches > 1:
    log(f"  (training.microbatches={microbatches}: XLA counts the loop body once, so the work and time above are one "
        "microbatch's; memory is the whole step's)")
  if forward is None:
    log(f"  sampler ({objective.name} decoding, {cfg.name}, batch {sample_batch}): "
        f"{result['sampler_memory_gib_per_chip']:.2f} GiB per chip")
  else:
    log(f"  sampler ({cfg.name}, T={cfg.steps}, batch {sample_batch}): "
        f"{result['sampler_memory_gib_per_chip']:.2f} GiB per chip, est. {result['sampler_estimated_s']:.3f} s "
        f"({cfg.steps} forwards of {result['forward_estimated_s'] * 1e3:.2f} ms: {result['forward_xla_flops'] / 1e12:.3f} "
        f"TFLOP, {result['forward_xla_bytes'] / 1e9:.2f} GB)")
  log(f"  fits: {'yes' if result['fits'] else 'NO'}")
  return result


# ----------------------------------------------------------------------------- sampling only

# --decoders: what each row compiles (all decode the gen_length tokens after the prompt, sampling.steps steps).
SAMPLE_DECODERS = {
    "confidence": "this project's confidence-ordered unmasking over the whole generation (sampler confidence)",
    "llada": "LLaDA's block decoding (sampler llada, sampling.block_length tokens a block)",
    "llada+prefix": "LLaDA's block decoding with Fast-dLLM's prefix cache (sampler fast_dllm, approx_cache prefix, "
                    "threshold 0: LLaDA's counts; a block's first call is a full forward that keeps the keys and "
                    "values, its later calls run on [block .. end])",
    "dream": "Dream's diffusion_generate (sampler dream: one block, its time grid)",
}
PARAM_DTYPES = ("float32", "bfloat16")


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g}"


def parse_batches(values) -> tuple[int, ...]:
  """Sampler batches from a comma-separated string or a list ("1,8" -> (1, 8)); one-line errors."""
  items = values.split(",") if isinstance(values, str) else list(values)
  try:
    batches = tuple(int(str(v).strip()) for v in items)
  except ValueError:
    batches = ()
  if not batches or any(b < 1 for b in batches):
    raise UserError(f"sample_batch={','.join(str(v) for v in items)!r}; allowed: integers >= 1, comma-separated, "
                    "e.g. 1,8")
  return batches


def _decoder_config(config, decoder: str, steps: int):
  """SamplerConfig of one --decoders entry at `steps` denoising steps."""
  from diffusion_lm.generation import sampler_config  # pylint: disable=g-import-not-at-top
  overrides = {"confidence": dict(name="confidence"), "llada": dict(name="llada", approx_cache="none"),
               "llada+prefix": dict(name="fast_dllm", approx_cache="prefix", threshold=0.0, factor=0.0),
               "dream": dict(name="dream", approx_cache="none")}[decoder]
  return sampler_config(config.sampling, steps=steps, guidance=0.0, **overrides)


def sample_check(config, topology: str, batches=(1, 8), decoders=None, param_dtype: str = "bfloat16",
                 prompt_length: int = 256, gen_length: int = 256, vocab_size: int | None = None,
                 log=print) -> dict:
  """Compiles only the samplers for `topology`, one per (decoder, batch); returns the figures (also printed).

  Rows decode gen_length tokens after a prompt_length-token prompt (the published decoders' generation
  starts at the prompt's end) in config.sampling.steps steps, block decoders in blocks of
  config.sampling.block_length. Defaults: LLaDA's paper setting of 256 generated tokens in blocks of 32 (its
  generate.py example uses 128), after a 256-token prompt. Per row: the sampler's memory per chip (XLA's
  memory analysis of the whole compiled sampler), the roofline time of one denoiser call (max of XLA's
  FLOPs / the chip's published peak and XLA's bytes accessed / HBM bandwidth, per chip, for one forward at
  the row's batch; XLA's cost model counts a loop body once, hence the separate forward), and tokens/s of the
  whole slice: AR-equivalent = gen_length steps (one token per call), parallel = sampling.steps steps
  (gen_length / steps tokens per call). Communication between chips is in neither figure. The cached
  decoder's calls differ: one full forward per block (keeping keys/values) and the rest on [block .. end],
  each compiled and costed. decoders: names of SAMPLE_DECODERS; None: dream for a shifted (Dream-layout)
  model, else confidence, llada and llada+prefix.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from diffusion_lm import experiment, sharding  # pylint: disable=g-import-not-at-top
  from diffusion_lm.generation import Generator  # pylint: disable=g-import-not-at-top
  from diffusion_lm.model import DTYPES, Transformer  # pylint: disable=g-import-not-at-top

  experiment.check_config(config)
  batches = parse_batches(batches)
  if param_dtype not in PARAM_DTYPES:
    raise UserError(f"param_dtype={param_dtype!r}; allowed: {', '.join(PARAM_DTYPES)}")
  for name, value, low in (("prompt_length", prompt_length, 0), ("gen_length", gen_length, 1)):
    if not isinstance(value, int) or value < low:
      raise UserError(f"{name}={value!r}; allowed: an integer >= {low}")
  chip, devices = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  if vocab_size is None:
    vocab_size = config.tokenizer.vocab_size if config.tokenizer.kind in ("sentencepiece", "hf") else 256
  model = Transformer(experiment.model_config(config, vocab_size))
  mc = model.config
  if mc.causal or mc.block_size:
    raise UserError(f"--only=sample for objective={config.objective!r}; allowed: a masked-diffusion model "
                    "(objective diffusion or sft)")
  if decoders is None:
    decoders = ("dream",) if mc.shift_logits else ("confidence", "llada", "llada+prefix")
  decoders = tuple(decoders.split(",")) if isinstance(decoders, str) else tuple(decoders)
  unknown = [d for d in decoders if d not in SAMPLE_DECODERS]
  if unknown or not decoders:
    raise UserError(f"decoders={','.join(decoders)!r}; allowed: a comma-separated list of "
                    f"{', '.join(SAMPLE_DECODERS)}")
  length = prompt_length + gen_length
  if length > mc.max_len:
    raise UserError(f"prompt_length + gen_length = {length} exceeds model.max_len={mc.max_len}")
  steps, block = config.sampling.steps, config.sampling.block_length
  if any(d.startswith("llada") for d in decoders) and (block < 1 or gen_length % block or steps % (
      gen_length // block)):
    raise UserError(f"gen_length={gen_length} with sampling.block_length={block} and steps={steps}; allowed: a "
                    "block length that divides gen_length and steps a multiple of the number of blocks")
  if not 1 <= steps <= gen_length:
    raise UserError(f"sampling.steps={steps}; allowed: 1 to gen_length={gen_length}")
  mask_id = mc.mask_token_id if mc.mask_token_id >= 0 else vocab_size
  peak = chip.peak_flops(mc.dtype, jax.config.jax_default_matmul_precision)
  peak_source = chip.peak_source(mc.dtype)
  if peak is None:
    peak, peak_source = chip.peak_bf16_flops, chip.peak_source("bfloat16") + " (an upper bound for this precision)"

  boxed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, length), jnp.int32))["params"], jax.random.key(0))
  param_shardings = sharding.logical_shardings(boxed, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, DTYPES[param_dtype], sharding=s),
                        nn.unbox(boxed), param_shardings)
  param_bytes_per_chip = sum(
      math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
      for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings)))
  batch_spec = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
  tokenizer = types.SimpleNamespace(mask_id=mask_id, eos_id=0)
  schedule = experiment.schedule_from_config(config)

  def cost_of(compiled) -> dict:
    cost = _cost(compiled)
    flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    seconds, bound = roofline_seconds(flops, moved, peak, chip.hbm_bandwidth)
    return {"flops": flops, "bytes": moved, "s": seconds, "bound": bound}

  def apply(p, x, **kw):
    return model.apply({"params": p, **kw.pop("variables", {})}, x, None, keep_mask_logit=True, **kw)

  rows = []
  log(f"{topology} ({len(devices)} chips, mesh {dict(mesh.shape)}): {mc.num_layers}x{mc.d_model}, "
      f"{sum(x.size for x in jax.tree.leaves(params)) / 1e9:.2f}B parameters in {param_dtype} "
      f"({param_bytes_per_chip / 2**30:.2f} GiB per chip), compute {mc.dtype}; sampling only, no train step")
  log(f"  prompt {prompt_length} + gen {gen_length} tokens, block_length {block}; AR-equivalent: {gen_length} "
      f"steps (1 token per call), parallel: {steps} steps ({gen_length / steps:g} tokens per call); "
      f"roofline = max(XLA FLOPs / {peak / 1e12:.0f} TFLOP/s ({peak_source}), XLA bytes / "
      f"{chip.hbm_bandwidth / 1e9:.0f} GB/s HBM) per chip, one denoiser call; chip-to-chip traffic not counted")
  # XLA's bytes count every op's operands and results, on-chip copies of the weights included, so they can
  # overstate HBM traffic; no call can beat reading each chip's weights once.
  floor = param_bytes_per_chip / chip.hbm_bandwidth
  log(f"  (floor: a call reads each chip's {param_bytes_per_chip / 2**30:.2f} GiB of weights at least once, "
      f"{_ms(floor)} ms; XLA's bytes also count on-chip copies, so the memory-bound figures can be above HBM time)")
  header = (f"  {'decoder':<13} {'batch':>5} {'GiB/chip':>9} {'ms per call (bound)':<40} {'AR-eq tok/s':>12} "
            f"{'parallel tok/s':>15}")
  log(header)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    for batch in batches:
      rows_computed = sharding.padded_batch_size(batch, mesh)
      tokens = jax.ShapeDtypeStruct((rows_computed, length), jnp.int32, sharding=batch_spec)
      ids = jax.ShapeDtypeStruct((rows_computed,), jnp.int32, sharding=batch_spec)
      full, calls = None, {}
      for decoder in decoders:
        cfg = _decoder_config(config, decoder, steps)
        generator = Generator(model, schedule, tokenizer, mesh, param_shardings, cfg)
        with generator._context():  # pylint: disable=protected-access
          sampler = _compile(generator._run.lower(params, key, tokens, ids, prompt_length),  # pylint: disable=protected-access
                             f"the {decoder} sampler at batch {batch}", topology)
        memory = sampler.memory_analysis()
        row = {"decoder": decoder, "sampler": cfg.name, "batch": batch, "rows_computed": rows_computed,
               "memory_gib_per_chip": _memory_bytes(sampler) / 2**30,
               "argument_bytes_per_chip": float(memory.argument_size_in_bytes)}
        if decoder != "llada+prefix":
          if full is None:
            full = cost_of(_compile(jax.jit(apply, in_shardings=(param_shardings, batch_spec)).lower(params, tokens),
                                    "the denoiser forward", topology))
          row["call"] = full
          seconds = {"ar": gen_length * full["s"], "parallel": steps * full["s"]}
          described = f"{_ms(full['s'])} ({full['bound']})"
        else:
          store = jax.jit(lambda p, x: apply(p, x, approx_cache="store", mutable=["approx_cache"]),
                          in_shardings=(param_shardings, batch_spec))
          store_compiled = _compile(store.lower(params, tokens), "the cache-keeping forward", topology)
          cache = jax.eval_shape(lambda p, x: apply(p, x, approx_cache="store", mutable=["approx_cache"]),
                                 params, tokens)[1]["approx_cache"]
          cache_shardings = store_compiled.output_shardings[1]["approx_cache"]
          cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache, cache_shardings)
          reuse_costs = []
          for b in range(gen_length // block):
            start = prompt_length + b * block
            chunk = length - start
            if chunk not in calls:
              reuse = jax.jit(lambda p, c, x, start=start, chunk=chunk: apply(
                  p, x, variables={"approx_cache": c}, positions_L=start + jnp.arange(chunk), approx_cache="reuse"))
              chunk_tokens = jax.ShapeDtypeStruct((rows_computed, chunk), jnp.int32, sharding=batch_spec)
              calls[chunk] = cost_of(_compile(reuse.lower(params, cache, chunk_tokens),
                                              f"the cached forward on {chunk} positions", topology))
            reuse_costs.append(calls[chunk])
          first = cost_of(store_compiled)
          row.update(call=first, cached_calls=reuse_costs)
          blocks = len(reuse_costs)

          def decode_seconds(steps_per_block):
            return sum(first["s"] + (steps_per_block - 1) * c["s"] for c in reuse_costs)

          seconds = {"ar": decode_seconds(block), "parallel": decode_seconds(steps // blocks)}
          cached = [c["s"] for c in reuse_costs]
          bounds = "/".join(sorted({first["bound"]} | {c["bound"] for c in reuse_costs}))
          described = f"{_ms(first['s'])} full, {_ms(max(cached))}..{_ms(min(cached))} cached ({bounds})"
        row.update(ar_seconds=seconds["ar"], parallel_seconds=seconds["parallel"],
                   ar_tokens_per_s=batch * gen_length / seconds["ar"],
                   parallel_tokens_per_s=batch * gen_length / seconds["parallel"],
                   fits=row["memory_gib_per_chip"] <= chip.hbm_bytes / 2**30)
        rows.append(row)
        padded = f" ({rows_computed} rows)" if rows_computed != batch else ""
        log(f"  {decoder:<13} {batch:>5} {row['memory_gib_per_chip']:>6.2f}/{chip.hbm_bytes / 2**30:.0f} "
            f"{described:<40} {row['ar_tokens_per_s']:>12,.0f} {row['parallel_tokens_per_s']:>15,.0f}{padded}")
  fits = all(r["fits"] for r in rows)
  if any(r["rows_computed"] != r["batch"] for r in rows):
    log(f"  (rows): the batch is padded to a multiple of the data-parallel size {sharding.data_parallel_size(mesh)}"
        " and the padding rows are computed too; tokens/s counts the batch's own rows")
  log(f"  fits: {'yes' if fits else 'NO'}")
  return {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape), "param_dtype": param_dtype,
          "param_bytes_per_chip": param_bytes_per_chip, "prompt_length": prompt_length, "gen_length": gen_length,
          "block_length": block, "steps": steps, "peak_flops_per_chip": peak, "peak_source": peak_source,
          "hbm_bandwidth": chip.hbm_bandwidth, "weights_floor_s": floor, "hbm_gib": chip.hbm_bytes / 2**30, "rows": rows, "fits": fits}


def define_flags():
  """Defines this command's flags (only when run as a command, so the module imports cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Training configuration file.")
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v4:2x2x1, v5e:4x4, v5p:2x2x2, v6e:8x8.")
  flags.DEFINE_integer("vocab_size", None, "Vocabulary size (default: tokenizer.vocab_size; char level: 256).")
  flags.DEFINE_list("sample_batch", [], "Sampler batches, e.g. 1,8 (--only=sample; default 1,8), or one batch "
                    "(default: the training batch).")
  flags.DEFINE_string("only", "", "sample: compile only the samplers (no train step), one per decoder and batch.")
  flags.DEFINE_string("param_dtype", "", "--only=sample: parameter dtype, float32 | bfloat16 (default bfloat16).")
  flags.DEFINE_list("decoders", [], f"--only=sample: any of {', '.join(SAMPLE_DECODERS)} (default: dream for a "
                    "Dream-layout model, else confidence,llada,llada+prefix).")
  flags.DEFINE_integer("prompt_length", 256, "--only=sample: prompt tokens before the generation.")
  flags.DEFINE_integer("gen_length", 256, "--only=sample: tokens to generate.")
  flags.DEFINE_bool("json", False, "Print the results as one JSON line too.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  if FLAGS.config is None or not FLAGS.topology:
    raise UserError("--config=FILE and --topology=CHIP:SHAPE (e.g. v5e:4x4) are required")
  log = lambda m: print(m, flush=True)
  if FLAGS.only not in ("", "sample"):
    raise UserError(f"--only={FLAGS.only!r}; allowed: sample (or leave it out: train step and sampler)")
  if FLAGS.only == "sample":
    result = sample_check(FLAGS.config, FLAGS.topology, parse_batches(FLAGS.sample_batch or ["1", "8"]),
                          FLAGS.decoders or None, FLAGS.param_dtype or "bfloat16", FLAGS.prompt_length,
                          FLAGS.gen_length, FLAGS.vocab_size, log=log)
  else:
    batches = parse_batches(FLAGS.sample_batch) if FLAGS.sample_batch else (0,)
    if len(batches) > 1 or FLAGS.param_dtype not in ("", "float32") or FLAGS.decoders:
      raise UserError("several --sample_batch values, --param_dtype or --decoders without --only=sample; allowed: "
                      "--only=sample (the train step keeps float32 parameters and compiles one sampler)")
    result = check(FLAGS.config, FLAGS.topology, FLAGS.vocab_size, batches[0], log=log)
  if FLAGS.json:
    print(json.dumps(result), flush=True)
  sys.exit(0 if result["fits"] else 1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
