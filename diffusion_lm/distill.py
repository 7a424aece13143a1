"""Distil a masked- or block-diffusion workdir into a few-step student (SDTT); rerunning resumes.

  python -m diffusion_lm.distill --teacher_workdir=runs/demo --workdir=runs/demo_distill \
      [--config=configs/demo_distill.py] [--config.distill.steps_per_round=500 ...]

The student starts as the teacher (its EMA parameters) and learns, round by round, to do in one step
what the teacher does in `distill.factor` (diffusion_lm/distillation.py). Each round ends with a
checkpoint; the student workdir is an ordinary workdir (sample, evaluate and bench load it) whose
config records the teacher and the rounds it came from (config.json, "distill").
"""

import json
import logging
import os
import sys
import time

from absl import app, flags
import flax.linen as nn
import jax
from ml_collections import config_flags
from tqdm import tqdm

from diffusion_lm import checkpointing, distillation, experiment, lease, paths, sharding, tokenizers
from diffusion_lm.errors import CONFIGS_DIR, UserError, cli_main, parse_flags
from diffusion_lm.metrics import MetricWriter
from diffusion_lm.train import _check_writable, _log, _Preemption, report_final

DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "distill.py")
# Settings that must not change between a run and its resumption.
_PLAN_FIELDS = ("start_steps", "final_steps", "factor", "steps_per_round", "divergence", "teacher_from")


def _check_config(config) -> distillation.Rounds:
  d = config.distill
  rounds = distillation.Rounds(d.start_steps, d.final_steps, d.factor, d.steps_per_round)
  if d.divergence not in distillation.DIVERGENCES:
    raise UserError(f"distill.divergence={d.divergence!r}; allowed: {', '.join(distillation.DIVERGENCES)}")
  if d.teacher_from not in distillation.TEACHER_SOURCES:
    raise UserError(f"distill.teacher_from={d.teacher_from!r}; allowed: {', '.join(distillation.TEACHER_SOURCES)}")
  t = config.training
  if t.get("lora", {}).get("rank", 0):
    raise UserError(f"training.lora.rank={t.lora.rank} with distillation; allowed: 0 (the student trains whole)")
  for name in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    if isinstance(t[name], bool) or not isinstance(t[name], int) or t[name] < 1:
      raise UserError(f"training.{name}={t[name]!r}; allowed: an integer >= 1")
  if t.on_nonfinite not in ("stop", "skip"):
    raise UserError(f"training.on_nonfinite={t.on_nonfinite!r}; allowed: stop, skip")
  return rounds


def student_config(teacher_saved: dict, config, rounds: distillation.Rounds, teacher_workdir: str,
                   teacher_step: int, rounds_done: int) -> dict:
  """The student workdir's config: the teacher's model, data, tokenizer and schedule; the distillation's
  optimizer and cadence; sampling.steps at the student's step count; and the "distill" record."""
  out = json.loads(json.dumps(teacher_saved))
  out["seed"] = config.seed
  out["optimizer"] = experiment.config_to_dict(config.optimizer)
  out["training"] = {**out.get("training", {}), **experiment.config_to_dict(config.training),
                     "num_steps": rounds.total_steps, "eval_every": 0, "sample_every": 0}
  reached = rounds.student_steps(rounds_done - 1) if rounds_done else rounds.start_steps
  out["sampling"] = {**out.get("sampling", {}), "steps": reached}
  parent = teacher_saved.get("distill", {})
  out["distill"] = {
      **experiment.config_to_dict(config.distill),
      "teacher_workdir": paths.resolve(teacher_workdir),
      "teacher_checkpoint_step": teacher_step,
      # A distilled teacher's own origin, so a chain of distillations stays traceable.
      "teacher_distilled_from": parent.get("teacher_workdir", ""),
      "num_rounds": rounds.num_rounds,
      "rounds_done": rounds_done,
      "teacher_steps_reached": rounds.teacher_steps(rounds_done - 1) if rounds_done else rounds.start_steps,
      "student_steps": reached,
  }
  return out


