"""BERT, RoBERTa and ModernBERT through convert (diffusion_lm/convert/{bert,roberta,modernbert}.py) against
logits that transformers computed, then fine-tuned and sampled as masked diffusion models.

The fixtures (tests/fixtures/hf/{bert,roberta,modernbert}) are tiny random checkpoints with reference
logits made by tools/make_encoder_fixtures.py in PyTorch; neither torch nor transformers is needed here.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import convert, experiment
from diffusion_lm.errors import UserError
from diffusion_lm.generation import Generator, sampler_config
from diffusion_lm.model import MASK_LOGIT, Transformer
from conftest import write_word_pairs

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
ENCODERS = ("bert", "roberta", "modernbert")
MASK_ID = 4  # every fixture tokenizer's [MASK] / <mask>


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """family -> (workdir, Trained): each fixture imported once."""
  root = tmp_path_factory.mktemp("encoders")
  out = {}
  for family in ENCODERS:
    workdir = str(root / family)
    convert.import_hf(os.path.join(FIXTURES, family), workdir)
    out[family] = workdir, experiment.load_trained(workdir)
  return out


def _reference(family):
  ref = np.load(os.path.join(FIXTURES, family, "reference.npz"))
  return ref["tokens"], ref["logits"]


def _logits(trained, tokens, **kwargs):
  return np.asarray(trained.model.apply({"params": trained.params}, jnp.asarray(tokens), **kwargs))


def _assert_matches_reference(got, want):
  keep = np.arange(want.shape[-1]) != MASK_ID  # this project never predicts [MASK] (SUBS)
  assert got.shape == want.shape
  assert np.abs(got[..., keep] - want[..., keep]).max() <= 1e-4
  np.testing.assert_array_equal(got[..., MASK_ID], MASK_LOGIT)


@pytest.mark.parametrize("family", ENCODERS)
def test_imported_logits_match_transformers(imported, family):
  _, trained = imported[family]
  tokens, want = _reference(family)
  assert (tokens == MASK_ID).any()  # the inputs hold [MASK]s, as a diffusion step's do
  _assert_matches_reference(_logits(trained, tokens), want)


@pytest.mark.parametrize("family,expected", [
    ("bert", dict(norm_position="post", position="learned", position_offset=0, token_types=2, head_bias=True,
                  norm_eps=1e-12, mlp="gelu")),
    ("roberta", dict(norm_position="post", position_offset=2, token_types=1, max_len=32)),
    ("modernbert", dict(mlp="geglu", norm="layernorm_nobias", first_attn_norm=False, local_window=4,
                        global_every=2, rope_base=1000.0, local_rope_base=20.0, qkv_bias=False)),
])
def test_encoder_settings(imported, family, expected):
  _, trained = imported[family]
  cfg = trained.model.config
  assert {k: getattr(cfg, k) for k in expected} == expected
  assert trained.config.objective == "diffusion" and not cfg.causal and cfg.mask_token_id == MASK_ID
  assert trained.tokenizer.mask_id == MASK_ID and trained.tokenizer.vocab_size == 64
  # Windows framed as the encoder reads text: [CLS] ... [SEP] (<s> ... </s>).
  assert trained.config.data.frame_windows and trained.config.data.frame_open == "bos"
  opening, closing = experiment.frame_ids(trained.config, trained.tokenizer)
  vocab = trained.tokenizer.tok.get_vocab()
  assert (opening, closing) == ((vocab["<s>"], vocab["</s>"]) if family == "roberta" else
                                (vocab["[CLS]"], vocab["[SEP]"]))


def _folder_with(tmp_path, family, edit):
  folder = tmp_path / family
  folder.mkdir()
  for name in os.listdir(os.path.join(FIXTURES, family)):
    (folder / name).write_bytes(open(os.path.join(FIXTURES, family, name), "rb").read())
  config = json.loads((folder / "config.json").read_text())
  edit(config)
  (folder / "config.json").write_text(json.dumps(config))
  return str(folder)


def test_modernbert_original_config_layout(tmp_path):
  """ModernBERT's published config.json (global/local rope thetas, global_attn_every_n_layers, no layer_types)
  imports to the same network."""
  def original_layout(config):
    rope = config.pop("rope_parameters")
    del config["layer_types"]
    config.update(global_rope_theta=rope["full_attention"]["rope_theta"],
                  local_rope_theta=rope["sliding_attention"]["rope_theta"])
  workdir = str(tmp_path / "w")
  convert.import_hf(_folder_with(tmp_path, "modernbert", original_layout), workdir)
  tokens, want = _reference("modernbert")
  _assert_matches_reference(_logits(experiment.load_trained(workdir), tokens), want)


@pytest.mark.parametrize("family,edit,message", [
    ("modernbert", lambda c: c.update(layer_types=["full_attention"] * 3), "layer_types="),
    ("modernbert", lambda c: c.update(classifier_bias=True), "classifier_bias=True"),
    ("bert", lambda c: c.update(position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
    ("roberta", lambda c: c.update(hidden_act="relu"), "hidden_act='relu'"),
])
def test_unsupported_encoders_are_named(tmp_path, family, edit, message):
  with pytest.raises(UserError, match=message):
    convert.import_hf(_folder_with(tmp_path, family, edit), str(tmp_path / "out"))


@pytest.mark.parametrize("family", ENCODERS)
def test_export_import_round_trip_is_identity(imported, tmp_path, family):
  """Export writes the family's own layout (the fixture's tensor names, its values in the first rows);
  importing it back restores the workdir exactly."""
  workdir, trained = imported[family]
  folder = str(tmp_path / "hf")
  written = convert.export_hf(workdir, folder)
  assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(written)
  with open(os.path.join(folder, "config.json")) as f:
    hf = json.load(f)
  assert hf["model_type"] == family and hf["architectures"][0].endswith("ForMaskedLM")
  exported = convert.read_safetensors(folder)
  original = convert.read_safetensors(os.path.join(FIXTURES, family))
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name][:value.shape[0]], value, err_msg=name)
  again = str(tmp_path / "again")
  convert.import_hf(folder, again)
  back = experiment.load_trained(again)
  assert back.model.config == trained.model.config and back.config.objective == "diffusion"
  assert back.tokenizer.mask_id == MASK_ID and back.config.data.frame_open == "bos"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, trained.params)


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_every_attention_path_of_an_encoder(imported, family):
  """The samplers' cheaper forwards (a few positions' outputs, the kept trunk, the approximate caches) apply
  BERT's post-norm blocks, learned positions and type embedding, and ModernBERT's window and per-layer rotary
  bases, as the full forward does. ModernBERT's last block is global; with global_every=3 (same parameters)
  the last block, the one outputs_at cuts, is a local one."""
  _, trained = imported[family]
  model = Transformer(dataclasses.replace(trained.model.config, global_every=3)) if family == "modernbert" else (
      trained.model)
  params = trained.params
  tokens, _ = _reference(family)
  full = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  at = jnp.asarray([[0, 5, 11], [3, 4, 9]])
  trunk = model.apply({"params": params}, jnp.asarray(tokens), return_trunk=True)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(tokens), trunk=trunk,
                                                    outputs_at=at)),
                             np.take_along_axis(full, np.asarray(at)[:, :, None], axis=1), atol=1e-5)
  stored, variables = model.apply({"params": params}, jnp.asarray(tokens), approx_cache="store",
                                  mutable=["approx_cache"])
  np.testing.assert_allclose(np.asarray(stored), full, atol=1e-5)
  chunk = model.apply({"params": params, "approx_cache": variables["approx_cache"]}, jnp.asarray(tokens[:, 4:8]),
                      positions_L=jnp.arange(4, 8), approx_cache="reuse")
  np.testing.assert_allclose(np.asarray(chunk), full[:, 4:8], atol=1e-5)  # nothing changed: exact


def test_every_bidirectional_sampler_on_an_imported_encoder(imported):
  """Each sampler fills every hole with a data token and keeps the given ones; the approximate caches with
  one step per block are exactly the uncached blocks sampler (the same forward at every step); greedy
  confidence decoding with one commit per step is the step-by-step reference computed here."""
  _, run = imported["modernbert"]
  length, batch = 16, 2
  outputs = {}
  for name, extra in (("ancestral", {}), ("confidence", {}), ("blocks", dict(block_length=4)),
                      ("threshold", dict(threshold=0.5)), ("remdm", dict(remask_schedule="cap")),
                      ("blocks", dict(block_length=4, approx_cache="prefix")),
                      ("blocks", dict(block_length=4, approx_cache="dual"))):
    cfg = sampler_config(run.config.sampling, name=name, steps=4, temperature=0.0, **extra)
    gen = Generator(run.model, run.schedule, run.tokenizer, run.mesh, run.param_shardings, cfg)
    template = gen.template(length, batch, infill="the [MASK*4] fox [MASK*2] dog")
    given = template != run.tokenizer.mask_id
    out = gen(run.params, template, seed=0).tokens
    assert out.shape == template.shape and (out != MASK_ID).all() and (out < 64).all()
    np.testing.assert_array_equal(out[given], template[given])
    outputs[(name, extra.get("approx_cache", "none"))] = out
  # Reference: one full forward per step; commit the hole whose most likely token is the most probable.
  template = template[:1]
  holes = int((template == MASK_ID).sum())
  x = template[0].copy()
  for _ in range(holes):
    logits = _logits(run, x[None])[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    confidence = np.where(x == MASK_ID, probs.max(-1), -1.0)
    position = int(np.argmax(confidence))
    x[position] = int(np.argmax(probs[position]))
  gen = Generator(run.model, run.schedule, run.tokenizer, run.mesh, run.param_shardings,
                  sampler_config(run.config.sampling, name="confidence", temperature=0.0, steps=holes))
  np.testing.assert_array_equal(gen(run.params, template, seed=0).tokens[0], x)
  np.testing.assert_array_equal(outputs[("blocks", "prefix")], outputs[("blocks", "none")])
  np.testing.assert_array_equal(outputs[("blocks", "dual")], outputs[("blocks", "none")])


def _train_tiny(config, workdir, steps=2):
  from diffusion_lm import train  # pylint: disable=g-import-not-at-top
  config.optimizer.update(learning_rate=1e-7, warmup_steps=0)  # barely moves: the start must be the source
  config.training.update(batch_size=8, num_steps=steps, checkpoint_every=steps, log_every=1, eval_every=0,
                         sample_every=0)
  config.evaluation.update(batch_size=8, max_batches=1)
  train.train_and_evaluate(config, workdir)
  return experiment.load_trained(workdir)


def _moved_slightly(tuned, source):
  gaps = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), tuned.params, source.params)
  assert 0 < max(jax.tree.leaves(gaps)) < 1e-5  # moved, by two steps of 1e-7 (a fresh init is O(1) away)


def test_encoder_diffusion_then_sft_then_export(imported, tmp_path):
  """configs/encoder_diffusion.py with --config.init_from alone fine-tunes the imported encoder on framed
  windows; configs/encoder_sft.py instruction-tunes the result; the tuned encoder exports to RoBERTa's
  layout and imports back unchanged."""
  from configs import encoder_diffusion, encoder_sft  # pylint: disable=g-import-not-at-top
  source_dir, source = imported["roberta"]
  config = encoder_diffusion.get_config()
  config.init_from = source_dir
  config.data.seq_len = 16
  tuned = _train_tiny(config, str(tmp_path / "diffusion"))
  assert tuned.step == 2 and tuned.model.config == source.model.config
  assert tuned.tokenizer.mask_id == MASK_ID
  _moved_slightly(tuned, source)

  path = write_word_pairs(tmp_path / "pairs.jsonl")
  config = encoder_sft.get_config(str(tmp_path / "diffusion"))
  config.data.update(path=str(path), validation_percent=30.0, seq_len=24)
  chat = _train_tiny(config, str(tmp_path / "sft"))
  assert chat.config.objective == "sft"
  _moved_slightly(chat, tuned)

  folder = str(tmp_path / "hf")
  convert.export_hf(str(tmp_path / "sft"), folder)
  back_dir = str(tmp_path / "back")
  convert.import_hf(folder, back_dir)
  back = experiment.load_trained(back_dir)
  assert back.model.config == chat.model.config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, chat.params)


def test_model_from_init_needs_a_source():
  from configs import encoder_diffusion  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="model_from_init=True without init_from"):
    experiment.adopt_init_model(encoder_diffusion.get_config())
