"""Train a masked diffusion language model; rerunning the same command resumes.

  python -m diffusion_lm.train --config=configs/demo.py --workdir=runs/demo [--config.key=value ...]
"""

import json
import logging
import os
import signal
import sys
import time

from absl import app, flags
import flax.linen as nn
import jax
from ml_collections import config_flags
from tqdm import tqdm

from diffusion_lm import checkpointing, clip_search, experiment, lease, paths, sharding
from diffusion_lm.errors import UserError, cli_main, parse_flags
from diffusion_lm.metrics import MetricWriter
from diffusion_lm.profiling import StepProfiler
from diffusion_lm.model import Transformer
from diffusion_lm.generation import Generator, sampler_config


class _Preemption:
  """SIGTERM sets a flag; the loop then saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False

  def install(self):
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside a notebook worker)
      pass

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def _log(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(message, file=sys.stderr)


def train_and_evaluate(config, workdir: str, stop_after: int | None = None) -> dict:
  """Trains per `config` in `workdir`; returns the final metrics dict.

  `stop_after` ends this run after that many steps as if preempted (checkpoint, clean exit); the
  next run with the same config resumes and finishes exactly as an uninterrupted run would.
  """
  # ------------------------------------------------------------------ config, workdir, resume check
  experiment.adopt_init_model(config)
  experiment.check_config(config)
  for where in (workdir, config.data.cache_dir):
    if where:
      paths.check_uri_support(where)
  workdir = paths.resolve(workdir)  # a gs:// workdir stays one (never made a local folder)
  _check_writable(workdir)
  with lease.held(workdir, "train") as writer_lease:  # one writer per workdir (see lease.py)
    return _train(config, workdir, stop_after, writer_lease)


def _train(config, workdir: str, stop_after, writer_lease) -> dict:
  saved_step, saved_config = checkpointing.read_saved_config(workdir)
  if saved_step is not None and saved_step > config.training.num_steps:  # before any data is prepared
    _check_reached(saved_step, config.training.num_steps, workdir)
  if saved_step is None and experiment.lora.from_config(config).rank and not config.get("init_from"):
    raise UserError(f"training.lora.rank={config.training.lora.rank} without init_from; allowed: "
                    "--config.init_from=WORKDIR (LoRA adapts a trained or converted model, e.g. "
                    "--config=configs/sft.py:WORKDIR)")

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  t = config.training
  if t.batch_size % sharding.data_parallel_size(mesh):
    raise UserError(f"training.batch_size={t.batch_size} is not divisible by the data-parallel size "
                    f"{sharding.data_parallel_size(mesh)} (mesh data x fsdp); allowed: a multiple of it")

  # ------------------------------------------------------------------ tokenizer and data
  tokenizer = experiment.load_or_train_tokenizer(config, workdir)
  if saved_config is not None:
    mismatch = experiment.describe_mismatch(saved_config, config, tokenizer.vocab_size)
    if mismatch:
      raise UserError(f"workdir {workdir!r} holds a checkpoint of a different model ({mismatch}); "
                      "use a new --workdir, or rerun with the workdir's own config")
  train_windows, _ = experiment.load_windows(config, workdir, tokenizer, config.data.train_split)
  eval_windows, _ = experiment.load_windows(config, workdir, tokenizer, config.data.eval_split)
  data_iter = experiment.data.make_train_iterator(
      train_windows, t.batch_size, config.seed, jax.process_index(), jax.process_count())

  # ------------------------------------------------------------------ model, optimizer, state
  model = Transformer(experiment.model_config(config, tokenizer.vocab_size))
  schedule = experiment.schedule_from_config(config)
  tx, lr_schedule = experiment.make_optimizer(config)
  base_dtype = experiment.lora.from_config(config).base_dtype
  abstract_state, shardings = experiment.state_shardings(model, tx, mesh, config.data.seq_len, base_dtype)
  # The tree the network applies (LoRA: the frozen base with the adapters) and its shardings.
  applied = experiment.model_param_shardings(shardings)
  config_dict = {**experiment.config_to_dict(config), "vocab_size": tokenizer.vocab_size}
  if saved_step is not None:
    # The newest checkpoint that restores whole; damaged newer ones are moved aside before the manager
    # that will save over their steps opens.
    # A converted workdir's step 0 holds the parameters only: the optimizer state and EMA start here.
    saved_step, state, data_state, damaged = checkpointing.restore_latest(
        workdir, abstract_state, from_params=lambda p: experiment.state_from_params(p, tx, mesh, shardings))
    checkpointing.quarantine(workdir, damaged)
    paths.sync("diffusion_lm:quarantine")
  manager = checkpointing.make_manager(workdir, t.checkpoint_every, t.keep_checkpoints)
  if saved_step is not None and data_state is None:
    _log(f"started from the parameters of {workdir} (a converted checkpoint: a fresh optimizer state, the EMA "
         "from the parameters)")
  elif saved_step is not None:
    data_iter.set_state(data_state)
    _log(f"resumed from checkpoint step {saved_step} in {workdir}"
         + (f" (damaged: step {', '.join(str(d.step) for d in damaged)}, moved to "
            f"{paths.join(workdir, 'damaged_checkpoints')})" if damaged else ""))
  else:
    state = experiment.init_state(model, tx, mesh, jax.random.key(config.seed), config.data.seq_len,
                                  shardings, base_dtype)
    if config.get("init_from"):
      state = experiment.initialize_from(state, config.init_from, mesh, shardings)
      _log(f"initialised from {config.init_from} (its EMA parameters; a fresh optimizer)")
    if jax.process_index() == 0:
      paths.write_bytes(paths.join(workdir, "config.json"), json.dumps(config_dict, indent=2).encode())
  start_step = int(state.step)
  _check_reached(start_step, t.num_steps, workdir)
  if start_step == t.num_steps and saved_step is not None:
    _log(f"the checkpoint already reaches training.num_steps={t.num_steps}; nothing to train (a larger "
         "--config.training.num_steps trains further)")
  trainable = (f" ({experiment.param_count(state.params):,} in LoRA adapters, trained; the base frozen)"
               if isinstance(state, experiment.LoraTrainState) else "")
  _log(f"model: {experiment.param_count(experiment.model_params(state)):,} parameters{trainable}, vocab {tokenizer.vocab_size} "
       f"({tokenizer.kind}), mesh {dict(mesh.shape)}, {train_windows.__len__():,} train sequences of "
       f"{config.data.seq_len} tokens")

  # ------------------------------------------------------------------ compiled steps
  searcher, clip = None, clip_search.DEFAULT
  if experiment.clip_searched(config):  # block diffusion's clipped schedule: the range of the checkpoint resumed
    searcher = clip_search.ClipSearch(model, schedule, tokenizer.mask_id, mesh, applied, config,
                                      ignore_bos=experiment.ignores_bos(config))
    if saved_step is not None:
      clip = clip_search.restore(manager, saved_step)
  step_fn = experiment.jit_train_step(config, model, tx, mesh, shardings, tokenizer.mask_id, tokenizer.eos_id,
                                      clip=clip)
  evaluator = experiment.Evaluator(model, schedule, tokenizer.mask_id, mesh, applied,
                                   config.evaluation, config.objective, tokenizer.eos_id,
                                   ignore_bos=experiment.ignores_bos(config))
  generator = None
  if t.sample_every:
    generator = Generator(model, schedule, tokenizer, mesh, applied,
                          sampler_config(config.sampling))
    samples_template = generator.template(config.data.seq_len, config.sampling.num_samples,
                                          prompt=config.sampling.prompt)

  # ------------------------------------------------------------------ loop
  writer = MetricWriter(workdir, wandb_project=t.get("wandb_project", ""), run_config=config_dict)
  profiler = StepProfiler(t.get("profile_steps", ()), workdir, log=_log)
  preemption = _Preemption()
  multi_process = jax.process_count() > 1
  if not multi_process:
    preemption.install()
  # With several processes, JAX's preemption service catches SIGTERM on any of them and all
  # processes agree on the step at which to save (orbax's reached_preemption), so none hangs
  # waiting for a collective the others never reach.
  train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  bar = tqdm(total=t.num_steps, initial=start_step, unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0, file=sys.stderr, mininterval=1.0)
  last = {}
  pending = None  # (step, metrics) of the step before, fetched after the next is dispatched
  skipped = [0]  # non-finite steps skipped (training.on_nonfinite="skip")
  window_start, window_steps = time.time(), 0
  tokens_per_step = t.batch_size * config.data.seq_len

  def save(step_done: int, force: bool = False):
    records = {clip_search.RECORD: {"lo": clip[0], "hi": clip[1]}} if searcher is not None else None
    try:
      return checkpointing.save(manager, step_done, state, data_iter.get_state(), config_dict, force=force,
                                records=records)
    except OSError as e:
      raise _storage_error(e, step_done, manager, workdir) from None

  def consume(step_done, metrics):
    nonlocal window_start, window_steps
    metrics = jax.device_get(metrics)
    if not metrics["finite"] and t.get("on_nonfinite", "stop") == "skip":
      skipped[0] += 1
      _log(f"step {step_done}: non-finite loss or gradient, update skipped ({skipped[0]} so far)")
    elif not metrics["finite"]:
      latest = manager.latest_step()
      manager.wait_until_finished()
      raise FloatingPointError(
          f"non-finite loss or gradient at step {step_done}; the update was skipped and training stopped. "
          f"Last good checkpoint: {latest if latest is not None else 'none'} in {checkpointing.checkpoint_dir(workdir)}")
    window_steps += 1
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", bpt=f"{metrics['bits_per_token']:.3f}", refresh=False)
    if step_done % t.log_every == 0 or step_done == t.num_steps:
      elapsed = time.time() - window_start
      scalars = {f"train/{k}": v for k, v in metrics.items() if k != "finite"}
      scalars["train/learning_rate"] = float(lr_schedule(step_done - 1))
      scalars["train/steps_per_sec"] = window_steps / max(elapsed, 1e-9)
      scalars["train/tokens_per_sec"] = scalars["train/steps_per_sec"] * tokens_per_step
      scalars["train/skipped_steps"] = skipped[0]
      writer.write_scalars(step_done, scalars)
      window_start, window_steps = time.time(), 0
      last.update(scalars)

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    try:
      for step in range(start_step, t.num_steps):
        writer_lease.check()
        rows = next(data_iter)
        batch = sharding.global_batch_from_local(rows, mesh)
        profiler.before_step(step + 1)
        state, metrics = step_fn(state, batch, train_key)
        profiler.after_step(step + 1, metrics)
        if pending is not None:
          consume(*pending)
        pending = (step + 1, metrics)
        step_done = step + 1
        if stop_after is not None and step_done - start_step >= stop_after:
          preemption.requested = True
        if multi_process and manager.reached_preemption(step_done):
          preemption.requested = True
        is_last = step_done == t.num_steps
        periodic_eval = t.eval_every and step_done % t.eval_every == 0
        periodic_sample = t.sample_every and step_done % t.sample_every == 0
        # Sync points: metrics are checked (finite) before anything is evaluated or saved, so a
        # checkpoint never holds a state whose step produced a non-finite loss.
        sync = bool(periodic_eval or periodic_sample or is_last or preemption.requested
                    or manager.should_save(step_done))
        if sync:
          consume(*pending)
          pending = None
        if periodic_eval or is_last:
          result = evaluator(experiment.model_params(state), eval_windows)
          writer.write_scalars(step_done, {f"eval/{k}": v for k, v in result.items()})
          last.update({f"eval/{k}": v for k, v in result.items()})
          subset = (f" ({result['windows_scored']} of {result['windows_in_split']} windows, seeded subset)"
                    if result["capped"] else "")
          _log(f"step {step_done}: validation bits/char {result['bits_per_char']:.4f}, bits/token "
               f"{result['bits_per_token']:.4f}, perplexity <= {result['perplexity']:.2f}{subset}")
        if searcher is not None and periodic_eval and not is_last:
          found, variances = searcher(experiment.model_params(state), eval_windows)
          writer.write_scalars(step_done, {"eval/clip_lo": found[0], "eval/clip_hi": found[1],
                                           "eval/clip_variance": variances[found]})
          if found != clip:
            clip = found
            _log(f"step {step_done}: block diffusion now draws t on [{clip[0]:g}, {clip[1]:g}] (clip search)")
            step_fn = experiment.jit_train_step(config, model, tx, mesh, shardings, tokenizer.mask_id,
                                                tokenizer.eos_id, clip=clip)
        if generator is not None and (periodic_sample or is_last):
          _write_samples(generator, experiment.model_params(state), samples_template, config, workdir, step_done, writer)
        if sync:
          save(step_done, force=is_last or preemption.requested)
        if preemption.requested:
          manager.wait_until_finished()
          _log(f"stopped early: saved checkpoint at step {step_done}; rerun the same command to resume")
          break
      if pending is not None:
        consume(*pending)
    finally:
      bar.close()
      profiler.close()
      try:
        manager.wait_until_finished()
        manager.close()
      except OSError as e:
        raise _storage_error(e, int(state.step), manager, workdir) from None
      finally:
        writer.close()
  return last


def _check_reached(step: int, num_steps: int, workdir: str) -> None:
  if step > num_steps:
    raise UserError(f"training.num_steps={num_steps} is below the step {step} that the workdir {workdir!r} has "
                    f"reached; allowed: num_steps >= {step} (a larger value trains further)")


def _check_writable(workdir: str) -> None:
  """Fails early, in one line, when the workdir cannot be created or written."""
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise UserError(f"workdir {workdir!r} is a file, not a folder; allowed: a new or existing folder")
  try:
    probe = paths.join(workdir, f".write-probe-{jax.process_index()}-{os.getpid()}")
    paths.write_bytes(probe, b"ok")
    paths.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror or e}); allowed: a directory this "
                    "process can create and write") from None


def _storage_error(error: OSError, step: int, manager, workdir: str) -> UserError:
  try:
    latest = manager.latest_step()
  except Exception:  # pylint: disable=broad-except
    latest = None
  return UserError(f"could not write the checkpoint of step {step} in {checkpointing.checkpoint_dir(workdir)} "
                   f"({error.strerror or error}); the checkpoints already there are intact (latest: "
                   f"{latest if latest is not None else 'none'}); free space or fix permissions and rerun")


def _write_samples(generator, params, template, config, workdir, step, writer):
  cfg = config.sampling
  texts = generator.decode(generator(params, template, cfg.seed).tokens)
  if jax.process_index() != 0:
    return
  if config.objective == "ar":
    how = "autoregressive"
  else:
    per_block = f" per {config.model.block_size}-token block" if config.objective == "block" else ""
    how = f"{cfg.name} sampler, {cfg.steps} steps{per_block}"
  body = "\n".join(f"--- sample {i} (step {step}, {how}) ---\n{text}"
                   for i, text in enumerate(texts))
  paths.write_bytes(paths.join(workdir, "samples", f"step_{step:07d}.txt"), body.encode())
  writer.write_text(step, "samples", body)
  _log(f"samples at step {step}:\n{body}")


FLAGS = flags.FLAGS


def define_flags():
  """Defines this command's flags (only when run as a command, so the module imports cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, tokenizer, logs and samples.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")
  flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize() with no arguments (TPU pods).")
  flags.DEFINE_string("coordinator_address", "", "Multi-process: coordinator host:port (e.g. 127.0.0.1:12345).")
  flags.DEFINE_integer("num_processes", 0, "Multi-process: number of processes.")
  flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")
  flags.DEFINE_integer("heartbeat_timeout", 100, "Multi-process: seconds before the others give up on a dead process.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  if FLAGS.config is None:
    raise UserError("--config is required, e.g. --config=configs/demo.py")
  if not FLAGS.workdir:
    raise UserError("--workdir is required, e.g. --workdir=runs/demo")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from diffusion_lm import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.heartbeat_timeout)
  report_final(train_and_evaluate, FLAGS.config, FLAGS.workdir)


def report_final(run, *args) -> None:
  """Runs a training command's `run(*args)`: a non-finite stop exits with code 3 and its one line; the
  final metrics print as one JSON line (process 0)."""
  try:
    final = run(*args)
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  if jax.process_index() == 0 and final:
    print(json.dumps({k: round(float(v), 5) for k, v in final.items()}), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