def distill(config, teacher_workdir: str, workdir: str, stop_after: int | None = None) -> dict:
  """Distils `teacher_workdir` into `workdir` per `config`; returns the last metrics.

  `stop_after` ends this run after that many steps as if preempted (checkpoint, clean exit); rerunning
  with the same arguments resumes and finishes exactly as an uninterrupted run would.
  """
  # ------------------------------------------------------------------ config, teacher, resume check
  rounds = _check_config(config)
  workdir, teacher_workdir = paths.resolve(workdir), paths.resolve(teacher_workdir)  # gs:// stays gs://
  if workdir == teacher_workdir:
    raise UserError(f"--workdir={workdir!r} is the teacher's workdir; allowed: another directory")
  teacher_step, teacher_saved = checkpointing.read_saved_config(teacher_workdir)
  if teacher_step is None:
    raise UserError(f"--teacher_workdir={teacher_workdir!r} holds no checkpoint; train it first with "
                    "python -m diffusion_lm.train")
  if teacher_saved.get("objective") == "sft":  # its rows hold a prompt that must stay clean and unscored
    raise UserError(f"--teacher_workdir={teacher_workdir!r} holds an 'sft' model (prompt/response rows); allowed: a "
                    f"masked-diffusion or block-diffusion teacher trained on text ({', '.join(distillation.OBJECTIVES)})")
  teacher = experiment.load_trained(teacher_workdir)
  teacher_step = teacher.step  # a damaged newest teacher step falls back to an older one
  distillation.check_objective(teacher.model.config)
  _check_writable(workdir)
  with lease.held(workdir, "distill") as writer_lease:  # one writer per workdir (see lease.py)
    return _distill(config, rounds, teacher, teacher_workdir, teacher_step, teacher_saved, workdir, stop_after,
                    writer_lease)


