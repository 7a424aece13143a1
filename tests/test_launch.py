"""Launch scripts and the Colab notebook, as far as a CPU machine allows."""

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import tarfile
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _notebook_code_cells() -> list:
  nb = json.load(open(os.path.join(ROOT, "launch", "colab_tpu.ipynb"), encoding="utf-8"))
  return ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "code"]


def test_colab_notebook_has_no_placeholders_or_test_hooks():
  cells = _notebook_code_cells()
  code = "\n".join(cells)
  assert not re.search(r"<[A-Za-z][^<>\n]*>", code), "a <placeholder> left in a code cell"
  assert "os.environ" not in code and "DEMO_" not in code  # the test injects its settings from outside
  # Plain Python (no ! or % lines), so the cells run the same here as on Colab.
  assert not [line for cell in cells for line in cell.splitlines() if line.lstrip().startswith(("!", "%"))]


def test_colab_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch, data_cache):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(ROOT)
  workdir = str(tmp_path / "run")
  namespace, injected = {}, set()
  for source in _notebook_code_cells():
    code = compile(source, "colab_tpu.ipynb", "exec")
    if "jax.default_backend() != \"tpu\"" in source:
      # On a CPU the runtime check stops the notebook with one line; the test goes on past it.
      with pytest.raises(SystemExit, match=r"^no TPU attached \(JAX sees cpu") as stop:
        exec(code, namespace)  # pylint: disable=exec-used
      assert "\n" not in str(stop.value)
      continue
    exec(code, namespace)  # pylint: disable=exec-used
    # Injected from outside, right after the cells that set them: a tiny run in a temporary folder.
    if "WORKDIR" in namespace and "settings" not in injected:
      namespace.update(CONFIG="tiny", NUM_STEPS=4, WORKDIR=workdir)
      injected.add("settings")
    if "config" in namespace and "config" not in injected:
      namespace["config"].data.cache_dir = data_cache
      injected.add("config")
  assert injected == {"settings", "config"}
  assert namespace["run"].step == 4 and namespace["run"].workdir == workdir
  # The curves cell plotted metrics.jsonl: its train line holds the logged values, read here independently.
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = sorted((r["step"], r["train/bits_per_token"]) for r in logged if "train/bits_per_token" in r)
  line = plt.figure(plt.get_fignums()[-1]).axes[0].lines[0]
  assert list(zip(line.get_xdata().tolist(), line.get_ydata().tolist())) == train == [
      (2, train[0][1]), (4, train[1][1])]
  html = open(tmp_path / "denoise.html", encoding="utf-8").read()
  assert "const frames" in html


def test_colab_notebook_install_cell_says_what_to_set(tmp_path, monkeypatch):
  install = _notebook_code_cells()[0]
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *args: None if name == "diffusion_lm" else real_find_spec(name, *args))
  monkeypatch.chdir(tmp_path)  # no checkout here nor in the parent folder
  with pytest.raises(SystemExit, match="set PACKAGE_SOURCE to a pip source"):
    exec(compile(install, "colab_tpu.ipynb", "exec"), {})  # pylint: disable=exec-used


def _dry_run(*args, **env):
  """The commands launch/tpu_vm.sh would run, each as an argv list, and its stderr."""
  out = subprocess.run(["bash", "launch/tpu_vm.sh", *args], cwd=ROOT, env={**os.environ, "DRY_RUN": "1", **env},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines()], out.stderr


