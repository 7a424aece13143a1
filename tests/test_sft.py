"""Instruction fine-tuning (objective sft, data.source jsonl): rows, loss masking, and a task learnt."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_lm import data, diffusion, objectives
from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule
from diffusion_lm.tokenizers import CharTokenizer

LETTERS = "abcdef"


def _reverse_pairs(num, seed=0):
  """The task of configs/sft_tiny.py (tools/make_reverse_task.py): "abcd=" -> "dcba"."""
  rng = np.random.default_rng(seed)
  words = ["".join(LETTERS[i] for i in rng.integers(0, len(LETTERS), 4)) for _ in range(num)]
  return [{"prompt": f"{w}=", "response": w[::-1]} for w in words]


def _write(path, pairs):
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(p) for p in pairs) + "\n")
  return str(path)


def test_rows_hold_prompt_complement_response_and_eos_padding(tmp_path):
  path = _write(tmp_path / "pairs.jsonl", [{"prompt": "ab=", "response": "ba"}] * 3)
  tok = CharTokenizer(list("=ab"))
  cfg = ml_collections.ConfigDict({"path": path, "seq_len": 8, "validation_percent": 1e-9})
  rows = data.prompt_response_rows(cfg, "train", tok, data.token_char_counts(tok))
  eq, a, b, eos = 0, 1, 2, tok.eos_id
  np.testing.assert_array_equal(rows.rows([0]), [[~a, ~b, ~eq, b, a, eos, eos, eos]])
  assert len(rows) == 3 and rows.row_chars(rows.rows([0]))[0] == 2 + 3 * 1  # response + one per eos
  tokens, is_prompt = diffusion.split_prompt(jnp.asarray(rows.rows([0])))
  np.testing.assert_array_equal(tokens, [[a, b, eq, b, a, eos, eos, eos]])
  np.testing.assert_array_equal(is_prompt, [[1, 1, 1, 0, 0, 0, 0, 0]])
  too_long = ml_collections.ConfigDict({"path": path, "seq_len": 5, "validation_percent": 1e-9})
  with pytest.raises(UserError, match="no room for the end-of-text"):
    data.prompt_response_rows(too_long, "train", tok)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a"}\n')
  with pytest.raises(UserError, match="bad.jsonl:1"):
    data.read_prompt_response(str(bad))


def test_encoder_rows_frame_the_prompt(tmp_path):
  """data.frame_open='bos' (configs/encoder_sft.py): [CLS] prompt [SEP] clean, then response and [SEP]s."""
  from diffusion_lm.tokenizers import HFTokenizer  # pylint: disable=g-import-not-at-top
  fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf", "bert", "tokenizer.json")
  with open(fixture, "rb") as f:
    tok = HFTokenizer(f.read())
  vocab = tok.tok.get_vocab()
  cls, sep = vocab["[CLS]"], vocab["[SEP]"]
  path = _write(tmp_path / "pairs.jsonl", [{"prompt": "the fox", "response": "a dog"}])
  cfg = ml_collections.ConfigDict({"path": path, "seq_len": 12, "validation_percent": 1e-9, "frame_open": "bos"})
  row = data.prompt_response_rows(cfg, "train", tok).rows([0])[0]
  prompt, response = tok.encode("the fox"), tok.encode("a dog")
  expected = [~i for i in [cls] + prompt + [sep]] + response
  np.testing.assert_array_equal(row, expected + [sep] * (12 - len(expected)))
  with pytest.raises(UserError, match="frame_open='bos' with a tokenizer"):
    data.prompt_response_rows(cfg, "train", CharTokenizer(list("the foxadg")))


def test_split_is_by_pair_and_disjoint(tmp_path):
  pairs = _reverse_pairs(600)
  path = _write(tmp_path / "pairs.jsonl", pairs)
  tok = CharTokenizer(list("=" + LETTERS))
  cfg = ml_collections.ConfigDict({"path": path, "seq_len": 12, "validation_percent": 10.0})
  train, valid = (data.prompt_response_rows(cfg, s, tok) for s in ("train", "validation"))
  assert len(train) + len(valid) == 600 and 20 < len(valid) < 110
  as_set = lambda rows: {tuple(r) for r in rows.rows(np.arange(len(rows)))}
  assert not as_set(train) & as_set(valid)  # a pair seen in training is never a validation pair


def test_sft_loss_holds_the_prompt_and_scores_the_rest():
  """Prompt positions are never masked and never scored: the denoiser sees them clean, and logits there
  do not move the loss; response and padding positions are masked at the schedule's rate."""
  seen = []

  def denoiser(noisy_BxL, t_B):
    seen.append(noisy_BxL)
    # Huge logits on prompt positions for a wrong token: scored there, they would dominate the loss.
    logits = jnp.zeros(noisy_BxL.shape + (8,), jnp.float32)
    return logits.at[:, :3, 5].set(1e4)

  class Model:
    def apply(self, variables, tokens, t):
      return denoiser(tokens, t)

  rows = jnp.tile(jnp.asarray([[~1, ~2, ~0, 2, 1, 7, 7, 7]], jnp.int32), (512, 1))
  objective = objectives.get("sft")
  nats_B, masked_B = objective.loss(Model(), None, rows, jax.random.key(0), schedule=Schedule("linear"),
                                    mask_id=8, bos_id=7)
  noisy = np.asarray(seen[0])
  np.testing.assert_array_equal(noisy[:, :3], np.tile([1, 2, 0], (512, 1)))
  masked_rate = (noisy[:, 3:] == 8).mean()
  assert 0.4 < masked_rate < 0.6  # linear schedule, t ~ U(0, 1): half on average
  # Uniform logits over 8 tokens on the scored positions: nats = w(t) * masked * log 8, w = 1/t.
  assert np.all(np.asarray(nats_B) < 1e3) and np.all(np.asarray(masked_B) <= 5)
  np.testing.assert_allclose(float(jnp.mean(masked_B)), masked_rate * 5, rtol=1e-6)
  with pytest.raises(UserError, match="data.source='jsonl'"):
    objective.check(ml_collections.ConfigDict({"data": {"source": "bundled"}}))


