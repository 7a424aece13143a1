"""Ahead-of-time TPU compilation of a small config (needs libtpu: pip install -r requirements-tpu.txt)."""

import os
import subprocess
import sys

import pytest

from diffusion_lm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
libtpu = pytest.importorskip("libtpu", reason="libtpu not installed (requirements-tpu.txt)")


def test_tiny_config_compiles_for_a_v5e_slice(tiny_config):
  from diffusion_lm import aot
  result = aot.check(tiny_config, "v5e:2x2", log=lambda m: None)
  assert result["chips"] == 4 and result["mesh"]["data"] == 4 and result["fits"]
  assert 0 < result["train_memory_gib_per_chip"] < 1 and result["xla_flops_per_chip_step"] > 0
  assert result["xla_estimated_step_s"] > 0 and result["tokens_per_s_per_chip"] > 0
  assert result["sampler_memory_gib_per_chip"] > 0 and result["sampler_estimated_s"] > 0
  # configs/tiny.py computes in float32, which JAX's default precision runs as one bf16 MXU pass on a TPU:
  # the v5e's published 197 TFLOP/s per chip (Google Cloud TPU v5e docs) is the MFU denominator.
  assert result["peak_flops_per_chip"] == 197e12 and "TPU v5e" in result["peak_source"]
  assert "one bfloat16 MXU pass" in result["peak_source"]


def test_mfu_estimate_uses_the_config_dtype_peak_and_real_vocabulary(tiny_config):
  from diffusion_lm import aot
  tiny_config.model.dtype = "bfloat16"
  result = aot.check(tiny_config, "v6e:2x2", vocab_size=40, log=lambda m: None)
  assert result["peak_flops_per_chip"] == 918e12 and "TPU v6e published bfloat16 peak" in result["peak_source"]
  # Model FLOPs per token of the tiny model (2 layers, d 32, MLP 64, 32 positions) counted by hand, with the
  # head over the 40 real tokens (not the 128 padded rows): N = 2 x (4 x 32 x 32 + 3 x 32 x 64) + 32 x 40.
  flops_per_token = 3 * (2 * (2 * 10240 + 1280) + 2 * 2 * 2 * 32 * 32)
  expected = result["tokens_per_s_per_chip"] * flops_per_token / 918e12
  assert abs(result["mfu_estimate"] - expected) < 1e-9 * expected


def test_fsdp_shards_memory_across_chips(tiny_config):
  from diffusion_lm import aot
  tiny_config.model.update(d_model=256, mlp_dim=1024, num_layers=4)
  replicated = aot.check(tiny_config, "v5e:2x2", log=lambda m: None)
  tiny_config.mesh.update(data=1, fsdp=-1)
  sharded = aot.check(tiny_config, "v5e:2x2", log=lambda m: None)
  assert sharded["mesh"]["fsdp"] == 4
  assert sharded["train_memory_gib_per_chip"] < 0.6 * replicated["train_memory_gib_per_chip"]


def test_bad_topologies(tiny_config):
  from diffusion_lm import aot
  with pytest.raises(UserError, match="topology 'v9x:2x2'; allowed: CHIP:SHAPE"):
    aot.check(tiny_config, "v9x:2x2")
  with pytest.raises(UserError, match="unknown topology 'v5e:3x7'"):
    aot.check(tiny_config, "v5e:3x7")
  tiny_config.training.batch_size = 6
  with pytest.raises(UserError, match="batch_size=6 is not divisible by the data-parallel size 4 of v5e:2x2"):
    aot.check(tiny_config, "v5e:2x2")


def test_aot_cli_prints_figures():
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.aot", "--config=configs/tiny.py", "--topology=v5e:2x2"],
                       cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "GiB per chip of 16 GiB HBM" in out.stdout and "fits: yes" in out.stdout


@pytest.mark.parametrize("objective, block_size", [("block", 4), ("ar", 0)])
def test_block_and_ar_configs_compile_their_own_decoders(tiny_config, objective, block_size):
  from diffusion_lm import aot
  tiny_config.objective = objective
  tiny_config.model.block_size = block_size
  tiny_config.sampling.update(name="threshold" if objective == "block" else "ancestral", steps=4)
  result = aot.check(tiny_config, "v5e:2x2", log=lambda m: None)
  assert result["objective"] == objective and result["sampler_memory_gib_per_chip"] > 0
  # Cached decoding is no T-forward loop: no T x forward estimate is claimed for it.
  assert "sampler_estimated_s" not in result


def test_a_model_too_large_for_the_slice_is_one_line(tiny_config):
  from diffusion_lm import aot
  # ~2.1B float32 parameters, replicated on each of 4 v5e chips (16 GiB HBM): state alone ~34 GB per chip.
  tiny_config.model.update(d_model=8192, mlp_dim=32768, num_heads=64, num_layers=2)
  with pytest.raises(UserError, match=r"the train step does not fit on v5e:2x2: .*RESOURCE_EXHAUSTED.*; allowed: "):
    aot.check(tiny_config, "v5e:2x2", log=lambda m: None)


def test_lora_sft_compiles_with_a_bfloat16_base(tiny_config):
  """LoRA (training.lora): the step trains the adapters alone; the frozen base is counted once, in bfloat16."""
  from diffusion_lm import aot
  tiny_config.objective, tiny_config.data.source = "sft", "jsonl"
  tiny_config.training.lora.update(rank=2, base_dtype="bfloat16")
  result = aot.check(tiny_config, "v5e:2x2", log=lambda m: None)
  # 2 blocks x (query, key, value, out, wi_gate, wi_up, wo), a and b of rank 2 each (d 32, MLP 64)
  assert result["trained_params"] == 2 * 2 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))
  assert result["params"] > result["trained_params"] and result["fits"]
