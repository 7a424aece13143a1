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


# ----------------------------------------------------------------------------- --only=sample

V5E_PEAK, V5E_HBM_BANDWIDTH = 197e12, 0.82e12  # Google Cloud TPU v5e docs: FLOP/s and bytes/s per chip


@pytest.fixture(scope="module")
def sample_only():
  """A tiny model's samplers on v5e:2x2 (prompt 8 + 24 generated in 3 blocks of 8, 6 steps), any train step
  compile failing the test."""
  from configs import tiny
  from diffusion_lm import aot, experiment
  config = tiny.get_config()
  config.sampling.update(block_length=8, steps=6)

  def no_train_step(*args, **kwargs):
    raise AssertionError("--only=sample built a train step")

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(experiment, "jit_train_step", no_train_step)
    result = aot.sample_check(config, "v5e:2x2", batches=(1, 8), decoders=("llada", "llada+prefix"),
                              prompt_length=8, gen_length=24, log=lambda m: None)
  return config, result


def test_sample_only_compiles_the_samplers_and_no_train_step(sample_only):
  _, result = sample_only
  assert [(r["decoder"], r["batch"]) for r in result["rows"]] == [
      ("llada", 1), ("llada+prefix", 1), ("llada", 8), ("llada+prefix", 8)]
  assert result["fits"] and result["param_dtype"] == "bfloat16" and "train_memory_gib_per_chip" not in result
  # batch 1 on a data axis of 4 computes 4 rows; tokens/s counts the one asked for
  assert [r["rows_computed"] for r in result["rows"]] == [4, 4, 8, 8]
  assert all(0 < r["memory_gib_per_chip"] < 1 for r in result["rows"])


def test_sample_only_roofline_is_the_slower_of_flops_and_bytes(sample_only):
  import jax
  import jax.numpy as jnp
  from diffusion_lm import aot, experiment
  config, result = sample_only
  llada8 = result["rows"][2]
  # The forward compiled here, apart from aot: one call of the tiny denoiser on 8 rows of 32 tokens.
  _, devices = aot.topology_devices("v5e:2x2")
  model = experiment.model_config(config, 256)
  from diffusion_lm.model import Transformer
  net = Transformer(model)
  params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"])
  from flax import linen as nn
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), nn.unbox(params))
  mesh = jax.make_mesh((4,), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  forward = jax.jit(lambda p, x: net.apply({"params": p}, x, None, keep_mask_logit=True),
                    in_shardings=(jax.tree.map(lambda _: replicated, params), rows))
  cost = forward.lower(params, jax.ShapeDtypeStruct((8, 32), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops, moved = cost["flops"], cost["bytes accessed"]
  assert llada8["call"]["flops"] == pytest.approx(flops) and llada8["call"]["bytes"] == pytest.approx(moved)
  seconds = max(flops / V5E_PEAK, moved / V5E_HBM_BANDWIDTH)
  assert llada8["call"]["s"] == pytest.approx(seconds, rel=1e-9)
  assert llada8["call"]["bound"] == ("compute" if flops / V5E_PEAK > moved / V5E_HBM_BANDWIDTH else "memory")
  # AR-equivalent: 24 calls for 24 tokens of each of 8 rows; parallel: 6 calls
  assert llada8["ar_tokens_per_s"] == pytest.approx(8 / seconds, rel=1e-9)
  assert llada8["parallel_tokens_per_s"] == pytest.approx(8 * 24 / (6 * seconds), rel=1e-9)
  # The prefix cache: per block one full forward, then cached calls on [block .. end] (24, 16, 8 positions).
  prefix8 = result["rows"][3]
  cached = [c["s"] for c in prefix8["cached_calls"]]
  assert len(cached) == 3 and cached[0] >= cached[-1]
  ar = sum(prefix8["call"]["s"] + 7 * c for c in cached)  # 8 steps a block
  parallel = sum(prefix8["call"]["s"] + 1 * c for c in cached)  # 6 steps / 3 blocks = 2 a block
  assert prefix8["ar_tokens_per_s"] == pytest.approx(8 * 24 / ar, rel=1e-9)
  assert prefix8["parallel_tokens_per_s"] == pytest.approx(8 * 24 / parallel, rel=1e-9)


def test_bfloat16_parameters_halve_the_parameter_bytes_the_sampler_takes(tiny_config):
  import jax
  import jax.numpy as jnp
  from diffusion_lm import aot, experiment
  from diffusion_lm.model import Transformer
  args = {}
  for dtype in ("float32", "bfloat16"):
    result = aot.sample_check(tiny_config, "v5e:2x2", batches=(8,), decoders=("confidence",), param_dtype=dtype,
                              prompt_length=0, gen_length=32, log=lambda m: None)
    args[dtype] = result["rows"][0]["argument_bytes_per_chip"]
  net = Transformer(experiment.model_config(tiny_config, 256))
  count = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      lambda: net.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"])))
  # Data-parallel mesh: every chip holds all parameters, 4 bytes each, then 2 (XLA's TPU tiles pad small arrays,
  # so at least 2 bytes fewer per parameter); the tokens, ids and key (a few KiB per chip) are unchanged.
  assert args["float32"] - args["bfloat16"] >= 2 * count
  assert abs(2 * args["bfloat16"] - args["float32"]) <= 16 * 1024


@pytest.mark.parametrize("kwargs, message", [
    (dict(batches=(0,)), r"sample_batch='0'; allowed: integers >= 1"),
    (dict(batches="1,x"), r"sample_batch='1,x'; allowed: integers >= 1"),
    (dict(decoders=("beam",)), r"decoders='beam'; allowed: a comma-separated list of confidence, llada"),
    (dict(param_dtype="float16"), r"param_dtype='float16'; allowed: float32, bfloat16"),
    (dict(prompt_length=16, gen_length=24), r"prompt_length \+ gen_length = 40 exceeds model.max_len=32"),
])
def test_sample_only_bad_values_are_one_line(tiny_config, kwargs, message):
  from diffusion_lm import aot
  values = dict(prompt_length=0, gen_length=32) | kwargs
  with pytest.raises(UserError, match=message) as error:
    aot.sample_check(tiny_config, "v5e:2x2", log=lambda m: None, **values)
  assert "\n" not in str(error.value)


def test_sample_only_cli_refuses_a_zero_batch_in_one_line():
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.aot", "--config=configs/tiny.py", "--topology=v5e:2x2",
                        "--only=sample", "--sample_batch=1,0"], cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "sample_batch='1,0'; allowed: integers >= 1" in out.stderr and "Traceback" not in out.stderr
def test_lora_sft_compiles_with_a_bfloat16_base(tiny_config):
  """LoRA (training.lora): the step trains the adapters alone; the frozen base is counted once, in bfloat16."""
  from diffusion_lm import aot
  tiny_config.objective, tiny_config.data.source = "sft", "jsonl"
  tiny_config.training.lora.update(rank=2, base_dtype="bfloat16")
  result = aot.check(tiny_config, "v5e:2x2", log=lambda m: None)
  # 2 blocks x (query, key, value, out, wi_gate, wi_up, wo), a and b of rank 2 each (d 32, MLP 64)
  assert result["trained_params"] == 2 * 2 * (4 * (32 + 32) + 2 * (32 + 64) + (64 + 32))
  assert result["params"] > result["trained_params"] and result["fits"]
