"""Streaming import (a parameters-only checkpoint), training from it, and loading only the parameters used
(diffusion_lm/loading.py): EMA or raw, into the mesh's shardings, in bfloat16, from 2 processes."""

import json
import os
import shutil
import subprocess
import sys

from etils import epath
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffusion_lm import checkpointing, convert, experiment, loading
from diffusion_lm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = os.path.join(ROOT, "tests", "fixtures", "hf", "llama")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The LLaMA fixture imported twice: float32 and bfloat16 (parameters-only workdirs)."""
  root = tmp_path_factory.mktemp("converted")
  out = {}
  for dtype in ("float32", "bfloat16"):
    out[dtype] = str(root / dtype)
    convert.import_hf(LLAMA, out[dtype], dtype=dtype)
  return out


def _stored_tree(workdir: str, step: int = 0):
  """The state item's metadata tree of a step (names and dtypes, nothing read)."""
  path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
  return ocp.PyTreeCheckpointHandler().metadata(path).tree


def test_import_writes_parameters_only_in_the_asked_dtype(converted):
  for dtype, workdir in converted.items():
    tree = _stored_tree(workdir)
    assert set(tree) == {"params"}  # no optimizer state, no EMA copy, no step
    dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(tree["params"])}
    assert dtypes == {dtype}
    assert not os.path.exists(os.path.join(workdir, "checkpoints.staging"))


def test_bfloat16_import_and_loading_round_like_numpy(converted):
  """Stored bfloat16 = the float32 import rounded by ml_dtypes; dtype='bfloat16' on loading the float32
  workdir rounds the same way; float32 loading of the bfloat16 workdir widens exactly."""
  full = loading.load_trained(converted["float32"])
  want = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), full.params)
  from_bf16 = loading.load_trained(converted["bfloat16"], dtype="bfloat16")
  cast_on_load = loading.load_trained(converted["float32"], dtype="bfloat16")
  widened = loading.load_trained(converted["bfloat16"])
  for got in (from_bf16.params, cast_on_load.params):
    assert {str(a.dtype) for a in jax.tree.leaves(got)} == {"bfloat16"}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b.astype(np.float32)), widened.params, want)
  tokens = jnp.asarray(np.load(os.path.join(LLAMA, "reference.npz"))["tokens"])
  logits = np.asarray(from_bf16.model.apply({"params": from_bf16.params}, tokens), np.float32)
  reference = np.asarray(full.model.apply({"params": full.params}, tokens))
  assert np.abs(logits - reference).max() < 0.1 * np.abs(reference).max()


def test_bad_dtypes_are_named(tmp_path, converted):
  with pytest.raises(UserError, match="float16"):
    convert.import_hf(LLAMA, str(tmp_path / "w"), dtype="float16")
  with pytest.raises(UserError, match="int8"):
    loading.load_trained(converted["float32"], dtype="int8")


def test_full_checkpoint_restores_only_the_parameters_used(trained_workdir, monkeypatch):
  """EMA (or raw) parameters equal those of a whole-state restore, and only that subtree is asked for."""
  asked = []
  real = ocp.args.PyTreeRestore

  def recording(*args, **kwargs):
    asked.append((set(kwargs["item"]), kwargs.get("partial_restore")))
    return real(*args, **kwargs)

  monkeypatch.setattr(checkpointing.ocp.args, "PyTreeRestore", recording)
  ema, raw = loading.load_trained(trained_workdir), loading.load_trained(trained_workdir, use_ema=False)
  assert asked and all(how in (({"ema_params"}, True), ({"params"}, True)) for how in asked)
  assert asked[0] == ({"ema_params"}, True) and asked[-1] == ({"params"}, True)
  monkeypatch.undo()
  tx, _ = experiment.make_optimizer(ema.config)
  abstract, _ = experiment.state_shardings(ema.model, tx, ema.mesh, ema.config.data.seq_len)
  manager = checkpointing.make_manager(trained_workdir, read_only=True)
  try:
    state, _ = checkpointing.restore(manager, ema.step, abstract)
  finally:
    manager.close()
  for got, want in ((ema.params, state.ema_params), (raw.params, state.params)):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    for leaf, where in zip(jax.tree.leaves(got), jax.tree.leaves(ema.param_shardings)):
      assert leaf.sharding.is_equivalent_to(where, leaf.ndim)