def _distill(config, rounds, teacher, teacher_workdir, teacher_step, teacher_saved, workdir, stop_after,
             writer_lease) -> dict:
  saved_step, saved = checkpointing.read_saved_config(workdir)
  if saved is not None:
    record = saved.get("distill", {})
    if record.get("teacher_workdir") != teacher_workdir:
      raise UserError(f"workdir {workdir!r} holds a distillation of {record.get('teacher_workdir')!r}; use a new "
                      "--workdir, or rerun with that --teacher_workdir")
    for name in _PLAN_FIELDS:
      if record.get(name) != config.distill[name]:
        raise UserError(f"workdir {workdir!r} was distilled with distill.{name}={record.get(name)!r}, "
                        f"{config.distill[name]!r} requested; use a new --workdir or the same settings")
    if record.get("teacher_checkpoint_step") != teacher.step:
      raise UserError(f"the teacher workdir {teacher_workdir!r} now holds step {teacher.step}, the distillation in "
                      f"{workdir!r} started from step {record.get('teacher_checkpoint_step')}; use a new --workdir")
  mesh, model, tokenizer = teacher.mesh, teacher.model, teacher.tokenizer
  t = config.training
  if t.batch_size % sharding.data_parallel_size(mesh):
    raise UserError(f"training.batch_size={t.batch_size} is not divisible by the data-parallel size "
                    f"{sharding.data_parallel_size(mesh)}; allowed: a multiple of it")

  # ------------------------------------------------------------------ student workdir, data, state
  def config_dict(done: int) -> dict:
    return student_config(teacher_saved, config, rounds, teacher_workdir, teacher_step, done)

  student = experiment.config_from_dict(config_dict(0))
  if tokenizers.load_tokenizer(workdir) is None and jax.process_index() == 0:
    tokenizers.save_tokenizer(tokenizer, workdir)
  train_windows, _ = experiment.load_windows(student, workdir, tokenizer, student.data.train_split)
  data_iter = experiment.data.make_train_iterator(train_windows, t.batch_size, config.seed, jax.process_index(),
                                                  jax.process_count())
  tx, lr_schedule = experiment.make_optimizer(student)
  abstract_state, shardings = experiment.state_shardings(model, tx, mesh, student.data.seq_len)
  if saved_step is not None:  # the newest checkpoint that restores whole; damaged newer ones moved aside
    loader = checkpointing.make_manager(workdir, read_only=True)
    try:
      saved_step, (state, data_state, extra), damaged = checkpointing.restore_newest(
          loader, lambda s: (*checkpointing.restore(loader, s, abstract_state), checkpointing.restore_items(
              loader, s, trees={"teacher": abstract_state.params}, records=("distill_state",))), workdir)
    finally:
      loader.close()
    checkpointing.quarantine(workdir, damaged)
    paths.sync("diffusion_lm:quarantine")
  manager = checkpointing.make_manager(workdir, t.checkpoint_every, t.keep_checkpoints)
  if saved_step is not None:
    data_iter.set_state(data_state)
    teacher_params, progress = extra["teacher"], extra["distill_state"]
    _log(f"resumed from checkpoint step {saved_step} in {workdir} (round {progress['round'] + 1} of "
         f"{rounds.num_rounds}, teacher {progress['teacher_steps']} steps)")
  else:
    copy = jax.jit(lambda p: jax.tree.map(lambda x: x + 0, p), out_shardings=shardings.params)
    init = jax.jit(lambda p, q: experiment.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p,
                                                      ema_params=q, opt_state=tx.init(p)),
                   out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      state = init(copy(teacher.params), copy(teacher.params))
      teacher_params = copy(teacher.params)
    if jax.process_index() == 0:
      paths.write_bytes(paths.join(workdir, "config.json"), json.dumps(config_dict(0), indent=2).encode())
  del teacher  # its parameters live on as round 0's teacher
  start_step = int(state.step)
  if start_step >= rounds.total_steps:
    manager.close()
    _log(f"{workdir} already holds the finished distillation ({rounds.num_rounds} round(s), "
         f"{rounds.final_steps}-step student); nothing to do")
    return {}
  _log(f"distilling {teacher_workdir} (step {teacher_step}, {objective_name(model)}) into {workdir}: "
       f"{rounds.num_rounds} round{'s' if rounds.num_rounds > 1 else ''} {' -> '.join(str(rounds.teacher_steps(r)) for r in range(rounds.num_rounds + 1))}"
       f" steps, {rounds.steps_per_round} optimizer steps each, batch {t.batch_size} x {student.data.seq_len}")

  # ------------------------------------------------------------------ compiled steps
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step_fn = jax.jit(
      lambda state, teacher_params, tokens, key, dt: distillation.distill_step(
          state, teacher_params, tokens, key, dt, model=model, tx=tx, schedule=experiment.schedule_from_config(student),
          mask_id=tokenizer.mask_id, ema_decay=config.optimizer.ema_decay, num_steps=rounds.factor,
          kind=config.distill.divergence),
      in_shardings=(shardings, shardings.params, sharding.batch_sharding(mesh), replicated, replicated),
      out_shardings=(shardings, replicated), donate_argnums=0)
  copy_params = jax.jit(lambda p: jax.tree.map(lambda x: x + 0, p), out_shardings=shardings.params)
  evaluator = None
  if config.distill.eval_each_round:
    eval_windows, _ = experiment.load_windows(student, workdir, tokenizer, student.data.eval_split)
    evaluator = experiment.Evaluator(model, experiment.schedule_from_config(student), tokenizer.mask_id, mesh,
                                     shardings.params, student.evaluation, student.objective, tokenizer.eos_id)

  # ------------------------------------------------------------------ loop
  writer = MetricWriter(workdir)
  preemption = _Preemption()
  if jax.process_count() == 1:
    preemption.install()
  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  total = rounds.total_steps
  bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, disable=jax.process_index() != 0,
             file=sys.stderr, mininterval=1.0)
  last, window = {}, {"start": time.time(), "steps": 0, "loss": 0.0}

  def progress_record(step_done: int) -> dict:
    r = min((step_done - 1) // rounds.steps_per_round, rounds.num_rounds - 1) if step_done else 0
    return {"step": step_done, "round": r, "teacher_steps": rounds.teacher_steps(r),
            "student_steps": rounds.student_steps(r), "rounds_done": step_done // rounds.steps_per_round}

  def save(step_done: int, force: bool = False):
    progress = progress_record(step_done)
    checkpointing.save(manager, step_done, state, data_iter.get_state(), config_dict(progress["rounds_done"]),
                       force=force, trees={"teacher": teacher_params}, records={"distill_state": progress})

  def consume(step_done: int, metrics) -> None:
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
      if t.on_nonfinite == "skip":
        _log(f"step {step_done}: non-finite loss or gradient, update skipped")
      else:
        manager.wait_until_finished()
        raise FloatingPointError(f"non-finite distillation loss or gradient at step {step_done}; the update was "
                                 f"skipped and distillation stopped. Last good checkpoint: {manager.latest_step()}")
    window["steps"] += 1
    window["loss"] += float(metrics["loss"])
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
    if step_done % t.log_every == 0 or step_done % rounds.steps_per_round == 0:
      elapsed = time.time() - window["start"]
      progress = progress_record(step_done)
      scalars = {f"distill/{k}": float(v) for k, v in metrics.items() if k != "finite"}
      scalars.update({"distill/mean_loss": window["loss"] / window["steps"], "distill/round": progress["round"],
                      "distill/teacher_steps": progress["teacher_steps"],
                      "distill/learning_rate": float(lr_schedule(step_done - 1)),
                      "distill/steps_per_sec": window["steps"] / max(elapsed, 1e-9)})
      writer.write_scalars(step_done, scalars)
      last.update(scalars)
      window.update(start=time.time(), steps=0, loss=0.0)

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    try:
      for step in range(start_step, total):
        writer_lease.check()
        if step and step % rounds.steps_per_round == 0:
          # A new round: this round's student becomes the teacher.
          source = state.params if config.distill.teacher_from == "params" else state.ema_params
          teacher_params = copy_params(source)
        r = step // rounds.steps_per_round
        rows = next(data_iter)
        batch = sharding.global_batch_from_local(rows, mesh)
        state, metrics = step_fn(state, teacher_params, batch, key, jax.numpy.float32(1.0 / rounds.teacher_steps(r)))
        step_done = step + 1
        consume(step_done, metrics)
        round_end = step_done % rounds.steps_per_round == 0
        if stop_after is not None and step_done - start_step >= stop_after:
          preemption.requested = True
        if round_end:
          progress = progress_record(step_done)
          message = (f"round {progress['round'] + 1}/{rounds.num_rounds} done: teacher {progress['teacher_steps']} "
                     f"-> student {progress['student_steps']} steps, mean loss of the last steps "
                     f"{last.get('distill/mean_loss', float('nan')):.4f}")
          if evaluator is not None:
            result = evaluator(state.ema_params, eval_windows)
            scalars = {f"eval/{k}": v for k, v in result.items() if not isinstance(v, bool)}
            writer.write_scalars(step_done, scalars)
            last.update(scalars)
            message += f"; student validation bits/char {result['bits_per_char']:.4f} (ELBO bound)"
          _log(message)
          if jax.process_index() == 0:
            paths.write_bytes(paths.join(workdir, "config.json"),
                               json.dumps(config_dict(progress["rounds_done"]), indent=2).encode())
        if round_end or preemption.requested or manager.should_save(step_done):
          save(step_done, force=round_end or preemption.requested or step_done == total)
        if preemption.requested:
          manager.wait_until_finished()
          _log(f"stopped early: saved checkpoint at step {step_done}; rerun the same command to resume")
          break
    finally:
      bar.close()
      manager.wait_until_finished()
      manager.close()
      writer.close()
  return last


def objective_name(model) -> str:
  return "block diffusion" if model.config.block_size else "masked diffusion"


FLAGS = flags.FLAGS


def define_flags():
  """Defines this command's flags (only when run as a command, so the module imports cleanly)."""
  # No default here: ml_collections would load a default at definition, where an override's error is a
  # traceback; parse_with_default_config names it on the command line instead.
  config_flags.DEFINE_config_file("config", None, f"Distillation configuration file (default {DEFAULT_CONFIG}).",
                                  lock_config=True)
  flags.DEFINE_string("teacher_workdir", None, "Trained masked- or block-diffusion workdir to distil.")
  flags.DEFINE_string("workdir", None, "Directory of the student (checkpoints, tokenizer, logs).")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  if not FLAGS.teacher_workdir:
    raise UserError("--teacher_workdir is required, e.g. --teacher_workdir=runs/demo")
  if not FLAGS.workdir:
    raise UserError("--workdir is required, e.g. --workdir=runs/demo_distill")
  logging.getLogger("absl").setLevel(logging.WARNING)
  report_final(distill, FLAGS.config, FLAGS.teacher_workdir, FLAGS.workdir)


def parse_with_default_config(argv):
  """parse_flags, with --config=configs/distill.py when the command line names no config."""
  if not any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in argv[1:]):
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  return parse_flags(argv)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_with_default_config)
