"""The published decoders (samplers/published.py) against independent plain-numpy transcriptions of the
authors' decoding loops, on the imported tiny LLaDA / Dream logit fixtures.

The token-exact comparison with the authors' own code lives in test_reference_decoders.py (fixtures made
by tools/make_decoder_fixtures.py with torch); here the rules are checked one by one, with the counts the
references print (LLaDA: 32 tokens in 12 steps; Dream: 32 tokens in 8 steps) written out by hand.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import convert, experiment, generation, sampling
from diffusion_lm.errors import UserError
from diffusion_lm.samplers import published

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("published")
  out = {}
  for family in ("llada", "dream"):
    convert.import_hf(os.path.join(FIXTURES, family), str(root / family))
    out[family] = experiment.load_trained(str(root / family))
  return out


def test_llada_counts_are_its_even_split():
  counts = [int(published.llada_counts(jnp.array([32]), 12, i)[0]) for i in range(12)]
  assert counts == [3] * 8 + [2] * 4  # LLaDA's get_num_transfer_tokens for 32 tokens in 12 steps
  assert [int(published.llada_counts(jnp.array([8]), 12, i)[0]) for i in range(12)] == [1] * 8 + [0] * 4


def test_dream_counts_follow_its_time_grid():
  grid = jnp.asarray(published.torch_linspace_f32(1.0, 1e-3, 9))
  left, counts = 32, []
  for i in range(8):
    c = int(published.dream_count(jnp.array([left]), grid, i, 8)[0])
    counts.append(c)
    left -= c
  assert counts == [3, 4, 4, 4, 4, 4, 4, 5]  # Dream's diffusion_generate, 8 steps over 32 tokens
  assert published.torch_linspace_f32(1.0, 1e-3, 9)[[0, 4, 8]].tolist() == pytest.approx([1.0, 0.5005, 1e-3])


def test_factor_rule_matches_a_plain_transcription():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n_cand = int(rng.integers(1, 9))
    conf = np.sort(rng.uniform(0.3, 1.0, 8))[::-1] if rng.random() < 0.5 else rng.uniform(0.3, 1.0, 8)
    cand = np.zeros(8, bool)
    cand[rng.choice(8, n_cand, replace=False)] = True
    factor = float(rng.choice([0.5, 1.0, 2.0]))
    ranked = sorted(conf[cand], reverse=True)
    bars = [-1.0] + [1 - factor / (n + 1) for n in range(2, len(ranked) + 1)]
    stop = len(ranked) - 1
    for k in range(len(ranked)):
      if ranked[k] < bars[k]:
        stop = k
        break
    if stop == 0 or stop == len(ranked) - 1:
      stop += 1
    got = int(published.factor_counts(jnp.asarray(conf[None]), jnp.asarray(cand[None]), factor)[0])
    assert got == stop, (conf, cand, factor)


def test_dream_filter_matches_its_sort_cumsum_rule():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 11)).astype(np.float32) * 2
  for top_p, top_k in ((0.9, 0), (0.5, 0), (1.0, 3), (0.7, 2)):
    expect = logits.copy()
    low = np.finfo(np.float32).min
    if top_p < 1:
      for r in range(3):
        order = np.argsort(-expect[r], kind="stable")
        p = np.exp(expect[r][order] - expect[r].max())
        cum = np.cumsum(p / p.sum())
        remove = np.concatenate([[False], cum[:-1] > top_p])
        expect[r, order[remove]] = low
    if top_k:
      kth = np.sort(expect, axis=-1)[:, -top_k][:, None]
      expect = np.where(expect < kth, low, expect)
    got = np.asarray(published.dream_filter(jnp.asarray(logits), top_p, top_k))
    np.testing.assert_array_equal(got == low, expect == low)


# ----------------------------------------------------------------------------- whole decoders


def _logits_fn(trained):
  fwd = jax.jit(lambda x: trained.model.apply({"params": trained.params}, x, None, keep_mask_logit=True))
  return lambda x: np.asarray(fwd(jnp.asarray(x)), np.float64)


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _topk_lowest(conf, k):
  """Indices of the k largest, ties to the lowest position."""
  return np.argsort(-conf, kind="stable")[:k]


def oracle_llada(logits_fn, x, prompt_len, gen_len, block, steps, mask, mode="count", threshold=None,
                 factor=None, cfg=0.0):
  """LLaDA's generate (mode=count, exactly `steps` forwards) / Fast-dLLM's no-cache loop (until done)."""
  x = x.copy()
  given = x != mask
  nfe = 0
  spb = steps // (gen_len // block)
  for b in range(gen_len // block):
    s, e = prompt_len + b * block, prompt_len + (b + 1) * block
    n0 = int((x[0, s:e] == mask).sum())
    counts = [n0 // spb + (1 if i < n0 % spb else 0) for i in range(spb)]
    i = 0
    while True:
      logits = logits_fn(x)
      if cfg > 0:
        un = logits_fn(np.where(given, mask, x))
        logits = un + (cfg + 1) * (logits - un)
      nfe += 1
      x0 = logits.argmax(-1)
      p = np.take_along_axis(_softmax(logits), x0[..., None], -1)[..., 0]
      cand = (x[0] == mask) & (np.arange(x.shape[1]) < e)
      conf = np.where(cand, p[0], -np.inf)
      if threshold is not None:
        order = _topk_lowest(conf, int(cand.sum()))
        chosen = [order[0]] + [j for j in order[1:] if conf[j] >= threshold]
      elif factor is not None:
        ranked = np.sort(conf[cand])[::-1]
        k = len(ranked) - 1
        for j in range(len(ranked)):
          if j > 0 and ranked[j] < 1 - factor / (j + 2):
            k = j
            break
        k = k + 1 if k in (0, len(ranked) - 1) else k
        chosen = _topk_lowest(conf, k)
      else:
        chosen = _topk_lowest(conf, counts[i]) if counts[i] else []
      for j in chosen:
        x[0, j] = x0[0, j]
      i += 1
      if mode == "count" and i == spb:
        break
      if mode != "count" and not (x[0, s:e] == mask).any():
        break
  return x, nfe


def oracle_dream(logits_fn, x, steps, mask, kind):
  x = x.copy()
  grid = published.torch_linspace_f32(1.0, 1e-3, steps + 1)
  for i in range(steps):
    logits = logits_fn(x).astype(np.float32)
    probs = _softmax(logits.astype(np.float64)).astype(np.float32)
    x0 = probs.argmax(-1)
    if kind == "max_prob":
      conf = probs.max(-1)
    elif kind == "margin":
      top = np.sort(probs, -1)
      conf = top[..., -1] - top[..., -2]
    else:
      conf = (probs * np.log(probs + 1e-10)).sum(-1)
    cand = x[0] == mask
    n = int(cand.sum())
    count = int(np.float32(n) * (np.float32(1) - grid[i + 1] / grid[i])) if i < steps - 1 else n
    for j in _topk_lowest(np.where(cand, conf[0], -np.inf), count):
      x[0, j] = x0[0, j]
  return x, steps


def _run(trained, prompt, gen_len, **settings):
  cfg = sampling.SamplerConfig(temperature=0.0, **settings)
  gen = generation.Generator(trained.model, trained.schedule, trained.tokenizer, trained.mesh,
                             trained.param_shardings, cfg)
  mask = trained.tokenizer.mask_id
  x = np.concatenate([prompt, np.full((1, gen_len), mask, np.int32)], axis=1)
  out = gen(trained.params, x, seed=0)
  return x, out.tokens[:1], int(out.num_calls)


PROMPT6 = np.array([[5, 9, 11, 3, 20, 7]], np.int32)


@pytest.mark.parametrize("settings", [
    dict(name="llada", steps=6, block_length=8),  # steps that do not divide the block's 8 tokens
    dict(name="llada", steps=16, block_length=8),  # 6-token prompt, blocks of 8 from its end
    dict(name="llada", steps=8, block_length=16, guidance=1.5),
    dict(name="fast_dllm", threshold=0.05, block_length=8),
    dict(name="fast_dllm", factor=1.0, threshold=0.0, block_length=8),
    dict(name="fast_dllm", threshold=0.0, steps=4, block_length=8),
])
def test_llada_family_matches_the_transcription(models, settings):
  trained = models["llada"]
  x, ours, calls = _run(trained, PROMPT6, 16, **settings)
  mode = "count" if settings["name"] == "llada" else "until_done"
  ref, nfe = oracle_llada(_logits_fn(trained), x, 6, 16, settings["block_length"], settings.get("steps", 16),
                          trained.tokenizer.mask_id, mode=mode,
                          threshold=settings.get("threshold") or None if "factor" not in settings else None,
                          factor=settings.get("factor"), cfg=settings.get("guidance", 0.0))
  np.testing.assert_array_equal(ours, ref)
  assert calls == nfe


@pytest.mark.parametrize("kind", ["max_prob", "margin", "entropy"])
def test_dream_matches_the_transcription(models, kind):
  trained = models["dream"]
  x, ours, calls = _run(trained, PROMPT6[:, :5], 24, name="dream", steps=8, confidence=kind)
  ref, nfe = oracle_dream(_logits_fn(trained), x, 8, trained.tokenizer.mask_id, kind)
  np.testing.assert_array_equal(ours, ref)
  assert calls == nfe == 8


def test_cached_fast_dllm_makes_the_counted_passes(models):
  """With LLaDA's counts every mode makes steps forward passes (one full, then cached ones per block) and
  keeps the prompt; token-exactness of the caches is test_reference_decoders' job."""
  trained = models["llada"]
  for cache in ("prefix", "dual"):
    x, out, calls = _run(trained, PROMPT6, 16, name="fast_dllm", threshold=0.0, steps=16, block_length=8,
                         approx_cache=cache)
    assert calls == 16 and (out[:, :6] == PROMPT6).all() and not (out == trained.tokenizer.mask_id).all()


def test_published_settings_are_checked(models):
  trained = models["llada"]
  with pytest.raises(UserError, match="block_length=8 does not divide the 12"):
    _run(trained, PROMPT6, 12, name="llada", steps=12, block_length=8)
  with pytest.raises(UserError, match="steps=3 is not a multiple of the 2 blocks"):
    _run(trained, PROMPT6, 16, name="llada", steps=3, block_length=8)
  with pytest.raises(UserError, match="confidence='margin' with sampler='llada'"):
    sampling.SamplerConfig(name="llada", confidence="margin")
  with pytest.raises(UserError, match="threshold=0.0; allowed: 0 < threshold <= 1$"):
    sampling.SamplerConfig(name="threshold", threshold=0.0)
  assert sampling.SamplerConfig(name="dream", confidence="topk_margin").confidence == "margin"
