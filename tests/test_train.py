"""Training: sharding invariance, end-to-end train -> checkpoint -> resume -> sample -> evaluate."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_lm import checkpointing, experiment, sharding, tokenizers
from diffusion_lm.errors import UserError
from diffusion_lm.generation import Generator
from diffusion_lm.model import Transformer
from diffusion_lm.sampling import SamplerConfig
from diffusion_lm.schedules import Schedule
from diffusion_lm.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_step(config, devices, vocab=20):
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Transformer(experiment.model_config(config, vocab))
  tx, _ = experiment.make_optimizer(config)
  _, shardings = experiment.state_shardings(model, tx, mesh, config.data.seq_len)
  state = experiment.init_state(model, tx, mesh, jax.random.key(0), config.data.seq_len, shardings)
  batch = np.asarray(jax.random.randint(jax.random.key(1), (8, config.data.seq_len), 0, vocab))
  step = jax.jit(functools.partial(experiment.train_step, model=model, tx=tx, schedule=Schedule("linear"),
                                   mask_id=vocab, ema_decay=0.9),
                 in_shardings=(shardings, sharding.batch_sharding(mesh), NamedSharding(mesh, P())),
                 out_shardings=(shardings, NamedSharding(mesh, P())))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    state, metrics = step(state, sharding.global_batch_from_local(batch, mesh), jax.random.key(2))
  return state, jax.device_get(metrics), shardings


def test_one_train_step_same_on_1_and_8_devices(tiny_config):
  s1, m1, _ = _one_step(tiny_config, jax.devices()[:1])
  s8, m8, _ = _one_step(tiny_config, jax.devices())
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_fsdp_and_tensor_axes_really_shard(tiny_config):
  tiny_config.mesh.update(data=2, fsdp=2, tensor=2)
  s_sharded, m, shardings = _one_step(tiny_config, jax.devices())
  s_ref, m_ref, _ = _one_step(_copy_with_mesh(tiny_config, data=-1, fsdp=1, tensor=1), jax.devices())
  np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-5)
  emb = s_sharded.params["embed"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")
  shard_shape = emb.addressable_shards[0].data.shape
  assert shard_shape == (64, 16)  # (128 padded vocab rows, d_model 32) split 2 x 2
  mu = s_sharded.opt_state[1][0].mu["block_0"]["wi_gate"]["kernel"]  # Adam moment follows its param
  assert mu.sharding.spec == P("fsdp", "tensor")


def _copy_with_mesh(config, **mesh):
  import copy
  c = copy.deepcopy(config)
  c.mesh.update(mesh)
  return c


def _params(workdir):
  manager = checkpointing.make_manager(workdir, read_only=True)
  step = manager.latest_step()
  import orbax.checkpoint as ocp
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return step, restored.state


def test_checkpoints_metrics_and_samples_written(trained_workdir):
  steps = sorted(int(d) for d in os.listdir(os.path.join(trained_workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == 6 and 4 in steps
  lines = [json.loads(l) for l in open(os.path.join(trained_workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4, 6]
  assert any("eval/bits_per_char" in l for l in lines)
  assert [(l["eval/capped"], l["eval/windows_scored"]) for l in lines if "eval/capped" in l] == [(1.0, 16.0)]
  assert os.listdir(os.path.join(trained_workdir, "tensorboard"))
  assert os.path.exists(os.path.join(trained_workdir, "samples", "step_0000004.txt"))
  assert os.path.exists(os.path.join(trained_workdir, "tokenizer.json"))


def test_resume_is_exact(trained_workdir, tmp_path, data_cache):
  """An uninterrupted 6-step run gives bit-identical parameters to the 4 + 2 resumed run."""
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = data_cache
  config.training.update(num_steps=6, checkpoint_every=2, sample_every=4)
  train_and_evaluate(config, str(tmp_path))
  step_a, a = _params(trained_workdir)
  step_b, b = _params(str(tmp_path))
  assert step_a == step_b == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_generator_keeps_prompt_and_fills_every_mask(trained_workdir):
  trained = experiment.load_trained(trained_workdir)
  gen = Generator(trained.model, trained.schedule, trained.tokenizer, trained.mesh, trained.param_shardings,
                  SamplerConfig(steps=4))
  tokens = gen.template(32, 3, prompt="ROMEO.")
  samples = gen(trained.params, tokens, seed=1).tokens
  assert samples.shape == (3, 32) and not (samples == trained.tokenizer.mask_id).any()
  assert all(text.startswith("ROMEO.") for text in gen.decode(samples))
  again = gen(trained.params, tokens, seed=1).tokens
  np.testing.assert_array_equal(samples, again)


def test_evaluator_bits_per_char_over_the_scored_windows(tiny_config):
  """AR scores are exact, so the Evaluator's totals must equal a direct NLL sum over the windows it picks."""
  import ml_collections
  from diffusion_lm import autoregressive, data
  tiny_config.objective = "ar"
  vocab, seq_len, num_windows, bos = 20, tiny_config.data.seq_len, 43, 19
  mesh = sharding.make_mesh(tiny_config.mesh)
  model = Transformer(experiment.model_config(tiny_config, vocab))
  tx, _ = experiment.make_optimizer(tiny_config)
  _, shardings = experiment.state_shardings(model, tx, mesh, seq_len)
  params = experiment.init_state(model, tx, mesh, jax.random.key(0), seq_len, shardings).params
  # Windows of one-character tokens (ids 0-9) or of seven-character tokens (ids 10-19), at random: the
  # characters per token of a subset differ from the split's.
  rng = np.random.default_rng(0)
  token_chars = np.array([1] * 10 + [7] * 10)
  stream = np.concatenate([rng.integers(0, 10, seq_len) + 10 * rng.integers(0, 2) for _ in range(num_windows)]
                          + [np.zeros(5, np.int64)]).astype(np.int32)  # a tail shorter than a window is dropped
  windows = data.Windows(stream, seq_len, "validation", token_chars=token_chars)
  eval_config = ml_collections.ConfigDict(dict(batch_size=8, max_batches=1, num_t_samples=1, discrete_steps=0,
                                               seed=3))
  evaluator = experiment.Evaluator(model, Schedule("linear"), vocab, mesh, shardings.params, eval_config, "ar", bos)
  nll = jax.jit(lambda p, x: autoregressive.next_token_nll(lambda y: model.apply({"params": p}, y), x, bos))
  all_rows = stream[:num_windows * seq_len].reshape(num_windows, seq_len)

  subset = data.eval_window_ids(num_windows, 8, 1, seed=3)
  for max_batches, picked in ((1, subset), (0, np.arange(num_windows))):
    result = evaluator(params, windows, max_batches=max_batches)
    rows = all_rows[picked]
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      nats = float(np.sum(np.asarray(nll(params, rows), np.float64)))
    chars = int(sum(token_chars[t] for t in rows.ravel()))
    assert result["capped"] == (max_batches == 1)
    assert result["windows_scored"] == len(picked) and result["windows_in_split"] == num_windows
    assert result["tokens_scored"] == len(picked) * seq_len and result["chars_scored"] == chars
    np.testing.assert_allclose(result["bits_per_char"], nats / np.log(2) / chars, rtol=1e-5)
    np.testing.assert_allclose(result["nll_per_token"], nats / (len(picked) * seq_len), rtol=1e-5)
  # The subset's characters per token are far from the split's, so bits/token over the split-average
  # characters per token (the old figure) would be a different number.
  subset_cpt = token_chars[all_rows[subset]].mean()
  split_cpt = token_chars[all_rows].mean()
  assert abs(subset_cpt / split_cpt - 1) > 0.1, (subset_cpt, split_cpt)
  with pytest.raises(UserError, match="evaluation.max_batches=-2; allowed: an integer >= 0"):
    evaluator(params, windows, max_batches=-2)


