"""The published decoders token for token against the authors' own code (issue: same weights, same tokens).

tests/fixtures/decoders/cases.json holds what LLaDA's `generate`, Fast-dLLM's LLaDA and Dream decoders and
Dream's `diffusion_generate` produced on two tiny random checkpoints (tools/make_decoder_fixtures.py, run
once with torch; the reference commits are in the file). Each case is imported here through the project's
own converter and decoded by samplers/published.py with the matching settings; tokens and the number of
forward passes must be equal. The reference runs suppressed the tiny heads' [MASK] logit (fixture README),
so these runs do too (keep_mask_logit=False); the kept-[MASK]-logit path is checked in test_published.py.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import convert, experiment, sampling
from diffusion_lm.samplers import published

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "decoders")
with open(os.path.join(HERE, "cases.json"), encoding="utf-8") as _f:
  FIXTURE = json.load(_f)
CASES = FIXTURE["cases"]
STAND_INS = FIXTURE["llada_eos_stand_ins"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("reference_decoders")
  out = {}
  for name in ("llada_gen", "dream_gen"):
    convert.import_hf(os.path.join(HERE, name), str(root / name), seq_len=64)
    out[name] = experiment.load_trained(str(root / name))
  return out


def settings_of(case) -> dict:
  """The project's SamplerConfig fields for a reference call."""
  kw, fn = case["kwargs"], case["reference"].rsplit(":", 1)[-1]
  file = case["reference"].split(":")[1]
  if file == "generate.py" and case["reference"].startswith("LLaDA"):
    return dict(name="llada", steps=kw["steps"], block_length=kw["block_length"], guidance=kw["cfg_scale"],
                confidence=kw["remasking"], logits_eos_inf=kw.get("logits_eos_inf", False),
                confidence_eos_eot_inf=kw.get("confidence_eos_eot_inf", False))
  if file == "llada/generate.py":
    cache = {"generate": "none", "generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}[fn]
    return dict(name="fast_dllm", steps=kw["steps"], block_length=kw["block_length"], confidence=kw["remasking"],
                threshold=kw["threshold"] or 0.0, factor=kw["factor"] or 0.0, approx_cache=cache)
  common = dict(steps=kw["steps"], eps=kw["eps"], alg_temp=kw["alg_temp"] or 0.0,
                top_p=kw["top_p"] or 1.0, top_k=kw["top_k"] or 0)
  if file == "dream/model/generation_utils.py":
    if kw["alg"] == "confidence_threshold":
      return dict(name="fast_dllm", threshold=kw["threshold"], approx_cache="none", **common)
    return dict(name="dream", confidence=kw["alg"], **common)
  assert file == "dream/model/generation_utils_block.py", file
  cache = "dual" if kw["dual_cache"] else "prefix"
  threshold = kw["threshold"] if kw["alg"] == "confidence_threshold" else 0.0
  return dict(name="fast_dllm", block_length=kw["block_length"], threshold=threshold, approx_cache=cache, **common)


@functools.lru_cache(maxsize=None)
def _decoder(model, cfg, gen_start: int, mask_id: int):
  return jax.jit(lambda params, tokens: published.sample(
      model, params, jax.random.key(0), tokens, jnp.arange(tokens.shape[0]), cfg, gen_start=gen_start,
      mask_id=mask_id, eos_id=STAND_INS["eos"], eot_id=STAND_INS["eot"], keep_mask_logit=False))


def decode(trained, case):
  cfg = sampling.SamplerConfig(temperature=0.0, **settings_of(case))
  prompt = np.asarray(case["prompt"], np.int32)
  total = np.asarray(case["output"]).shape[1]
  mask = trained.tokenizer.mask_id
  tokens = np.concatenate([prompt, np.full((prompt.shape[0], total - prompt.shape[1]), mask, np.int32)], axis=1)
  out = _decoder(trained.model, cfg, prompt.shape[1], mask)(trained.params, jnp.asarray(tokens))
  return np.asarray(out.tokens), int(out.num_calls)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_same_tokens_and_forward_passes_as_the_reference(models, case):
  tokens, calls = decode(models[case["model"]], case)
  np.testing.assert_array_equal(tokens, np.asarray(case["output"]), err_msg=case["id"])
  assert calls == case["forward_passes"], case["id"]


@pytest.mark.parametrize("flt", FIXTURE["filters"], ids=lambda f: f"{f['reference'].rsplit(':', 1)[-1]}-{f['kwargs']}")
def test_dream_filters_remove_what_the_reference_removes(flt):
  logits = jnp.asarray(np.asarray(flt["logits"], np.float32))
  got = np.asarray(published.dream_filter(logits, flt["kwargs"].get("top_p", 1.0), flt["kwargs"].get("top_k", 0)))
  np.testing.assert_array_equal(got, np.asarray(flt["filtered"], np.float32))
