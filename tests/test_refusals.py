"""Settings that used to be accepted and silently ignored or mis-handled: each is now a one-line error."""

import jax
import jax.numpy as jnp
import pytest

from diffusion_lm import api, checkpointing, objectives, sampling
from diffusion_lm.distill import distill
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig, Transformer
from diffusion_lm.schedules import Schedule


def _model(**fields):
  return Transformer(ModelConfig(vocab_size=11, num_layers=1, d_model=16, num_heads=2, mlp_dim=32, max_len=16,
                                 **fields))


def _generate(objective, model, length, cfg):
  tokens = jnp.full((2, length), 11, jnp.int32)
  return objectives.get(objective).generate(model, None, jax.random.key(0), tokens, jnp.arange(2), cfg,
                                            schedule=Schedule("linear"), mask_id=11, bos_id=0, eos_id=0)


@pytest.mark.parametrize("objective, fields", [("block", {"block_size": 4}), ("ar", {"causal": True})])
def test_guidance_is_refused_where_no_unconditional_pass_exists(objective, fields):
  with pytest.raises(UserError, match=r"^guidance=3.0 for an? (block-diffusion|autoregressive) model; allowed: 0"):
    _generate(objective, _model(**fields), 16, sampling.SamplerConfig("ancestral", guidance=3.0))


@pytest.mark.parametrize("objective, fields", [("ar", {"causal": True}), ("block", {"block_size": 4})])
def test_learned_positions_do_not_decode_past_max_len(objective, fields):
  model = _model(position="learned", **fields)
  with pytest.raises(UserError, match=r"^sequence length 20 with model.position='learned'; allowed: at most the "
                                      r"model's max_len=16"):
    _generate(objective, model, 20, sampling.SamplerConfig("ancestral"))

  class Trained:  # what generation_length reads of a loaded workdir
    config = type("C", (), {"data": type("D", (), {"seq_len": 16})})
    tokenizer = None

  Trained.model = model
  with pytest.raises(UserError, match=r"^seq_len=20; allowed: 1 to the model's max_len=16"):
    api.generation_length(Trained, seq_len=20)
  Trained.model = _model(**fields)  # rotary positions: a sliding cache goes past max_len
  assert api.generation_length(Trained, seq_len=20) == 20


def test_an_sft_workdir_is_refused_as_a_distillation_teacher(tmp_path, monkeypatch):
  """Its rows hold prompts stored as ~id: the distiller would mask and score them as text."""
  from configs import distill as distill_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpointing, "read_saved_config",
                      lambda workdir: (5, {"objective": "sft"}) if "teacher" in str(workdir) else (None, None))
  with pytest.raises(UserError, match=r"^--teacher_workdir='.*teacher' holds an 'sft' model .*allowed: a "
                                      r"masked-diffusion or block-diffusion teacher"):
    distill(distill_config.get_config(), str(tmp_path / "teacher"), str(tmp_path / "student"))
