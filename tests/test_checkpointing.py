"""A damaged checkpoint never stops a command that has an intact one (checkpointing.restore_newest)."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from diffusion_lm import checkpointing, experiment
from diffusion_lm.errors import UserError
from diffusion_lm.train import train_and_evaluate


def _damage(workdir: str, step: int, kind: str) -> None:
  """What a disk, a copy or a person can do to a finished checkpoint."""
  folder = os.path.join(workdir, "checkpoints", str(step))
  data_files = glob.glob(os.path.join(folder, "state", "**", "d", "*"), recursive=True)  # the arrays' bytes
  assert data_files
  if kind == "truncated":
    for path in data_files:
      os.truncate(path, os.path.getsize(path) // 2)
  elif kind == "overwritten":
    for i, path in enumerate(data_files):
      with open(path, "wb") as f:
        f.write(np.random.default_rng(i).bytes(os.path.getsize(path)))
  elif kind == "metadata":
    with open(os.path.join(folder, "state", "_METADATA"), "wb") as f:
      f.write(np.random.default_rng(1).bytes(500))
  elif kind == "emptied":
    for entry in os.listdir(folder):
      path = os.path.join(folder, entry)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  else:
    raise ValueError(kind)


def _pristine_params(workdir: str, step: int):
  """The EMA params of `step`, restored straight from an undamaged workdir by orbax (no fallback)."""
  run = experiment.load_trained(workdir)
  abstract, _ = experiment.state_shardings(run.model, experiment.make_optimizer(run.config)[0], run.mesh,
                                           run.config.data.seq_len)
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    state, _ = checkpointing.restore(manager, step, abstract)
  finally:
    manager.close()
  return state.ema_params


@pytest.mark.parametrize("kind", ["truncated", "overwritten", "metadata", "emptied"])
def test_loading_falls_back_past_a_damaged_latest_checkpoint(trained_workdir, tmp_path, capfd, kind):
  import diffusion_lm
  assert sorted(int(s) for s in os.listdir(os.path.join(trained_workdir, "checkpoints"))) == [2, 4, 6]
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_workdir, workdir)
  _damage(workdir, 6, kind)
  run = diffusion_lm.load(workdir)  # what sample and evaluate call
  assert run.step == 4
  expected = _pristine_params(trained_workdir, 4)
  for a, b in zip(jax.tree.leaves(run.trained.params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err  # late reads of the failed attempt
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "step 6" in warnings[0] and "using step 4" in warnings[0], warnings
  if kind == "emptied":
    assert "the folder is empty" in warnings[0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]  # loading moves nothing


def test_no_intact_checkpoint_is_one_line_naming_the_newest_damaged_step(trained_workdir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_workdir, workdir)
  for step, kind in ((6, "truncated"), (4, "metadata"), (2, "emptied")):
    _damage(workdir, step, kind)
  with pytest.raises(UserError) as e:
    experiment.load_trained(workdir)
  message = str(e.value)
  assert "\n" not in message and "no intact checkpoint: step 6 is damaged" in message
  assert "steps 4, 2" in message and "OUT_OF_RANGE" in message


def test_training_resumes_from_the_newest_intact_checkpoint(trained_workdir, tmp_path, tiny_config):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_workdir, workdir)
  _damage(workdir, 6, "truncated")
  reference = str(tmp_path / "reference")  # the same run, never damaged, trained on from step 4
  shutil.copytree(trained_workdir, reference)
  shutil.rmtree(os.path.join(reference, "checkpoints", "6"))
  tiny_config.training.update(num_steps=8, checkpoint_every=2, sample_every=4)
  train_and_evaluate(tiny_config, workdir)
  train_and_evaluate(tiny_config, reference)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6", "8"]
  moved = os.listdir(os.path.join(workdir, "damaged_checkpoints"))
  assert len(moved) == 1 and moved[0].startswith("6-")
  a, b = experiment.load_trained(workdir), experiment.load_trained(reference)
  assert a.step == b.step == 8
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps[-1] == 8
