"""Benchmarks that print figures (speed is measured here, never asserted in tests).

  # trained diffusion model vs its AR baseline (also the judge of sample quality):
  python -m diffusion_lm.bench --workdir=runs/demo --ar_workdir=runs/demo_ar --out=runs/bench
  # masked vs block diffusion vs AR, 256 generated tokens at batch 1 and 32 (block models: steps per block):
  python -m diffusion_lm.bench --workdir=runs/demo,runs/demo_block --ar_workdir=runs/demo_ar \
      --parts=sampling,quality --steps=16,64,256 --samplers=ancestral,confidence,threshold --seq_len=256
  # sampler timings only, 32 sequences of 256 tokens at T = 32, 64, 256:
  python -m diffusion_lm.bench --workdir=runs/demo --parts=sampling --batches=32 --seq_len=256
  # any config with fresh parameters (speed does not depend on training):
  python -m diffusion_lm.bench --config=configs/demo.py --parts=train,sampling
  # before/after a change, as ratios measured in one process (this tree against a git revision):
  python -m diffusion_lm.bench --config=configs/md4_char.py --parts=train --batches=32 --compare_ref=HEAD~1

Parts:
  train     tokens/s of the train step and model-FLOPs utilisation (MFU) of the whole step against the
            whole machine's peak in the config's compute dtype: the chip's published dense peak times
            the device count on TPU/GPU (aot.CHIPS), a matmul measured in this run on a CPU; each
            line names its peak's source. Also XLA's own flop count of the step, summed over devices.
  sampling  for each model (masked diffusion, block diffusion), sampler and step count T (block models:
            steps per block; threshold: a budget), at each batch size: seconds, tokens/s, latency per
            sequence, compile seconds, denoiser calls, tokens committed per call, and for masked
            diffusion the loop overhead = time / (calls x one forward of the same batch); the KV-cache
            AR decoder of the equal-size model alongside.
  quality   generative perplexity of each setting's samples under the AR judge, against tokens/s
            (needs --ar_workdir). Every sampling row also carries the samples' unigram entropy: per
            sequence, averaged over sequences (MDLM / ReMDM), and pooled over the whole batch.
With --compare_ref=REV, also the train step, one forward and the ancestral step of the same config
under the package at git revision REV and under this tree, interleaved in this process, with ratios,
compiled train-step memory and both first-step losses (diffusion_lm/compare.py).
Writes OUT/bench.json and OUT/bench.png (quality or latency against speed).
"""

import dataclasses
import io
import json
import math
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from diffusion_lm import paths, sampling
from diffusion_lm.errors import UserError, cli_main, parse_flags

FLAGS = flags.FLAGS


def _positive_ints(name: str) -> list[int]:
  """A comma-separated flag's integers; UserError naming that flag and its bad item."""
  values = FLAGS[name].value
  for item in values:
    if not item.strip().isdigit() or int(item) < 1:
      raise UserError(f"--{name}={','.join(values)}: {item!r} is not an integer >= 1; allowed: comma-separated "
                      "integers >= 1")
  return [int(item) for item in values]


def _best_time(fn, repeats: int):
  best, out = float("inf"), None
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


MATMUL_SIZE = 2048  # the measured peak times one MATMUL_SIZE^3 matmul: large enough to be compute bound


