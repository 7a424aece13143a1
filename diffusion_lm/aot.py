"""Ahead-of-time compilation for a TPU slice, on any machine: does the config fit, how fast is it?

  pip install -r requirements-tpu.txt     # brings libtpu (the TPU compiler) from PyPI
  python -m diffusion_lm.aot --config=configs/text8.py --topology=v5e:4x4

Compiles the train step and the sampler for the named topology without a TPU, then prints per-chip
memory against the chip's HBM, XLA's flop count and estimated step time, and from them the estimated
tokens/s per chip and model-FLOPs utilisation. Exit code 1 when something does not fit.
"""

import dataclasses
import json
import os
import sys

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


def define_flags():
  """Defines this command's flags (only when run as a command, so the module imports cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Training configuration file.")
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v4:2x2x1, v5e:4x4, v5p:2x2x2, v6e:8x8.")
  flags.DEFINE_integer("vocab_size", None, "Vocabulary size (default: tokenizer.vocab_size; char level: 256).")
  flags.DEFINE_integer("sample_batch", 0, "Sampler batch (default: the training batch).")
  flags.DEFINE_bool("json", False, "Print the results as one JSON line too.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  if FLAGS.config is None or not FLAGS.topology:
    raise UserError("--config=FILE and --topology=CHIP:SHAPE (e.g. v5e:4x4) are required")
  result = check(FLAGS.config, FLAGS.topology, FLAGS.vocab_size, FLAGS.sample_batch,
                 log=lambda m: print(m, flush=True))
  if FLAGS.json:
    print(json.dumps(result), flush=True)
  sys.exit(0 if result["fits"] else 1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