def test_capped_diffusion_evaluation_same_on_1_and_8_devices(tiny_config):
  """The subset, the masks and the time draws depend on the seed only, not on how the batch is sharded."""
  import ml_collections
  from diffusion_lm import data
  vocab, seq_len = 20, tiny_config.data.seq_len
  stream = np.random.default_rng(1).integers(0, vocab, 60 * seq_len).astype(np.int32)
  windows = data.Windows(stream, seq_len, "validation", token_chars=np.arange(vocab) % 4 + 1)
  eval_config = ml_collections.ConfigDict(dict(batch_size=8, max_batches=2, num_t_samples=2, discrete_steps=0,
                                               seed=5))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(tiny_config.mesh, devices)
    model = Transformer(experiment.model_config(tiny_config, vocab))
    tx, _ = experiment.make_optimizer(tiny_config)
    _, shardings = experiment.state_shardings(model, tx, mesh, seq_len)
    params = experiment.init_state(model, tx, mesh, jax.random.key(0), seq_len, shardings).params
    evaluator = experiment.Evaluator(model, Schedule("linear"), vocab, mesh, shardings.params, eval_config)
    results.append(evaluator(params, windows))
  one, eight = results
  assert one["capped"] and one["windows_scored"] == eight["windows_scored"] == 16
  assert one["chars_scored"] == eight["chars_scored"]
  np.testing.assert_allclose(one["nll_per_token"], eight["nll_per_token"], rtol=1e-5)
  np.testing.assert_allclose(one["bits_per_char"], eight["bits_per_char"], rtol=1e-5)


