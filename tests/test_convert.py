"""Hugging Face import/export (diffusion_lm/convert.py) against logits that transformers computed.

The fixtures in tests/fixtures/hf are tiny random checkpoints with reference logits made by
tools/make_hf_fixtures.py in PyTorch; neither torch nor transformers is needed here.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import convert, experiment, sampling
from diffusion_lm.errors import UserError
from diffusion_lm.model import MASK_LOGIT, ModelConfig, Transformer
from conftest import write_word_pairs

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
FAMILIES = ("llama", "qwen2", "gpt2", "llada", "dream")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """family -> (workdir, Trained): each fixture imported once."""
  root = tmp_path_factory.mktemp("imported")
  out = {}
  for family in FAMILIES:
    workdir = str(root / family)
    convert.import_hf(os.path.join(FIXTURES, family), workdir)
    out[family] = workdir, experiment.load_trained(workdir)
  return out


def _reference(family):
  ref = np.load(os.path.join(FIXTURES, family, "reference.npz"))
  return ref["tokens"], ref["logits"]


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_transformers(imported, family):
  _, trained = imported[family]
  tokens, want = _reference(family)
  cfg = trained.model.config
  got = np.asarray(trained.model.apply({"params": trained.params}, jnp.asarray(tokens)))
  if family == "dream":  # the raw output at i predicts token i + 1; the model's comes out aligned
    want = np.concatenate([want[:, :1], want[:, :-1]], axis=1)
  keep = np.arange(want.shape[-1]) != cfg.mask_token_id
  assert got.shape == want.shape
  assert np.abs(got[..., keep] - want[..., keep]).max() <= 1e-4
  if family in ("llada", "dream"):  # their own [MASK] is never predicted
    assert cfg.mask_token_id == trained.tokenizer.mask_id == 2
    np.testing.assert_array_equal(got[..., cfg.mask_token_id], MASK_LOGIT)


@pytest.mark.parametrize("family,objective,causal", [("llama", "ar", True), ("gpt2", "ar", True),
                                                     ("llada", "diffusion", False), ("dream", "diffusion", False)])
def test_family_settings(imported, family, objective, causal):
  _, trained = imported[family]
  cfg = trained.model.config
  assert trained.config.objective == objective and cfg.causal == causal
  assert trained.tokenizer.kind == "hf" and trained.tokenizer.eos_id == 0
  text = "the quick brown fox"
  assert trained.tokenizer.decode(trained.tokenizer.encode(text)).strip() == text
  expected = {"llama": dict(num_kv_heads=2, rope_scaling="llama3", rope_original_max_len=8, norm_eps=1e-5),
              "gpt2": dict(norm="layernorm", position="learned", mlp="gelu_tanh", tie_embeddings=True),
              "llada": dict(mask_token_id=2, tie_embeddings=False),
              "dream": dict(shift_logits=True, qkv_bias=True, num_kv_heads=2)}[family]
  assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decoding_matches_full_forward(imported, family):
  """Grouped-query heads, scaled rotary tables and learned positions through the decoding cache."""
  _, trained = imported[family]
  model, params = trained.model, trained.params
  tokens, _ = _reference(family)
  full = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  _, variables = model.apply({"params": params}, jnp.zeros((2, 1), jnp.int32), decode=True, mutable=["cache"])
  step = jax.jit(lambda cache, token_Bx1: model.apply({"params": params, "cache": cache}, token_Bx1, decode=True,
                                                      mutable=["cache"]))
  cache, steps = variables["cache"], []
  for i in range(tokens.shape[1]):
    logits, variables = step(cache, jnp.asarray(tokens[:, i:i + 1]))
    cache = variables["cache"]
    steps.append(np.asarray(logits[:, 0]))
  assert np.abs(np.stack(steps, axis=1) - full).max() <= 1e-4


def test_export_import_round_trip_is_identity(imported, tmp_path):
  for family in ("llama", "dream"):  # GQA + rope scaling; q/k/v biases + shift + in-vocabulary [MASK]
    workdir, trained = imported[family]
    folder = str(tmp_path / f"{family}_hf")
    written = convert.export_hf(workdir, folder)
    assert "config.json" in written and "tokenizer.json" in written
    # The exported tensors are the fixture's own (rows past its 64-token vocabulary are padding).
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    exported = load_file(os.path.join(folder, "model.safetensors"))
    original = convert.read_safetensors(os.path.join(FIXTURES, family))
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
      np.testing.assert_array_equal(exported[name][:value.shape[0]], value)
    again = str(tmp_path / f"{family}_again")
    convert.import_hf(folder, again)
    back = experiment.load_trained(again)
    assert back.model.config == trained.model.config
    assert back.config.objective == trained.config.objective
    assert back.tokenizer.mask_id == trained.tokenizer.mask_id
    # Sampler defaults travel in generation_config.json (an exported folder has no family defaults of its own).
    assert back.config.sampling.to_dict() == trained.config.sampling.to_dict()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, trained.params)


@pytest.mark.parametrize("family, decoder", [("llada", "llada"), ("dream", "dream"), ("llama", "ancestral")])
def test_imported_models_default_to_their_authors_decoder(imported, family, decoder):
  assert imported[family][1].config.sampling.name == decoder


def test_project_model_round_trip(tmp_path):
  """A model of this project's own default tree ([MASK] = vocab_size row, untied head) comes back exactly."""
  from diffusion_lm import tokenizers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(FIXTURES, "llama", "tokenizer.json"), "rb") as f:
    tokenizer = tokenizers.HFTokenizer(f.read())
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, num_layers=1, d_model=16, num_heads=2, mlp_dim=32, max_len=16)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.tree.map(np.asarray, params)
  fields = {k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads", "mlp_dim", "max_len")}
  workdir = str(tmp_path / "own")
  convert.write_workdir(workdir, fields, "diffusion", tokenizer, params, seq_len=8)
  folder = str(tmp_path / "own_hf")
  convert.export_hf(workdir, folder)
  with open(os.path.join(folder, "config.json")) as f:
    hf = json.load(f)
  assert hf["model_type"] == "llama" and hf["is_causal"] is False and hf["mask_token_id"] == tokenizer.vocab_size
  again = str(tmp_path / "again")
  convert.import_hf(folder, again)
  back = experiment.load_trained(again)
  assert back.model.config == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back.params, params)


