import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from diffusion_lm import bench, experiment
from diffusion_lm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _devices(kind, platform, count):
  return [types.SimpleNamespace(device_kind=kind, platform=platform, id=i) for i in range(count)]


def _no_measure(dtype, device):
  raise AssertionError(f"measured a {dtype} matmul on {device.device_kind} where a published peak exists")


@pytest.mark.parametrize("kind, dtype, per_device, names", [
    ("TPU v5 lite", "bfloat16", 197e12, "TPU v5e"),  # Google Cloud TPU v5e docs
    ("TPU v5 lite", "float32", 197e12, "one bfloat16 MXU pass"),  # default precision: one bf16 pass
    ("TPU v4", "bfloat16", 275e12, "TPU v4"),
    ("TPU v6 lite", "bfloat16", 918e12, "TPU v6e"),
    ("NVIDIA H200", "bfloat16", 989.5e12, "H200 datasheet"),  # 1,979 with sparsity
    ("NVIDIA H200", "float32", 494.5e12, "TF32"),  # 989 with sparsity
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12, "A100"),
])
def test_published_peak_by_device_kind_and_dtype(kind, dtype, per_device, names):
  platform = "tpu" if kind.startswith("TPU") else "gpu"
  peak = bench.select_peak(dtype, _devices(kind, platform, 4), _no_measure, precision=None)
  assert peak.per_device_flops == per_device and peak.devices == 4 and peak.flops == 4 * per_device
  assert peak.dtype == dtype and names in peak.source and "published" in peak.source
  assert f"4 x {per_device / 1e12:.1f} TFLOP/s {dtype} (" in peak.describe()


def test_unlisted_chip_or_precision_falls_back_to_a_measured_matmul_per_device():
  calls = []
  measure = lambda dtype, device: calls.append((dtype, device.id)) or 50e12  # noqa: E731
  peak = bench.select_peak("bfloat16", _devices("NVIDIA B300", "gpu", 2), measure, precision=None)
  assert calls == [("bfloat16", 0)] and peak.flops == 100e12 and "measured" in peak.source
  # float32 at "highest" runs several passes: the published single-pass figure does not apply.
  peak = bench.select_peak("float32", _devices("TPU v5 lite", "tpu", 2), measure, precision="highest")
  assert calls[-1] == ("float32", 0) and peak.flops == 100e12 and "precision highest" in peak.source


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_peak_is_measured_in_the_config_dtype_for_the_whole_host(dtype):
  calls = []
  measure = lambda d, device: calls.append(d) or 80e9  # noqa: E731
  peak = bench.select_peak(dtype, _devices("cpu", "cpu", 8), measure)
  # Simulated CPU devices share the host's cores: one measurement is the whole machine's peak.
  assert calls == [dtype] and peak.devices == 1 and peak.flops == 80e9
  assert peak.describe() == f"80.0 GFLOP/s {dtype} (measured 2048^3 {dtype} matmul on this CPU, shared by its " \
                            "8 simulated devices)"


def test_measured_matmul_runs_in_the_requested_dtype(monkeypatch):
  import jax
  seen, real_jit = [], jax.jit

  def spy(fn):
    compiled = real_jit(fn)
    return lambda x: seen.append(str(x.dtype)) or compiled(x)

  monkeypatch.setattr(jax, "jit", spy)
  assert bench.matmul_peak_flops("bfloat16", size=64) > 0 and set(seen) == {"bfloat16"}


def test_unknown_dtype_is_one_line_error():
  with pytest.raises(UserError, match=r"model.dtype='float16'; allowed: float32, bfloat16") as e:
    bench.select_peak("float16", _devices("cpu", "cpu", 1), _no_measure)
  assert "\n" not in str(e.value)