def _log_lines(stderr: str) -> list[str]:
  """absl/orbax log lines (W1130 10:08:01.88 ... checkpoint_manager.py:452] ...) and orbax mentions."""
  return [l for l in stderr.splitlines() if re.match(r"[IWEF]\d{4} ", l) or "orbax" in l.lower()]


def test_loading_a_checkpoint_writes_nothing(trained_workdir):
  """sample/evaluate may load while training writes the next checkpoint: they must not touch it."""
  in_progress = os.path.join(trained_workdir, "checkpoints", "8.orbax-checkpoint-tmp-99")
  os.makedirs(os.path.join(in_progress, "state"))
  open(os.path.join(in_progress, "state", "part"), "w").write("being written")
  try:
    before = _snapshot(trained_workdir)
    trained = experiment.load_trained(trained_workdir)
    assert checkpointing.read_saved_config(trained_workdir)[0] == trained.step == 6
    manager = checkpointing.make_manager(trained_workdir, read_only=True)
    with pytest.raises(RuntimeError, match="loading only; cannot save step 7"):
      manager.save(7, args=None)
    with pytest.raises(RuntimeError, match="loading only; cannot delete step 6"):
      manager.delete(6)
    manager.close()
    assert _snapshot(trained_workdir) == before
  finally:
    shutil.rmtree(in_progress, ignore_errors=True)


def _cli(module, *args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_sample_and_evaluate_cli(trained_workdir):
  out = _cli("diffusion_lm.sample", f"--workdir={trained_workdir}", "--num_samples=3", "--steps=4",
             "--prompt=KING.")
  assert out.returncode == 0, out.stderr
  assert out.stdout.count("--- sample") == 3 and out.stdout.count("KING.") >= 3
  assert not _log_lines(out.stderr), out.stderr  # loading a checkpoint is silent
  out = _cli("diffusion_lm.evaluate", f"--workdir={trained_workdir}")
  assert out.returncode == 0, out.stderr
  assert not _log_lines(out.stderr), out.stderr
  record = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ("nll_per_token", "bits_per_token", "perplexity", "bits_per_char"):
    assert np.isfinite(record[key])
  # Six steps with EMA decay 0.9 leave the model close to uninformed, whose bound is exactly ln K nats per
  # token (K data tokens): a figure in bits, per sequence or per masked token would be far from it.
  log_k = np.log(tokenizers.load_tokenizer(trained_workdir).vocab_size)
  assert abs(record["nll_per_token"] / log_k - 1) < 0.2 and abs(np.log(record["perplexity"]) / log_k - 1) < 0.2
  assert abs(record["bits_per_token"] * np.log(2) / log_k - 1) < 0.2
  assert record["checkpoint_step"] == 6
  # configs/tiny.py caps evaluation at 2 batches of 8 windows; the validation split holds far more.
  assert record["capped"] is True and record["windows_scored"] == 16 and record["windows_in_split"] > 100
  assert record["tokens_scored"] == 16 * 32 and record["chars_scored"] == 16 * 32  # one character per token
  # Evaluation is reproducible from its fixed seed.
  again = json.loads(_cli("diffusion_lm.evaluate", f"--workdir={trained_workdir}").stdout.strip().splitlines()[-1])
  assert again["nll_per_token"] == record["nll_per_token"]


@pytest.mark.parametrize("args, message", [
    (["--steps=0"], "steps=0; allowed: an integer >= 1"),
    (["--prompt=" + "x" * 40], "prompt is 40 tokens, longer than seq_len=32"),
    (["--seq_len=64"], "seq_len=64; allowed: 1 to the model's max_len=32"),
    (["--prompt=\u00e9t\u00e9"], "not in the character vocabulary"),
    (["--sampler=blocks", "--block_length=5"], "block_length=5 does not divide the sequence length 32"),
    (["--sampler=threshold", "--threshold=1.5"], "threshold=1.5; allowed: 0 < threshold <= 1"),
    (["--top_p=0"], "top_p=0.0; allowed: 0 < top_p <= 1"),
    (["--sampler=confidence", "--steps=40"], "steps=40 exceeds the 32 positions to generate"),
    (["--infill=no masks"], "has no [MASK] or [MASK*n]"),
])
def test_sample_cli_bad_input_is_one_line(trained_workdir, args, message):
  out = _cli("diffusion_lm.sample", f"--workdir={trained_workdir}", *args)
  assert out.returncode == 2
  errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], out.stderr
  assert "Traceback" not in out.stderr


