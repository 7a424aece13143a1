"""The decoder reference checkpoints (tests/fixtures/decoders) import as the networks that made the references.

tools/make_decoder_fixtures.py ran the authors' LLaDA, Fast-dLLM and Dream decoders on these two tiny random
checkpoints. A token-exact comparison of the project's decoders with cases.json means something only if the
imported networks compute the logits that the reference models computed; reference.npz holds those models'
float32 logits on a masked input (Dream's raw, before its shift), computed by the authors' modeling files.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import convert, experiment
from diffusion_lm.model import MASK_LOGIT

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "decoders")


@pytest.mark.parametrize("name", ["llada_gen", "dream_gen"])
def test_imported_logits_match_reference_model(tmp_path, name):
  convert.import_hf(os.path.join(FIXTURES, name), str(tmp_path))
  trained = experiment.load_trained(str(tmp_path))
  cfg = trained.model.config
  ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
  want = ref["logits"]
  if name == "dream_gen":  # the raw output at i predicts token i + 1; the model's comes out aligned
    want = np.concatenate([want[:, :1], want[:, :-1]], axis=1)
    assert cfg.shift_logits and cfg.qkv_bias and cfg.num_kv_heads == 2
  got = np.asarray(trained.model.apply({"params": trained.params}, jnp.asarray(ref["tokens"])))
  assert got.shape == want.shape == (2, 24, 96)
  with open(os.path.join(FIXTURES, "cases.json")) as f:
    mask_id = json.load(f)["mask_token_id"]
  assert cfg.mask_token_id == mask_id
  keep = np.arange(want.shape[-1]) != mask_id  # the references ran with this column at MASK_LOGIT too
  assert np.abs(got[..., keep] - want[..., keep]).max() <= 1e-4
  np.testing.assert_array_equal(got[..., mask_id], MASK_LOGIT)