def test_entropy_per_sequence_and_pooled_by_hand():
  tokens = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
  # Per sequence: 1 bit (two tokens, half each) and 0 bits -> mean 0.5. Pooled: p = 1/4, 1/4, 1/2 -> 1.5.
  assert experiment.unigram_entropy_bits(tokens) == pytest.approx(0.5, abs=1e-12)
  assert experiment.pooled_unigram_entropy_bits(tokens) == pytest.approx(1.5, abs=1e-12)
  # Four distinct tokens per sequence: 2 bits however many sequences, while pooling grows with them.
  distinct = np.arange(16).reshape(4, 4)
  assert experiment.unigram_entropy_bits(distinct) == pytest.approx(2.0, abs=1e-12)
  assert experiment.unigram_entropy_bits(distinct[:1]) == pytest.approx(2.0, abs=1e-12)
  assert experiment.pooled_unigram_entropy_bits(distinct) == pytest.approx(4.0, abs=1e-12)
  # Ignored ids leave the histogram: 0, 0, 1 -> -(2/3 log2 2/3 + 1/3 log2 1/3).
  third = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
  assert experiment.unigram_entropy_bits(np.array([[0, 9, 0, 1]]), ignore=(9,)) == pytest.approx(third, abs=1e-12)
  with pytest.raises(UserError, match=r"sample tokens of shape \(4,\)"):
    experiment.unigram_entropy_bits(np.arange(4))


def test_bench_cli_rows_peak_and_sampling_fields(tmp_path):
  out_json = str(tmp_path / "bench.json")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = subprocess.run(
      [sys.executable, "-m", "diffusion_lm.bench", "--config=configs/tiny.py", "--config.model.dtype=bfloat16",
       "--seq_len=32", "--steps=4,8", "--samplers=ancestral,confidence,threshold", "--batches=4",
       "--parts=train,sampling", "--train_steps=2", f"--out={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  rows = json.load(open(out_json))
  assert [r["part"] for r in rows][:2] == ["machine", "train"] and rows[-1]["part"] == "memory"
  train = rows[1]
  # The peak follows the config's compute dtype and counts the host once for its 2 simulated devices.
  source = "measured 2048^3 bfloat16 matmul on this CPU, shared by its 2 simulated devices"
  assert train["peak_dtype"] == "bfloat16" and train["peak_source"] == source
  assert train["devices"] == 2 and train["peak_devices"] == 1 and train["peak_flops"] > 0
  assert f"MFU {train['mfu']:.1%} of " in out.stdout and f"bfloat16 ({source})" in out.stdout
  # XLA's flop count of the step (summed over both devices) against the hand-counted model FLOPs: XLA adds
  # the padded head columns, norms, softmax and the optimizer, never less than the model's matmuls.
  assert 1.0 < train["xla_flops_per_step"] / train["model_flops_per_step"] < 1.5
  assert os.path.getsize(tmp_path / "bench.png") > 1000
  rows = [r for r in rows if r["part"] == "sampling"]
  assert [(r["sampler"], r["steps"]) for r in rows] == [
      ("ancestral", 4), ("ancestral", 8), ("confidence", 4), ("confidence", 8), ("threshold", 4), ("threshold", 8)]
  for r in rows:
    for key in ("seconds", "tokens_per_sec", "latency_per_sequence_s", "compile_s", "denoiser_calls",
                "forward_s", "overhead_vs_calls", "tokens_per_call", "ms_per_call"):
      assert r[key] >= 0, (key, r)
    assert abs(r["tokens_per_sec"] * r["seconds"] - 4 * 32) < 1e-6 * r["tokens_per_sec"]
    # One sequence of 32 tokens holds at most 32 distinct ones; pooling can only add entropy (concavity).
    assert 0 < r["sample_entropy_bits"] <= math.log2(32) and r["pooled_entropy_bits"] >= r["sample_entropy_bits"]
  confidence = [r for r in rows if r["sampler"] == "confidence"]
  assert [r["denoiser_calls"] for r in confidence] == [4, 8]
  assert "one denoiser forward" in out.stdout


def test_bench_times_block_diffusion_per_block_past_the_trained_length(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run(
      [sys.executable, "-m", "diffusion_lm.bench", "--config=configs/tiny.py", "--config.objective=block",
       "--config.model.block_size=4", "--seq_len=48", "--block_samplers=ancestral,threshold", "--batches=2",
       "--parts=sampling", f"--out={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  rows = [r for r in json.load(open(tmp_path / "bench.json")) if r["part"] == "sampling"]
  assert [(r["model"], r["sampler"], r["steps"]) for r in rows] == [("block L'=4", "ancestral", 4),
                                                                     ("block L'=4", "threshold", 4)]
  for r in rows:
    # 12 blocks of 4 (48 tokens, past the tiny model's 32): at most 4 steps and one cache commit per block.
    assert 12 * 2 <= r["denoiser_calls"] <= 12 * 5, r
    assert abs(r["tokens_per_call"] - 48 / r["denoiser_calls"]) < 1e-9 and r["steps_per_block"]
  assert "T<=4   /block" in out.stdout
