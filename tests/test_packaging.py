"""Packaging: the wheel carries the corpora and configs, its dependencies are requirements.txt's, and a
--config names a shipped config from any folder."""

import email
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from diffusion_lm import errors
from diffusion_lm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(name):
  lines = [line.strip() for line in open(os.path.join(ROOT, name))]
  return [line for line in lines if line and not line.startswith(("#", "-r"))]


def test_config_path_falls_back_to_the_shipped_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a folder without configs/
  tiny = os.path.join(ROOT, "configs", "tiny.py")
  for given in ["configs/tiny.py", "tiny.py", "tiny", "./configs/tiny.py"]:
    assert os.path.samefile(errors.find_config_file(given), tiny), given
  for given in ["elsewhere/tiny.py", "configs/nope.py", "configs/__init__.py", "configs"]:
    with pytest.raises(UserError, match=f"--config={given}: no such file; allowed: a Python config file"):
      errors.find_config_file(given)
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.py").write_text("")  # a file under the current folder comes first
  assert errors.find_config_file("configs/tiny.py") == "configs/tiny.py"


def test_cli_reads_a_shipped_config_from_another_folder(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  # The override names a key the config lacks, so the run stops right after the config file was read.
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.train", "--config", "configs/demo_block.py:8",
                        f"--workdir={tmp_path / 'run'}", "--config.training.no_such_key=1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "unknown config key '--config.training.no_such_key'" in out.stderr, out.stderr


def test_wheel_holds_corpora_configs_and_the_requirements(tmp_path):
  setuptools = pytest.importorskip("setuptools")
  if int(setuptools.__version__.split(".")[0]) < 68:
    pytest.skip(f"setuptools {setuptools.__version__} predates pyproject.toml's build requirement (>= 68)")
  source = tmp_path / "src"  # a copy, so that the build leaves nothing in the working tree
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      ".git", "runs", "tests", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "--quiet", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
  (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
  names = set(zipfile.ZipFile(wheel).namelist())
  corpora = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "diffusion_lm", "corpora", "**", "*.xz"),
                                                        recursive=True)}
  configs = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  assert len(corpora) > 10 and corpora <= names, corpora - names
  assert configs <= names, configs - names
  assert "diffusion_lm/train.py" in names and not any(n.startswith("tests/") for n in names)
  meta = email.message_from_string(zipfile.ZipFile(wheel).read(next(
      n for n in names if n.endswith(".dist-info/METADATA"))).decode())
  requires = meta.get_all("Requires-Dist")
  assert [r for r in requires if "extra ==" not in r] == _requirements("requirements.txt")
  for extra, name in [("tpu", "requirements-tpu.txt"), ("gpu", "requirements-gpu.txt")]:
    assert [r.split(";")[0].strip() for r in requires if f'extra == "{extra}"' in r] == _requirements(name)
  assert meta["Requires-Python"] == ">=3.11"