def _ssh_command(argv):
  """The shell command of a `gcloud ... tpu-vm ssh --worker=all --command=...` argv, split into words."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in argv, argv
  (command,) = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
  return shlex.split(command)


@pytest.mark.parametrize("accelerator, runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-8", "v2-alpha-tpuv6e"), ("v5p-16", "v2-alpha-tpuv5"),
    ("v4-32", "tpu-ubuntu2204-base")])
def test_tpu_vm_create_picks_the_runtime_for_the_accelerator(accelerator, runtime):
  (create,), _ = _dry_run("create", "tpu1", "zone-a", accelerator)
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu1", "--zone=zone-a",
                    f"--accelerator-type={accelerator}", f"--version={runtime}"]
  (create,), _ = _dry_run("create", "tpu1", "zone-a", accelerator, TPU_SOFTWARE_VERSION="custom", TPU_PROJECT="p")
  assert create[-3:] == ["--project=p", f"--accelerator-type={accelerator}", "--version=custom"]


def test_tpu_vm_setup_ships_the_project_and_a_python_jax_accepts(tmp_path):
  (tar, scp, ssh), _ = _dry_run("setup", "tpu1", "zone-a", TMPDIR=str(tmp_path))
  tarball = str(tmp_path / "diffusion_lm-tpu1.tgz")
  assert tar[:3] == ["tar", "-czf", tarball] and scp[-2:] == [tarball, "tpu1:diffusion_lm.tgz"]
  subprocess.run(tar, check=True, timeout=120)  # the tarball itself: the project without .git and runs
  members = {m.removeprefix("./") for m in tarfile.open(tarball).getnames()}
  assert {"pyproject.toml", "requirements-tpu.txt", "diffusion_lm/train.py", "configs/lm1b.py"} <= members
  assert not [m for m in members if m.split("/")[0] in (".git", "runs") or "__pycache__" in m]
  words = _ssh_command(ssh)
  # The venv's Python satisfies both the project's and the installed jax's Requires-Python.
  python = words[words.index("--python", words.index("venv")) + 1]
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    requires = tomllib.load(f)["project"]["requires-python"]
  for spec in [requires, importlib.metadata.metadata("jax")["Requires-Python"]]:
    assert SpecifierSet(spec).contains(python + ".0"), (spec, python)
  assert not any("gcsfuse" in w for w in words)
  install = words[words.index("pip", words.index("venv")):]
  assert install[-2:] == ["-e", ".[tpu,gcs]"] and "--python" in install
  too_old = subprocess.run(["bash", "launch/tpu_vm.sh", "setup", "t", "z"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "DRY_RUN": "1", "PYTHON_VERSION": "3.10"}, timeout=60)
  assert too_old.returncode == 2 and "PYTHON_VERSION=3.10; allowed: 3.11 or newer" in too_old.stderr


def test_tpu_vm_train_runs_the_same_command_on_every_worker():
  (ssh,), err = _dry_run("train", "tpu1", "zone-a", "configs/text8.py", "gs://b/run", "--config.training.num_steps=10")
  words = _ssh_command(ssh)
  assert words[:3] == ["cd", "~/diffusion_lm", "&&"] and err == ""
  assert words[3:] == ["~/.venvs/diffusion_lm/bin/python", "-m", "diffusion_lm.train", "--config=configs/text8.py",
                       "--workdir=gs://b/run", "--distributed", "--config.training.num_steps=10"]
  (ssh,), _ = _dry_run("train", "tpu1", "zone-a", "configs/text8.py", "gs://b/run")
  assert _ssh_command(ssh)[-1] == "--distributed"  # no stray empty argument without overrides
  (ssh,), err = _dry_run("train", "tpu1", "zone-a", "configs/text8.py", "/tmp/run", BACKGROUND="1")
  assert _ssh_command(ssh)[3] == "nohup" and _ssh_command(ssh)[-6:] == [">", "train.log", "2>&1", "<", "/dev/null", "&"]
  assert "not gs://" in err
  bad = subprocess.run(["bash", "launch/tpu_vm.sh", "launch", "t", "z"], cwd=ROOT, env={**os.environ, "DRY_RUN": "1"},
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown command 'launch'" in bad.stderr


def test_local_multihost_rejects_a_bad_process_count(tmp_path):
  out = subprocess.run(["bash", "launch/local_multihost.sh", "3", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2 and "must divide 8" in out.stderr
