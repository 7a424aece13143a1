"""Never lose a run: kills at random moments, non-finite values, storage faults, dead hosts, safe loading."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_lm import checkpointing, experiment
from diffusion_lm.errors import UserError
from diffusion_lm.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}


def _train_cmd(workdir, data_cache, num_steps):
  return [sys.executable, "-m", "diffusion_lm.train", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.cache_dir={data_cache}", f"--config.training.num_steps={num_steps}",
          "--config.training.checkpoint_every=1", "--config.training.keep_checkpoints=2",
          "--config.training.log_every=1"]


def _params(workdir):
  run = experiment.load_trained(workdir, use_ema=False)
  ema = experiment.load_trained(workdir, use_ema=True)
  return run.step, jax.tree.leaves(run.params) + jax.tree.leaves(ema.params)


def fault_injection(tmp_path, data_cache, kills: int, num_steps: int, seed: int = 0) -> dict:
  """SIGKILLs training `kills` times at random moments, rerunning the same command after each kill.

  Returns figures: kills injected and survived, resume times, and whether the final parameters
  equal an uninterrupted run's bit for bit.
  """
  rng = random.Random(seed)
  reference = str(tmp_path / "reference")
  subprocess.run(_train_cmd(reference, data_cache, num_steps), cwd=ROOT, env=ENV, check=True,
                 capture_output=True, timeout=600)
  workdir = str(tmp_path / "killed")
  cmd = _train_cmd(workdir, data_cache, num_steps)
  injected, resumed_from, finished = 0, [], False
  metrics = os.path.join(workdir, "metrics.jsonl")
  while injected < kills:
    logged = sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Every other kill lands during start-up (restore, compile); the rest once this run is training,
    # where a checkpoint is being written after every step.
    if injected % 2:
      time.sleep(rng.uniform(0.5, 6.0))
    else:
      while proc.poll() is None and (sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0) <= logged:
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is not None:
      finished = proc.returncode == 0
      assert proc.returncode == 0, proc.stderr.read()[-2000:]
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    injected += 1
    step, _ = checkpointing.read_saved_config(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) \
        else (None, None)
    resumed_from.append(step)
  start = time.time()
  final = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  step_a, a = _params(reference)
  step_b, b = _params(workdir)
  identical = step_a == step_b == num_steps and all(np.array_equal(np.asarray(x), np.asarray(y))
                                                    for x, y in zip(a, b))
  return {"kills_injected": injected, "kills_survived": injected if identical else 0,
          "finished_before_kill": finished, "checkpoint_steps_at_kills": resumed_from,
          "final_run_seconds": time.time() - start, "bit_identical": identical}


def test_kills_resume_bit_identically(tmp_path, data_cache):
  figures = fault_injection(tmp_path, data_cache, kills=3, num_steps=120)
  print(json.dumps(figures))
  assert figures["bit_identical"], figures


@pytest.mark.slow
def test_kills_resume_bit_identically_long(tmp_path, data_cache):
  """The long version: 12 kills (python -m pytest tests/test_faults.py --runslow -k long -s)."""
  figures = fault_injection(tmp_path, data_cache, kills=12, num_steps=600, seed=1)
  print(json.dumps(figures))
  assert figures["kills_injected"] == 12 and figures["bit_identical"], figures


def test_partial_checkpoint_is_never_picked_up(tmp_path, tiny_config):
  tiny_config.training.update(num_steps=4, checkpoint_every=2)
  train_and_evaluate(tiny_config, str(tmp_path))
  # What a kill in the middle of a save leaves: a temporary step directory.
  partial = os.path.join(tmp_path, "checkpoints", "6.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  open(os.path.join(partial, "state", "junk"), "w").write("half written")
  step, _ = checkpointing.read_saved_config(str(tmp_path))
  assert step == 4
  tiny_config.training.num_steps = 6
  train_and_evaluate(tiny_config, str(tmp_path))
  assert checkpointing.read_saved_config(str(tmp_path))[0] == 6


def _all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def test_nonfinite_loss_stops_naming_the_step_and_last_good_checkpoint(tmp_path, tiny_config):
  tiny_config.optimizer.update(learning_rate=1e30, warmup_steps=1)
  tiny_config.training.update(num_steps=20, checkpoint_every=1)
  with pytest.raises(FloatingPointError) as e:
    train_and_evaluate(tiny_config, str(tmp_path))
  message = str(e.value)
  bad_step = int(message.split("at step ")[1].split(";")[0])
  latest = int(message.split("Last good checkpoint: ")[1].split(" ")[0])
  assert latest < bad_step
  run = experiment.load_trained(str(tmp_path), use_ema=False)
  assert run.step == latest and _all_finite(run.params)


def test_nonfinite_updates_can_be_skipped(tmp_path, tiny_config):
  tiny_config.optimizer.update(learning_rate=1e30, warmup_steps=1)
  tiny_config.training.update(num_steps=8, checkpoint_every=4, on_nonfinite="skip")
  last = train_and_evaluate(tiny_config, str(tmp_path))
  assert last["train/skipped_steps"] > 0
  run = experiment.load_trained(str(tmp_path), use_ema=False)
  assert run.step == 8 and _all_finite(run.params)


def test_full_disk_is_a_clear_error_and_keeps_checkpoints(tmp_path, tiny_config, monkeypatch):
  tiny_config.training.update(num_steps=6, checkpoint_every=2)
  real_save = checkpointing.save

  def failing_save(manager, step, *args, **kwargs):
    if step >= 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpointing, "save", failing_save)
  with pytest.raises(UserError) as e:
    train_and_evaluate(tiny_config, str(tmp_path))
  assert "could not write the checkpoint of step 4" in str(e.value)
  assert "No space left on device" in str(e.value) and "latest: 2" in str(e.value)
  assert experiment.load_trained(str(tmp_path)).step == 2
  monkeypatch.setattr(checkpointing, "save", real_save)
  train_and_evaluate(tiny_config, str(tmp_path))  # space is back: the same call resumes and finishes
  assert experiment.load_trained(str(tmp_path)).step == 6


def test_unwritable_workdir(tmp_path, tiny_config):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(UserError, match="is not writable"):
    train_and_evaluate(tiny_config, str(blocker / "run"))


def test_loading_never_unpickles(trained_workdir, monkeypatch):
  import pickle

  def refuse(*args, **kwargs):
    raise AssertionError("pickle used while loading")

  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)
  run = experiment.load_trained(trained_workdir)
  assert run.step == 6 and _all_finite(run.params)


def test_a_dead_process_makes_the_others_exit(tmp_path, data_cache):
  workdir = str(tmp_path / "mh")
  os.makedirs(workdir)
  port = 20000 + random.Random(os.getpid()).randrange(20000)
  procs = []
  for i in range(2):
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = _train_cmd(workdir, data_cache, 100_000) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
        "--heartbeat_timeout=10"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
  deadline = time.time() + 120
  while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and time.time() < deadline:
    time.sleep(0.5)
  assert os.path.exists(os.path.join(workdir, "metrics.jsonl")), "training did not start"
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  try:
    returncode = procs[0].wait(timeout=90)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert returncode != 0 and time.time() - killed_at < 90


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_cache):
  workdir = str(tmp_path / "pre")
  proc = subprocess.Popen(_train_cmd(workdir, data_cache, 100_000), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and time.time() < deadline:
    time.sleep(0.2)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 0, stderr[-2000:]
  assert "saved checkpoint at step" in stderr
  saved = int(stderr.split("saved checkpoint at step ")[1].split(";")[0])
  assert checkpointing.read_saved_config(workdir)[0] == saved > 0


def test_sigterm_on_one_process_saves_the_same_step_on_all(tmp_path, data_cache):
  """Preemption notice to one host: every process agrees on the step, saves it, and exits cleanly."""
  workdir = str(tmp_path / "mhpre")
  os.makedirs(workdir)
  port = 20000 + random.Random(os.getpid() + 1).randrange(20000)
  procs = []
  for i in range(2):
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = _train_cmd(workdir, data_cache, 100_000) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True))
  deadline = time.time() + 120
  while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and time.time() < deadline:
    time.sleep(0.5)
  time.sleep(2.0)
  procs[1].send_signal(signal.SIGTERM)
  try:
    errs = [p.communicate(timeout=120)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errs]
  saved = int(errs[0].split("saved checkpoint at step ")[1].split(";")[0])
  assert checkpointing.read_saved_config(workdir)[0] == saved > 0
