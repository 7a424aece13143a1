"""Launch scripts and the Colab notebook, as far as a CPU machine allows."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_code_cells_run_on_cpu(tmp_path, monkeypatch, data_cache):
  nb = json.load(open(os.path.join(ROOT, "launch", "colab_tpu.ipynb")))
  monkeypatch.setenv("DEMO_CONFIG", "tiny")
  monkeypatch.setenv("DEMO_STEPS", "4")
  monkeypatch.setenv("DEMO_WORKDIR", str(tmp_path / "run"))
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(ROOT)
  namespace = {}
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    # Shell lines and magics (the install) are for Colab; the rest is plain Python.
    source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    source = source.replace("config.training.num_steps = ", f"config.data.cache_dir = {data_cache!r}\n"
                            "config.training.num_steps = ", 1)
    exec(compile(source, "colab_tpu.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["run"].step == 4
  html = open(tmp_path / "denoise.html").read()
  assert "const frames" in html


def test_tpu_vm_script_dry_run():
  env = {**os.environ, "DRY_RUN": "1"}
  out = subprocess.run(["bash", "launch/tpu_vm.sh", "train", "tpu1", "zone-a", "configs/text8.py", "/gcs/b/run",
                        "--config.training.num_steps=10"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert "--worker=all" in out.stdout and "python\\ -m\\ diffusion_lm.train\\ --config=configs/text8.py" in out.stdout
  assert "--distributed" in out.stdout
  bad = subprocess.run(["bash", "launch/tpu_vm.sh", "launch", "t", "z"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
  assert bad.returncode == 2 and "unknown command 'launch'" in bad.stderr


def test_local_multihost_rejects_a_bad_process_count(tmp_path):
  out = subprocess.run(["bash", "launch/local_multihost.sh", "3", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2 and "must divide 8" in out.stderr