def test_part_by_part_reading_checks_the_config_once_and_passes_over_a_damaged_one(trained_workdir, tmp_path,
                                                                                   monkeypatch):
  """StoredParams (export) reads the step's config with its first part only; a damaged config there makes
  it fall back to the previous step, as any loader does."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_workdir, workdir)
  with open(os.path.join(workdir, "checkpoints", "6", "config", "metadata"), "w") as f:
    f.write("{damaged")
  config_reads = []
  real = ocp.args.JsonRestore
  monkeypatch.setattr(checkpointing.ocp.args, "JsonRestore", lambda *a, **k: config_reads.append(1) or real(*a, **k))
  stored = loading.StoredParams(workdir)
  try:
    assert stored.step == 4
    reads_at_open = len(config_reads)
    parts = {name: stored[name] for name in stored}
  finally:
    stored.close()
  assert len(config_reads) == reads_at_open and len(parts) > 2  # no config read per part
  monkeypatch.undo()
  reference = str(tmp_path / "reference")  # the same run without step 6: step 4 is its newest
  shutil.copytree(trained_workdir, reference)
  shutil.rmtree(os.path.join(reference, "checkpoints", "6"))
  whole = loading.load_trained(reference)
  assert whole.step == 4
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), parts, whole.params)


def test_training_a_converted_workdir_starts_a_fresh_optimizer(tmp_path, small_corpus):
  """train in the converted workdir itself: step 1's optimizer state counts one update, and its EMA is
  decay x imported + (1 - decay) x trained, so the EMA started from the imported parameters."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_lm import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "llama")
  convert.import_hf(LLAMA, workdir, seq_len=16)
  imported = loading.load_trained(workdir).params
  config = tiny.get_config()
  config.objective = "ar"
  config.model_from_init, config.init_from = True, workdir  # the converted model and tokenizer
  config.data.update(source="local", path=small_corpus, seq_len=16, passage_chars=512)  # tokenized in seconds
  config.training.update(num_steps=1, checkpoint_every=1)
  config.optimizer.warmup_steps = 0  # the first step moves the parameters
  with pytest.raises(UserError, match="parameters only"):  # a whole-state reader is told what it holds
    manager = checkpointing.make_manager(workdir, read_only=True)
    try:
      checkpointing.restore(manager, 0, None)
    finally:
      manager.close()
  train.train_and_evaluate(config, workdir)
  raw = loading.load_trained(workdir, use_ema=False)
  assert raw.step == 1 and set(_stored_tree(workdir, 1)) == {"step", "params", "ema_params", "opt_state"}
  tx, _ = experiment.make_optimizer(raw.config)
  abstract, _ = experiment.state_shardings(raw.model, tx, raw.mesh, raw.config.data.seq_len)
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    state, _ = checkpointing.restore(manager, 1, abstract)
  finally:
    manager.close()
  counts = [int(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) == 0]
  assert counts and set(counts) == {1}
  decay = config.optimizer.ema_decay
  jax.tree.map(lambda e, p0, p1: np.testing.assert_allclose(np.asarray(e), decay * np.asarray(p0) + (1 - decay) *
                                                            np.asarray(p1), rtol=1e-5, atol=1e-7),
               state.ema_params, imported, state.params)
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                                          imported))) > 0  # it trained


def _full_copy(source: str, target: str) -> None:
  """A workdir whose step-0 checkpoint is a whole train state (params = EMA = the source's parameters)."""
  run = loading.load_trained(source)
  tx, _ = experiment.make_optimizer(run.config)
  _, shardings = experiment.state_shardings(run.model, tx, run.mesh, run.config.data.seq_len)
  state = experiment.state_from_params(run.params, tx, run.mesh, shardings)
  os.makedirs(target)
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    if os.path.exists(os.path.join(source, name)):
      with open(os.path.join(source, name), "rb") as f, open(os.path.join(target, name), "wb") as g:
        g.write(f.read())
  saved = json.load(open(os.path.join(source, "config.json")))
  manager = checkpointing.make_manager(target)
  try:
    checkpointing.save(manager, 0, state, {}, saved, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


def test_export_of_parameters_only_and_full_workdirs_agree(converted, tmp_path):
  full = str(tmp_path / "full")
  _full_copy(converted["float32"], full)
  assert set(_stored_tree(full)) == {"step", "params", "ema_params", "opt_state"}
  a, b = str(tmp_path / "a_hf"), str(tmp_path / "b_hf")
  assert convert.export_hf(converted["float32"], a) == convert.export_hf(full, b)
  ta, tb = convert.read_safetensors(a), convert.read_safetensors(b)
  assert sorted(ta) == sorted(tb)
  for name in ta:
    np.testing.assert_array_equal(ta[name], tb[name])
  original = convert.read_safetensors(LLAMA)  # and the export is the fixture's own tensors (rows padded)
  for name, value in original.items():
    np.testing.assert_array_equal(ta[name][:value.shape[0]], value)


def test_two_processes_load_what_one_does(converted, tmp_path):
  """2 processes x 2 CPU devices (jax.distributed on 127.0.0.1), parameters split over fsdp = 4: the
  gathered tree equals a one-process load."""
  dump = str(tmp_path / "gathered.npz")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "tools/measure_memory.py", "--load_only", f"--workdir={converted['float32']}",
                        "--devices=2", f"--dump={dump}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["process"] for r in records] == [0, 1] and records[0]["mesh"]["fsdp"] == 4
  assert all(2 * r["own_shards_bytes"] <= r["whole_set_bytes"] for r in records)  # each holds (about) its half
  one = loading.load_trained(converted["float32"])
  gathered = np.load(dump)
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(one.params)}
  assert sorted(flat) == sorted(gathered.files)
  for name, value in flat.items():
    np.testing.assert_array_equal(gathered[name], value)
