"""Entry points: a bad --config or choice flag is one `error:` line (exit 2); --help lists the choices."""

import os
import subprocess
import sys

import pytest

from diffusion_lm import sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("module, args", [
    ("diffusion_lm.train", ["--config=configs/nope.py", "--workdir=WORKDIR"]),
    # With an override ml_collections reads the missing config while parsing, an OSError there.
    ("diffusion_lm.train", ["--config", "configs/nope.py", "--workdir=WORKDIR", "--config.training.num_steps=3"]),
    ("diffusion_lm.bench", ["--config=configs/nope.py:arg", "--parts=train"]),
    ("diffusion_lm.aot", ["--config=configs/nope.py", "--topology=v5e:2x2"]),
])
def test_missing_config_file_is_one_line(module, args, tmp_path):
  out = _cli(module, *[a.replace("WORKDIR", str(tmp_path / "run")) for a in args])
  assert out.returncode == 2, out.stderr
  lines = out.stderr.splitlines()
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith("error: --config=configs/nope.py: no such file; allowed: a Python config file "
                             "defining get_config(), e.g. configs/tiny.py (configs/ holds "), lines[0]
  assert "demo.py" in lines[0] and not os.path.exists(tmp_path / "run")


def test_config_that_is_a_folder_is_one_line(tmp_path):
  out = _cli("diffusion_lm.train", "--config=configs", f"--workdir={tmp_path}")
  assert out.returncode == 2 and out.stderr.splitlines() == [out.stderr.strip()], out.stderr
  assert out.stderr.startswith("error: --config=configs: not a file; allowed: a Python config file")


def test_help_lists_the_choices_of_choice_flags():
  # absl wraps long choice lists anywhere, even inside a name: compare without whitespace.
  sample = "".join(_cli("diffusion_lm.sample", "--help").stdout.split())
  for name, choices in (("sampler", sampling.SAMPLERS), ("time_grid", sampling.TIME_GRIDS),
                        ("confidence", sampling.CONFIDENCES + tuple(sampling.CONFIDENCE_ALIASES)),
                        ("commit_schedule", sampling.COMMIT_SCHEDULES)):
    assert f"--{name}:<{'|'.join(choices)}>" in sample, name
  evaluate = " ".join(_cli("diffusion_lm.evaluate", "--help").stdout.split())
  assert f"--sampler: <{'|'.join(sampling.SAMPLERS)}>" in evaluate
  bench = " ".join(_cli("diffusion_lm.bench", "--help").stdout.split())
  assert f"choices: {', '.join(sampling.SAMPLERS)}" in bench and "choices: train, sampling, quality" in bench


@pytest.mark.parametrize("module, flag", [
    ("diffusion_lm.sample", "--confidence=maxprob"),
    ("diffusion_lm.sample", "--time_grid=log"),
    ("diffusion_lm.sample", "--commit_schedule=exp"),
    ("diffusion_lm.evaluate", "--sampler=greedy"),
])
def test_bad_choice_is_one_line_naming_the_choices(module, flag, tmp_path):
  out = _cli(module, f"--workdir={tmp_path}", flag)
  assert out.returncode == 2
  name = flag.split("=")[0].lstrip("-")
  choices = {"confidence": sampling.CONFIDENCES + tuple(sampling.CONFIDENCE_ALIASES), "time_grid": sampling.TIME_GRIDS,
             "commit_schedule": sampling.COMMIT_SCHEDULES, "sampler": sampling.SAMPLERS}[name]
  assert out.stderr.splitlines() == [f"error: flag {flag}: value should be one of <{'|'.join(choices)}>"], out.stderr
