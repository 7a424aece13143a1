"""Profiler traces of chosen steps and Weights & Biases logging (with a stand-in wandb module)."""

import json
import os
import sys
import types

import jax
import pytest

from diffusion_lm import metrics, profiling
from diffusion_lm.errors import UserError


def test_profiler_traces_each_run_of_consecutive_steps(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d, **kw: calls.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  monkeypatch.setattr(jax, "block_until_ready", lambda x: calls.append(("wait", x)) or x)
  logged = []
  profiler = profiling.StepProfiler((6, 7, 2, 3), str(tmp_path), enabled=True, log=logged.append)
  for step in range(1, 7):
    profiler.before_step(step)
    calls.append(("step", step))
    profiler.after_step(step, f"out{step}")
  profiler.close()  # the run ended inside the second traced range
  target = str(tmp_path / "profile")
  assert calls == [("step", 1), ("start", target), ("step", 2), ("step", 3), ("wait", "out3"), ("stop",),
                   ("step", 4), ("step", 5), ("start", target), ("step", 6), ("stop",)]
  assert logged == [f"profiled steps 2-3: trace in {target}", f"profiled step 6: trace in {target}"]
  for bad in [(0,), (1.5,), ("3",), (True,)]:
    with pytest.raises(UserError, match=r"training.profile_steps=.*allowed: step numbers >= 1"):
      profiling.StepProfiler(bad, str(tmp_path))


class _FakeWandb(types.ModuleType):
  """Records what the writer asks of wandb."""

  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logs, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, values, step):
    self.logs.append((step, dict(values)))

  def finish(self):
    self.finished += 1


def test_wandb_gets_the_scalars_in_one_run_per_workdir(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  for _ in range(2):  # a resumed run: the same run id
    writer = metrics.MetricWriter(str(tmp_path / "run"), enabled=True, wandb_project="proj", run_config={"seed": 3})
    writer.write_scalars(5, {"train/loss": 1.5})
    writer.write_text(5, "samples", "text is not sent")
    writer.close()
  assert fake.logs == [(5, {"train/loss": 1.5})] * 2 and fake.finished == 2
  first, second = fake.inits
  assert first == second and first["project"] == "proj" and first["resume"] == "allow"
  assert first["config"] == {"seed": 3} and first["name"] == "run"
  other = metrics.MetricWriter(str(tmp_path / "other"), enabled=True, wandb_project="proj")
  other.close()
  assert fake.inits[-1]["id"] != first["id"]
  monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
  with pytest.raises(UserError, match="training.wandb_project='proj' needs the wandb package"):
    metrics.MetricWriter(str(tmp_path / "run"), enabled=True, wandb_project="proj")
  plain = metrics.MetricWriter(str(tmp_path / "plain"), enabled=True)  # off: wandb is never imported
  plain.close()


def test_training_writes_a_trace_and_logs_to_wandb(tiny_config, tmp_path, monkeypatch):
  from diffusion_lm.train import train_and_evaluate
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  tiny_config.training.update(num_steps=4, log_every=1, checkpoint_every=4, eval_every=0, sample_every=0,
                              profile_steps=(2, 3), wandb_project="proj")
  workdir = tmp_path / "run"
  train_and_evaluate(tiny_config, str(workdir))
  (session,) = os.listdir(workdir / "profile" / "plugins" / "profile")  # one trace for steps 2-3
  files = os.listdir(workdir / "profile" / "plugins" / "profile" / session)
  assert any(f.endswith(".xplane.pb") for f in files) and any(f.endswith(".trace.json.gz") for f in files)
  lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [step for step, _ in fake.logs] == [line["step"] for line in lines]
  assert fake.logs[0][1]["train/loss"] == pytest.approx(lines[0]["train/loss"])
  assert fake.inits[0]["config"]["training"]["profile_steps"] == [2, 3] and fake.finished == 1