def _folder_with(tmp_path, family, **changes):
  folder = tmp_path / family
  folder.mkdir()
  for name in os.listdir(os.path.join(FIXTURES, family)):
    (folder / name).write_bytes(open(os.path.join(FIXTURES, family, name), "rb").read())
  config = json.loads((folder / "config.json").read_text())
  config.update(changes)
  (folder / "config.json").write_text(json.dumps(config))
  return str(folder)


@pytest.mark.parametrize("family,changes,message", [
    ("qwen2", {"model_type": "mamba"}, "model_type='mamba'"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling 'yarn'"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llada", {"include_bias": True}, "include_bias=True"),
])
def test_unsupported_checkpoints_are_named(tmp_path, family, changes, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(")):
    convert.import_hf(_folder_with(tmp_path, family, **changes), str(tmp_path / "out"))


def test_missing_tensor_and_existing_workdir_are_named(tmp_path, imported):
  folder = _folder_with(tmp_path, "qwen2")
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  with pytest.raises(UserError, match="model.layers.1.self_attn.k_proj.bias"):
    convert.import_hf(folder, str(tmp_path / "out"))
  with pytest.raises(UserError, match="already holds a checkpoint"):
    convert.import_hf(os.path.join(FIXTURES, "gpt2"), imported["gpt2"][0])


def test_fine_tune_a_converted_checkpoint_and_export_it(imported, tmp_path):
  """configs/sft.py starts from the converted LLaDA workdir (parameters, tokenizer and its [MASK] id);
  the fine-tuned workdir exports and imports back unchanged."""
  from configs import sft  # pylint: disable=g-import-not-at-top
  from diffusion_lm import train  # pylint: disable=g-import-not-at-top
  source_dir, source = imported["llada"]
  path = write_word_pairs(tmp_path / "pairs.jsonl")
  config = sft.get_config(source_dir)
  config.data.update(path=str(path), validation_percent=30.0)
  config.optimizer.update(learning_rate=1e-7, warmup_steps=0)  # barely moves: the start must be the source
  config.training.update(batch_size=8, num_steps=2, checkpoint_every=2, log_every=1)
  config.evaluation.update(batch_size=8, max_batches=1)
  tuned_dir = str(tmp_path / "tuned")
  train.train_and_evaluate(config, tuned_dir)
  tuned = experiment.load_trained(tuned_dir)
  assert tuned.step == 2 and tuned.config.objective == "sft"
  assert tuned.tokenizer.mask_id == source.tokenizer.mask_id == 2
  gaps = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), tuned.params, source.params)
  assert 0 < max(jax.tree.leaves(gaps)) < 1e-5  # moved, by two steps of 1e-7 (a fresh init is O(1) away)
  folder = str(tmp_path / "tuned_hf")
  convert.export_hf(tuned_dir, folder)
  back_dir = str(tmp_path / "back")
  convert.import_hf(folder, back_dir)
  back = experiment.load_trained(back_dir)
  assert back.model.config == tuned.model.config and back.config.objective == "diffusion"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, tuned.params)


def test_shifted_model_refuses_the_blocks_approximate_cache(imported):
  """The project's blocks sampler cannot cache a shifted model (a chunk's first prediction comes from outside
  it); Fast-dLLM's Dream decoding (sampler fast_dllm) can, and is tested in test_published."""
  from diffusion_lm.samplers import approx_cache  # pylint: disable=g-import-not-at-top
  _, trained = imported["dream"]
  tokens, _ = _reference("dream")
  cfg = sampling.SamplerConfig(name="blocks", steps=4, block_length=4, approx_cache="prefix")
  with pytest.raises(UserError, match="shift_logits"):
    approx_cache.sample(trained.model, trained.params, jax.random.key(0), jnp.asarray(tokens[:, :8]),
                        jnp.arange(tokens.shape[0]), cfg, schedule=trained.schedule, mask_id=2)