def matmul_peak_flops(dtype: str = "float32", device=None, size: int = MATMUL_SIZE) -> float:
  """Dense matmul FLOP/s of one device (default: the first), measured with `dtype` operands.

  On a CPU one device's matmul already runs on every core, so this is the whole host's peak.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from diffusion_lm.model import DTYPES  # pylint: disable=g-import-not-at-top
  a = jax.device_put(jnp.ones((size, size), DTYPES[dtype]), device or jax.devices()[0])
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best, _ = _best_time(lambda: f(a).block_until_ready(), 5)
  return 2 * size**3 / best


@dataclasses.dataclass(frozen=True)
class Peak:
  """The MFU denominator: dense matmul FLOP/s of the devices a step runs on, for one compute dtype.

  Accounting is whole step against whole machine: MFU = model FLOPs of a step / step seconds / flops.
  """

  per_device_flops: float
  devices: int  # how many per-device peaks add up (1 on a CPU: simulated devices share the cores)
  dtype: str  # the config's compute dtype (model.dtype)
  source: str  # where per_device_flops comes from: a named publication or a measurement

  @property
  def flops(self) -> float:
    return self.per_device_flops * self.devices

  def describe(self) -> str:
    """E.g. '8 x 197.0 TFLOP/s bfloat16 (TPU v5e published bfloat16 peak, Google Cloud TPU v5e docs)'."""
    count = f"{self.devices} x " if self.devices > 1 else ""
    return f"{count}{_flops_text(self.per_device_flops)} {self.dtype} ({self.source})"


def _flops_text(flops: float) -> str:
  for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
    if flops >= scale:
      return f"{flops / scale:.1f} {unit}"
  return f"{flops / 1e6:.1f} MFLOP/s"


def select_peak(dtype: str, devices, measure=matmul_peak_flops, precision="config") -> Peak:
  """The peak a step of compute dtype `dtype` on `devices` is measured against.

  TPU and GPU: the chip's published dense peak for that dtype (aot.CHIPS, keyed by device kind), times
  the device count; a chip or precision the table lacks falls back to a matmul measured on one device.
  CPU: a matmul in `dtype` measured on one device, not multiplied: simulated devices share the cores.
  measure(dtype, device) -> FLOP/s; precision: jax_default_matmul_precision ("config": read it).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from diffusion_lm import aot  # pylint: disable=g-import-not-at-top
  from diffusion_lm.model import DTYPES  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise UserError(f"model.dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
  if precision == "config":
    precision = jax.config.jax_default_matmul_precision
  device = devices[0]
  if device.platform == "cpu":
    shared = f", shared by its {len(devices)} simulated devices" if len(devices) > 1 else ""
    return Peak(measure(dtype, device), 1, dtype, f"measured {MATMUL_SIZE}^3 {dtype} matmul on this CPU{shared}")
  chip = aot.chip_for_device_kind(device.device_kind)
  published = chip.peak_flops(dtype, precision) if chip else None
  if published:
    return Peak(published, len(devices), dtype, chip.peak_source(dtype))
  why = f"no published figure at matmul precision {precision}" if chip else "not in aot.CHIPS"
  return Peak(measure(dtype, device), len(devices), dtype,
              f"measured {MATMUL_SIZE}^3 {dtype} matmul on one {device.device_kind}: {why}")


def train_row(model, config, tokenizer, mesh, peak: Peak, steps: int, log=print) -> dict:
  """Times the train step; MFU of the whole step against `peak` (which must cover mesh's devices)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from diffusion_lm import experiment, sharding  # pylint: disable=g-import-not-at-top
  tx, _ = experiment.make_optimizer(config)
  seq_len, batch = config.data.seq_len, config.training.batch_size
  base_dtype = experiment.lora.from_config(config).base_dtype  # LoRA: the step of the adapters, base frozen
  _, shardings = experiment.state_shardings(model, tx, mesh, seq_len, base_dtype)
  state = experiment.init_state(model, tx, mesh, jax.random.key(0), seq_len, shardings, base_dtype)
  step = experiment.jit_train_step(config, model, tx, mesh, shardings, tokenizer.mask_id, tokenizer.eos_id)
  tokens = np.random.default_rng(0).integers(0, tokenizer.vocab_size, (batch, seq_len), dtype=np.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    x = sharding.global_batch_from_local(tokens, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, x, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else (analysis or {})
    # XLA counts the flops of one device's partitioned program: summed over the mesh for the whole
    # step (this includes work every device repeats, such as a replicated optimizer update).
    xla_flops = float(analysis.get("flops", 0.0)) * mesh.devices.size
    microbatches = experiment.microbatch_count(config, mesh)
    if microbatches > 1:  # XLA counts a loop's body once: its figure would be one microbatch's
      xla_flops = 0.0
    state, metrics = compiled(state, x, jax.random.key(1))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, x, jax.random.key(1))
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
  tokens_per_s = batch * seq_len / seconds
  flops_per_token = model.config.flops_per_token(seq_len)
  row = {"part": "train", "objective": config.objective, "batch": batch, "seq_len": seq_len,
         "devices": int(mesh.devices.size), "step_s": seconds, "tokens_per_sec": tokens_per_s,
         "compile_s": compile_s, "model_flops_per_token": flops_per_token,
         "model_flops_per_step": flops_per_token * batch * seq_len,
         "peak_flops": peak.flops, "peak_flops_per_device": peak.per_device_flops, "peak_devices": peak.devices,
         "peak_dtype": peak.dtype, "peak_source": peak.source,
         "mfu": tokens_per_s * flops_per_token / peak.flops,
         "xla_flops_per_step": xla_flops,
         "xla_flops_utilisation": xla_flops / seconds / peak.flops if xla_flops else None}
  log(f"train ({config.objective}): batch {batch} x {seq_len}, {seconds * 1e3:.1f} ms/step, "
      f"{tokens_per_s:,.0f} tokens/s, compile {compile_s:.1f} s, MFU {row['mfu']:.1%} of {peak.describe()}")
  row["microbatches"] = microbatches
  if microbatches > 1:
    log(f"  in {microbatches} microbatches (training.microbatches; XLA's FLOP count, one loop body, is not shown)")
  if xla_flops:
    log(f"  XLA counts {xla_flops / 1e9:.3g} GFLOP per step over {mesh.devices.size} device(s), "
        f"{xla_flops / row['model_flops_per_step']:.2f} x the model FLOPs: {row['xla_flops_utilisation']:.1%} "
        "of the peak")
  return row


def forward_seconds(model, params, param_shardings, mesh, batch: int, seq_len: int, mask_id: int) -> float:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from diffusion_lm import sharding  # pylint: disable=g-import-not-at-top
  padded = sharding.padded_batch_size(batch, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t),
                    in_shardings=(param_shardings, batch_sharding, batch_sharding))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    x = jax.device_put(np.full((padded, seq_len), mask_id, np.int32), batch_sharding)
    t = jax.device_put(np.ones((padded,), np.float32), batch_sharding)
    forward(params, x, t).block_until_ready()
    best, _ = _best_time(lambda: forward(params, x, t).block_until_ready(), 3)
  return best


def model_label(run) -> str:
  """What a row's model is: diffusion, block L'=n or ar; a distilled student (diffusion_lm.distill) adds
  "student N->M" (its first teacher's step count -> its own)."""
  cfg = run.model.config
  label = "ar" if cfg.causal else f"block L'={cfg.block_size}" if cfg.block_size else "diffusion"
  record = run.config.get("distill") if hasattr(run.config, "get") else None
  if record and record.get("rounds_done"):
    label += f" student {record.start_steps}->{record.student_steps}"
  return label


def _settings(run, *, steps_list, samplers, block_samplers, block_steps, approx_caches=("none",)):
  """(sampler, steps, approx_cache) to time for one model: steps are per block for block-diffusion models;
  the blocks sampler of a masked-diffusion model runs once per approximate cache."""
  size = run.model.config.block_size
  if not size:
    return [(name, steps, cache) for name in samplers for steps in steps_list
            for cache in (approx_caches if name == "blocks" else ("none",))]
  return [(name, steps, "none") for name in block_samplers for steps in (block_steps or [size])]


def sampling_rows(runs, *, batches, seq_len: int, steps_list, samplers, repeats: int, block_length: int,
                  threshold: float, block_samplers=("ancestral", "threshold"), block_steps=(), ar_run=None,
                  judge=None, approx_caches=("none",), log=print) -> list[dict]:
  """Times every (model, sampler, T, batch) of `runs` and the AR decoder of `ar_run`; scores with `judge`.

  Each row: seconds, tokens/s, latency per sequence, denoiser calls (forward passes of any width, the
  block decoder's cache commits included), tokens committed per call (per sequence), and for masked
  diffusion the loop overhead against one full-width forward per call.
  """
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  from diffusion_lm.generation import Generator  # pylint: disable=g-import-not-at-top
  rows = []
  for batch in batches:
    forward_s = {}
    targets = [(run, *setting) for run in runs
               for setting in _settings(run, steps_list=steps_list, samplers=samplers, block_samplers=block_samplers,
                                        block_steps=block_steps, approx_caches=approx_caches)]
    if ar_run is not None:
      targets.append((ar_run, "ar", seq_len, "none"))
    for target, name, steps, cache in targets:
      label = model_label(target)
      if label.startswith("diffusion") and id(target) not in forward_s:
        forward_s[id(target)] = forward_seconds(target.model, target.params, target.param_shardings, target.mesh,
                                                batch, seq_len, target.tokenizer.mask_id)
        log(f"one denoiser forward, batch {batch} x {seq_len}: {forward_s[id(target)] * 1e3:.1f} ms")
      cfg = sampling.SamplerConfig(name="ancestral" if name == "ar" else name, steps=steps,
                                   block_length=block_length, threshold=threshold, approx_cache=cache)
      name = name if cache == "none" else f"{name}+{cache}"
      try:
        gen = Generator(target.model, target.schedule, target.tokenizer, target.mesh, target.param_shardings, cfg)
        template = gen.template(seq_len, batch)
      except UserError as e:
        log(f"skip {label} {name} T={steps}: {e}")
        continue
      compile_s = gen.compile(target.params, template)
      seconds, out = _best_time(lambda: gen(target.params, template, seed=0), repeats)
      calls = int(out.num_calls)
      row = {"part": "sampling", "model": label, "sampler": name, "steps": steps,
             "steps_per_block": bool(target.model.config.block_size), "batch": batch, "seq_len": seq_len,
             "seconds": seconds, "tokens_per_sec": batch * seq_len / seconds,
             "latency_per_sequence_s": seconds / batch, "compile_s": compile_s, "denoiser_calls": calls,
             "tokens_per_call": seq_len / max(calls, 1), "ms_per_call": seconds / max(calls, 1) * 1e3,
             "mean_steps_used": float(out.steps_used.mean()), "mean_length": float(out.lengths.mean())}
      if label.startswith("diffusion"):
        row["forward_s"] = forward_s[id(target)]
        row["overhead_vs_calls"] = seconds / (max(calls, 1) * forward_s[id(target)])
      if judge is not None:
        row["gen_perplexity"] = math.exp(judge(out.tokens))
      row["sample_entropy_bits"] = experiment.unigram_entropy_bits(out.tokens)
      row["pooled_entropy_bits"] = experiment.pooled_unigram_entropy_bits(out.tokens)
      rows.append(row)
      quality = f"  gen ppl {row['gen_perplexity']:8.2f}" if "gen_perplexity" in row else ""
      overhead = f"  overhead {row['overhead_vs_calls']:.3f}" if "overhead_vs_calls" in row else ""
      budget = "<=" if name == "threshold" else "="
      per = "/block" if row["steps_per_block"] else ""
      log(f"{label:>10} {name:>10} T{budget}{steps:<4}{per:6} B={batch:<3} {seconds:8.3f} s  "
          f"{row['tokens_per_sec']:9.0f} tok/s  {row['latency_per_sequence_s'] * 1e3:8.1f} ms/seq  "
          f"compile {compile_s:5.1f} s  forward passes {calls:4d}  {row['tokens_per_call']:5.2f} tok/forward  "
          f"{row['ms_per_call']:6.2f} ms/call{overhead}{quality}  entropy {row['sample_entropy_bits']:.2f} bits "
          f"(per-sequence mean)")
  return rows


def plot(rows: list[dict], path: str) -> None:
  """Quality (or latency) against tokens/s: each (model, sampler) a line over T, AR a star."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  samples = [r for r in rows if r["part"] == "sampling"]
  if not samples:
    return
  quality = all("gen_perplexity" in r for r in samples)
  metric = "gen_perplexity" if quality else "latency_per_sequence_s"
  batches = sorted({r["batch"] for r in samples})
  fig, axes = plt.subplots(1, len(batches), figsize=(12, 5), squeeze=False)
  for ax, batch in zip(axes[0], batches):
    for model, name in dict.fromkeys((r["model"], r["sampler"]) for r in samples):
      pts = sorted((r["tokens_per_sec"], r[metric], r["steps"]) for r in samples
                   if r["sampler"] == name and r["model"] == model and r["batch"] == batch)
      if not pts:
        continue
      xs, ys, _ = zip(*pts)
      is_ar = model == "ar"
      ax.plot(xs, ys, "*" if is_ar else "o-", label="AR (KV cache)" if is_ar else f"{model} {name}",
              markersize=12 if is_ar else 5)
      for x, y, t in pts:
        ax.annotate("AR" if is_ar else f"T={t}", (x, y), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens / s")
    ax.set_ylabel("generative perplexity (AR judge)" if quality else "latency per sequence (s)")
    ax.set_title(f"batch {batch}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=110)
  plt.close(fig)
  paths.write_bytes(path, image.getvalue())


def _fresh_run(config):
  """A Trained-like bundle with fresh parameters and a stand-in vocabulary of the configured size."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_lm import experiment, sharding, tokenizers  # pylint: disable=g-import-not-at-top
  from diffusion_lm.model import Transformer  # pylint: disable=g-import-not-at-top
  size = config.tokenizer.vocab_size if config.tokenizer.kind in ("sentencepiece", "hf") else 96
  tokenizer = tokenizers.CharTokenizer([chr(0x100 + i) for i in range(size - 1)])
  mesh = sharding.make_mesh(config.mesh)
  model = Transformer(experiment.model_config(config, tokenizer.vocab_size))
  tx, _ = experiment.make_optimizer(config)
  _, shardings = experiment.state_shardings(model, tx, mesh, config.data.seq_len)
  state = experiment.init_state(model, tx, mesh, jax.random.key(0), config.data.seq_len, shardings)
  return experiment.Trained(config, tokenizer, model, experiment.schedule_from_config(config), mesh,
                            experiment.model_params(state, ema=False), experiment.model_param_shardings(shardings), 0)


def compare_to_revision(run, sample_batch: int, log=print) -> list[dict]:
  """--compare_ref: the config of `run` (fresh parameters) under both revisions, side by side."""
  from diffusion_lm import compare  # pylint: disable=g-import-not-at-top
  return compare.compare_rows(FLAGS.compare_ref, run.config, run.tokenizer.vocab_size, run.tokenizer.eos_id,
                              sample_batch=sample_batch, seq_len=FLAGS.seq_len, sampler_steps=FLAGS.compare_steps,
                              train_steps=FLAGS.train_steps, repeats=FLAGS.compare_repeats, log=log)


def define_flags():
  """Defines this command's flags (only when run as a command, so the module imports cleanly)."""
  flags.DEFINE_list("workdir", None, "Trained masked- or block-diffusion workdirs, comma-separated (else --config "
                    "with fresh parameters).")
  flags.DEFINE_string("ar_workdir", None, "Trained AR baseline: timed as the decoder and used as the judge.")
  config_flags.DEFINE_config_file("config", None, "Config whose model to benchmark with fresh parameters.")
  flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "Restore the parameters in this dtype "
                    "(default: float32, as trained; bfloat16 halves their memory).")
  flags.DEFINE_list("parts", ["train", "sampling", "quality"], "Parts to run, comma-separated; choices: train, "
                    "sampling, quality.")
  flags.DEFINE_list("batches", ["1", "32"], "Batch sizes for sampling.")
  flags.DEFINE_integer("seq_len", 256, "Tokens per generated sequence.")
  flags.DEFINE_list("steps", ["32", "64", "256"], "Step counts T.")
  flags.DEFINE_list("samplers", [n for n in sampling.SAMPLERS if n not in sampling.PUBLISHED],
                    f"Samplers to time, comma-separated; choices: {', '.join(sampling.SAMPLERS)}.")
  flags.DEFINE_integer("repeats", 1, "Timed runs per setting (after compiling); the minimum is kept.")
  flags.DEFINE_integer("train_steps", 5, "Timed train steps (after one compile step).")
  flags.DEFINE_integer("block_length", 32, "blocks sampler: tokens per block.")
  flags.DEFINE_float("threshold", 0.9, "threshold sampler: confidence threshold.")
  flags.DEFINE_list("block_samplers", ["ancestral", "threshold"], "Samplers run inside each block of a "
                    "block-diffusion model.")
  flags.DEFINE_list("block_steps", [], "Steps per block for block-diffusion models (default: the block size).")
  flags.DEFINE_list("approx_caches", ["none"], "blocks sampler of masked-diffusion models: one row per cache, "
                    f"comma-separated; choices: {', '.join(sampling.APPROX_CACHES)} (prefix/dual: approximate).")
  flags.DEFINE_string("out", "", "Folder for bench.json and bench.png (default: no files).")
  flags.DEFINE_string("compare_ref", "", "Also time this tree against the package at this git revision (e.g. HEAD~1), "
                      "interleaved in this process: train step, forward, ancestral step (see diffusion_lm/compare.py).")
  flags.DEFINE_integer("compare_steps", 16, "--compare_ref: sampler steps per timed run (the figure is per step).")
  flags.DEFINE_integer("compare_repeats", 3, "--compare_ref: interleaved runs per side; the minimum is kept.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  steps_list, batches, block_steps = (_positive_ints(name) for name in ("steps", "batches", "block_steps"))
  for name in FLAGS.samplers + FLAGS.block_samplers:
    if name not in sampling.SAMPLERS:
      raise UserError(f"--samplers/--block_samplers include {name!r}; allowed: {', '.join(sampling.SAMPLERS)}")
  for part in FLAGS.parts:
    if part not in ("train", "sampling", "quality"):
      raise UserError(f"--parts includes {part!r}; allowed: train, sampling, quality")
  if FLAGS.workdir:
    runs, source = [experiment.load_trained(w, dtype=FLAGS.param_dtype) for w in FLAGS.workdir], ", ".join(FLAGS.workdir)
  elif FLAGS.config is not None:
    runs, source = [_fresh_run(FLAGS.config)], "fresh parameters"
  else:
    raise UserError("give --workdir=DIR[,DIR...] (trained runs) or --config=FILE (fresh parameters)")
  for run, where in zip(runs, FLAGS.workdir or ["--config"]):
    if run.model.config.causal:
      raise UserError(f"{where} holds an AR model; give diffusion models as --workdir and the AR one as "
                      "--ar_workdir")
    if run.tokenizer.fingerprint() != runs[0].tokenizer.fingerprint():
      raise UserError(f"{where} has another vocabulary than {FLAGS.workdir[0]}; allowed: models trained with the "
                      "same tokenizer")
    if FLAGS.seq_len > run.model.config.max_len and not run.model.config.block_size:
      raise UserError(f"--seq_len={FLAGS.seq_len}; allowed: at most the model's max_len={run.model.config.max_len}"
                      f" ({where})")
  ar_run = experiment.load_trained(FLAGS.ar_workdir) if FLAGS.ar_workdir else None
  judge = None
  if "quality" in FLAGS.parts and ar_run is not None:
    if ar_run.tokenizer.fingerprint() != runs[0].tokenizer.fingerprint():
      raise UserError(f"--ar_workdir {FLAGS.ar_workdir!r} has another vocabulary than --workdir; allowed: "
                      "an AR baseline trained with the same tokenizer")
    judge = experiment.ar_scorer(ar_run)
  log = lambda m: print(m, flush=True)
  log(f"# benchmark: {source}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
      f"{', '.join(f'{model_label(r)} {experiment.param_count(r.params):,}' for r in runs)} parameters, "
      f"vocab {runs[0].tokenizer.vocab_size}")
  rows = [{"part": "machine", "devices": jax.device_count(), "platform": jax.devices()[0].platform,
           "device_kind": jax.devices()[0].device_kind}]
  if "train" in FLAGS.parts:
    measured = {}  # one measurement per (dtype, device), shared by all models

    def measure(dtype, device):
      if (dtype, device.id) not in measured:
        measured[dtype, device.id] = matmul_peak_flops(dtype, device)
      return measured[dtype, device.id]

    for target in runs + ([ar_run] if ar_run is not None else []):
      peak = select_peak(target.model.config.dtype, target.mesh.devices.flatten().tolist(), measure)
      rows.append(train_row(target.model, target.config, target.tokenizer, target.mesh, peak, FLAGS.train_steps,
                            log))
  if "sampling" in FLAGS.parts or "quality" in FLAGS.parts:
    rows += sampling_rows(runs, batches=batches, seq_len=FLAGS.seq_len, steps_list=steps_list,
                          samplers=FLAGS.samplers, repeats=FLAGS.repeats, block_length=FLAGS.block_length,
                          threshold=FLAGS.threshold, block_samplers=FLAGS.block_samplers, block_steps=block_steps,
                          ar_run=ar_run, judge=judge, approx_caches=FLAGS.approx_caches, log=log)
  rows.append({"part": "memory", "peak_rss_gib": peak_rss_gib()})
  log(f"peak host memory (RSS): {peak_rss_gib():.2f} GiB")
  if FLAGS.compare_ref:  # after the memory figure, which it would otherwise include
    rows += compare_to_revision(runs[0], batches[0], log)
  if FLAGS.out:
    paths.write_bytes(paths.join(FLAGS.out, "bench.json"), json.dumps(rows, indent=1).encode("utf-8"))
    plot(rows, paths.join(FLAGS.out, "bench.png"))
    log(f"wrote {paths.join(FLAGS.out, 'bench.json')} and bench.png")
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
