import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sampling_bench_emits_every_field(tmp_path):
  out_json = str(tmp_path / "bench.json")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = subprocess.run(
      [sys.executable, "-m", "diffusion_lm.bench", "--config=configs/tiny.py", "--seq_len=32",
       "--steps=4,8", "--samplers=ancestral,confidence,threshold", "--batches=4", "--parts=train,sampling",
       "--train_steps=2", f"--out={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  rows = json.load(open(out_json))
  assert [r["part"] for r in rows][:2] == ["machine", "train"] and rows[-1]["part"] == "memory"
  train = rows[1]
  assert train["tokens_per_sec"] > 0 and 0 < train["mfu"] < 2 and train["xla_flops_per_step"] > 0
  assert os.path.getsize(tmp_path / "bench.png") > 1000
  rows = [r for r in rows if r["part"] == "sampling"]
  assert [(r["sampler"], r["steps"]) for r in rows] == [
      ("ancestral", 4), ("ancestral", 8), ("confidence", 4), ("confidence", 8), ("threshold", 4), ("threshold", 8)]
  for r in rows:
    for key in ("seconds", "tokens_per_sec", "latency_per_sequence_s", "compile_s", "denoiser_calls",
                "forward_s", "overhead_vs_T_forwards", "overhead_vs_calls"):
      assert r[key] >= 0, (key, r)
    assert abs(r["tokens_per_sec"] * r["seconds"] - 4 * 32) < 1e-6 * r["tokens_per_sec"]
  confidence = [r for r in rows if r["sampler"] == "confidence"]
  assert [r["denoiser_calls"] for r in confidence] == [4, 8]
  assert "one denoiser forward" in out.stdout
