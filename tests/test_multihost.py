"""Two local processes x 4 CPU devices give the same run as one process x 8 devices."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  return [(r["step"], r["train/loss"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if "train/loss" in r]


def _final_params(workdir):
  from diffusion_lm import experiment
  return experiment.load_trained(workdir, use_ema=False).params  # restored onto this process's mesh


def test_two_processes_equal_one(tmp_path, data_cache):
  flags = ["--config=configs/tiny.py", f"--config.data.cache_dir={data_cache}", "--config.training.num_steps=4",
           "--config.training.checkpoint_every=2", "--config.training.sample_every=4"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.train", *flags, f"--workdir={one}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  out = subprocess.run(["bash", "launch/local_multihost.sh", "2", *flags, f"--workdir={two}"], cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, capture_output=True,
                       text=True, timeout=600)
  logs = "".join(open(os.path.join(two, f"process_{i}.log")).read()[-1500:] for i in range(2)
                 if os.path.exists(os.path.join(two, f"process_{i}.log")))
  assert out.returncode == 0, out.stderr[-2000:] + logs
  a, b = _losses(one), _losses(two)
  assert [s for s, _ in a] == [s for s, _ in b] == [2, 4]
  np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-5)
  pa, pb = _final_params(one), _final_params(two)
  import jax
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
  # Only process 0 writes logs and samples; samples are identical.
  assert open(os.path.join(one, "samples", "step_0000004.txt")).read() == \
      open(os.path.join(two, "samples", "step_0000004.txt")).read()


def test_two_processes_resume_from_their_checkpoint(tmp_path, data_cache):
  workdir = str(tmp_path / "mh")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  base = ["bash", "launch/local_multihost.sh", "2", "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.cache_dir={data_cache}", "--config.training.checkpoint_every=2"]
  first = subprocess.run(base + ["--config.training.num_steps=4"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  second = subprocess.run(base + ["--config.training.num_steps=6"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  log = open(os.path.join(workdir, "process_0.log")).read()
  assert second.returncode == 0, second.stderr[-2000:] + log[-2000:]
  assert "resumed from checkpoint step 4" in log
  from diffusion_lm import experiment
  assert experiment.load_trained(workdir).step == 6