def test_sft_learns_to_reverse_the_prompt(tmp_path, data_cache):
  from configs import sft_tiny  # pylint: disable=g-import-not-at-top
  from diffusion_lm import experiment, train  # pylint: disable=g-import-not-at-top
  from diffusion_lm.generation import Generator, sampler_config  # pylint: disable=g-import-not-at-top
  pairs = _reverse_pairs(4000)
  config = sft_tiny.get_config(_write(tmp_path / "reverse.jsonl", pairs))
  config.training.num_steps = 200
  workdir = str(tmp_path / "sft")
  train.train_and_evaluate(config, workdir)
  trained = experiment.load_trained(workdir)
  split = lambda p: data.pair_split(p["prompt"], p["response"], config.data.validation_percent)
  held_out = [p for p in pairs if split(p) == "validation"][:64]
  assert not {p["prompt"] for p in held_out} & {p["prompt"] for p in pairs if split(p) == "train"}
  generator = Generator(trained.model, trained.schedule, trained.tokenizer, trained.mesh, trained.param_shardings,
                        sampler_config(config.sampling))
  template = np.concatenate([generator.template(config.data.seq_len, 1, prompt=p["prompt"]) for p in held_out])
  answers = [trained.tokenizer.decode(row)[5:9] for row in generator(trained.params, template, seed=0).tokens]
  exact = np.mean([a == p["response"] for a, p in zip(answers, held_out)])
  letters = np.mean([x == y for a, p in zip(answers, held_out) for x, y in zip(a.ljust(4), p["response"])])
  print(f"held-out prompts answered exactly: {exact:.3f}, letters right: {letters:.3f}")
  # Chance: 1 in 6**4 = 1296 for a whole answer, 1 in 6 for a letter.
  assert exact >= 0.2 and letters >= 0.6, list(zip(answers, held_out))[:5]


def _varied_prompt_rows(batch, length, vocab, seed=0):
  """Rows whose prompts are 1 to length - 2 tokens long, token id 0 in every prompt (stored as ~0 = -1)."""
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  prompt_lengths = 1 + np.arange(batch) % (length - 2)
  for row, n in zip(rows, prompt_lengths):
    row[0] = 0
    row[:n] = ~row[:n]
  return rows, length - prompt_lengths


@pytest.mark.parametrize("microbatches", [1, 4])
def test_sft_train_loss_is_each_rows_loss_over_its_answer_length(microbatches):
  """LLaDA's SFT normalisation: row b's loss over its response length n_b, then the batch mean; the mask
  rate counts response positions only. The reference divides objective.loss's per-row nats (the same
  draws) by answer lengths counted here from the rows."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from configs import sft_tiny  # pylint: disable=g-import-not-at-top
  from diffusion_lm import experiment, sharding  # pylint: disable=g-import-not-at-top
  from diffusion_lm.model import Transformer  # pylint: disable=g-import-not-at-top
  config = sft_tiny.get_config("unused.jsonl")
  config.training.update(batch_size=8, microbatches=microbatches)
  vocab, length = 9, config.data.seq_len
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = Transformer(experiment.model_config(config, vocab))
  tx, _ = experiment.make_optimizer(config)
  _, shardings = experiment.state_shardings(model, tx, mesh, length)
  state = experiment.init_state(model, tx, mesh, jax.random.key(0), length, shardings)
  rows, answer_lengths = _varied_prompt_rows(8, length, vocab)
  step = experiment.jit_train_step(config, model, tx, mesh, shardings, vocab, 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    nats_B, masked_B = objectives.get("sft").loss(
        model, state.params, jnp.asarray(rows), jax.random.fold_in(jax.random.key(3), 0),
        schedule=experiment.schedule_from_config(config), mask_id=vocab, bos_id=0)
    _, metrics = step(state, jnp.asarray(rows), jax.random.key(3))
  nats_B, masked_B = np.asarray(nats_B, np.float64), np.asarray(masked_B, np.float64)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(nats_B / answer_lengths), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["mask_rate"]), masked_B.sum() / answer_lengths.sum(), rtol=1e-6)
  assert abs(np.mean(nats_B / answer_lengths) - nats_B.mean() / length) > 0.05  # the two rules differ here


def test_sft_evaluation_counts_response_positions_only():
  """A uniform denoiser over V tokens scores log V nats per response token (the ELBO of a uniform guess),
  however long the prompts: 8 prompt positions of 12 must not dilute it to a third."""
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  vocab, length, batch = 8, 12, 512

  class Uniform:
    config = type("C", (), {"d_model": 8, "time_conditioning": False})

    def apply(self, variables, tokens, t, **kwargs):
      return jnp.zeros(tokens.shape + (vocab,), jnp.float32)

  rows = np.random.default_rng(1).integers(0, vocab, (batch, length)).astype(np.int32)
  rows[:, :8] = ~rows[:, :8]
  rows[:, 0] = ~0
  out = experiment.eval_step(None, jnp.asarray(rows), jnp.ones((batch,), bool), jax.random.key(0), model=Uniform(),
                             schedule=Schedule("linear"), mask_id=vocab, num_t_samples=4, objective="sft")
  assert int(out["tokens"]) == batch * 4
  np.testing.assert_allclose(float(out["nats"]) / float(out["tokens"]), np.log(vocab), rtol=0.06)