def test_sample_cli_strategies_show_and_html(trained_workdir, tmp_path):
  page = str(tmp_path / "replay.html")
  out = _cli("diffusion_lm.sample", f"--workdir={trained_workdir}", "--num_samples=2", "--sampler=threshold",
             "--threshold=0.2", "--infill=To be, [MASK*6] the question.", "--show", f"--html={page}")
  assert out.returncode == 0, out.stderr
  frames = [l for l in out.stdout.splitlines() if l.startswith("=== step ")]
  assert frames[0].startswith("=== step 0/") and frames[-1].endswith(": 0 masked")
  assert out.stdout.count("the question.") >= 2 and "steps)" in out.stdout
  html = open(page, encoding="utf-8").read()
  assert html.startswith("<!doctype html>") and "const frames = [[[" in html and "http" not in html


def _snapshot(workdir):
  return sorted((os.path.relpath(os.path.join(d, f), workdir), os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(workdir) for f in files)


@pytest.mark.parametrize("override, message", [
    (("model", "num_layers", 3), "model.num_layers=2 in the checkpoint, 3 requested"),
    (("tokenizer", "kind", "sentencepiece"), "holds a char tokenizer"),
])
def test_workdir_of_another_model_is_refused_untouched(trained_workdir, data_cache, override, message):
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = data_cache
  config.training.update(num_steps=6, checkpoint_every=2, sample_every=4)
  group, key, value = override
  config[group][key] = value
  before = _snapshot(trained_workdir)
  with pytest.raises(UserError, match=message):
    train_and_evaluate(config, trained_workdir)
  assert _snapshot(trained_workdir) == before


def test_bad_training_config(tiny_config, tmp_path):
  tiny_config.data.seq_len = 64
  with pytest.raises(UserError, match="data.seq_len=64 exceeds model.max_len=32"):
    train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.data.seq_len = 32
  tiny_config.training.batch_size = 12
  with pytest.raises(UserError, match="batch_size=12 is not divisible by the data-parallel size 8"):
    train_and_evaluate(tiny_config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_train_cli_unknown_dataset_is_one_line(tmp_path):
  out = _cli("diffusion_lm.train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--config.data.source=tfds", "--config.data.tfds_name=lm1c")
  assert out.returncode == 2
  assert [l for l in out.stderr.splitlines() if l.startswith("error:")] == [
      "error: unknown tfds dataset 'lm1c'; close matches: lm1b"], out.stderr


@pytest.mark.parametrize("mesh, message", [
    (dict(data=3, fsdp=1, tensor=1), "uses 3 devices, but 8 are present"),
    (dict(data=-1, fsdp=3, tensor=1), "does not divide 8 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
    (dict(data=0, fsdp=1, tensor=1), "positive sizes"),
])
def test_bad_meshes(mesh, message):
  import ml_collections
  with pytest.raises(UserError, match=message):
    sharding.make_mesh(ml_collections.ConfigDict(mesh))
