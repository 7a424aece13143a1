"""Benchmarks (diffusion_lm/lm_eval.py): LLaDA's Monte-Carlo likelihood against exact enumeration, the exact
AR likelihood against a direct forward, the local task runner and its command."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import convert, experiment, lm_eval
from diffusion_lm.errors import UserError

HF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "lm_eval", "tiny_tasks.jsonl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_eval")
  out = {}
  for family in ("llada", "llama"):
    convert.import_hf(os.path.join(HF, family), str(root / family))
    out[family] = str(root / family)
  return out


def _logp(trained, tokens):
  """float64 log-softmax of the raw logits (the [MASK] logit kept) of one row."""
  logits = trained.model.apply({"params": trained.params}, jnp.asarray(tokens)[None], None, keep_mask_logit=True)
  return np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float64), -1))


def test_mask_counts_cover_every_rate():
  for t in (1, 2, 5, 8):
    counts = np.asarray(lm_eval.llada_mask_counts(jax.random.key(t), 8, t))
    assert counts.min() >= 1 and counts.max() <= t
    if t <= 8:
      assert len(set(counts.tolist())) == min(t, 8)  # one batch spreads over the rates


def test_monte_carlo_likelihood_is_exact_for_one_token_and_unbiased_for_two(workdirs):
  trained = experiment.load_trained(workdirs["llada"])
  ev = lm_eval.Evaluator(trained, mc_num=4, batch_size=2)
  seq, p = ev.encode_pair("the cat", " ")
  assert len(seq) - p == 1
  masked = seq.copy()
  masked[p] = trained.tokenizer.mask_id
  exact = _logp(trained, masked)[p, seq[p]]
  assert ev.loglikelihood("the cat", " ")[0] == pytest.approx(exact, abs=1e-4)

  seq, p = ev.encode_pair("the cat", " s")
  assert len(seq) - p == 2
  mask = trained.tokenizer.mask_id
  ce = {}
  for subset in ((p,), (p + 1,), (p, p + 1)):
    x = seq.copy()
    x[list(subset)] = mask
    lp = _logp(trained, x)
    ce[subset] = -sum(lp[i, seq[i]] for i in subset)
  # k = 1 (weight 2, either position) and k = 2 (weight 1) equally often: LLaDA's spread over a batch of 2.
  expected = -(0.5 * 0.5 * 2 * (ce[(p,)] + ce[(p + 1,)]) + 0.5 * ce[(p, p + 1)])
  ev = lm_eval.Evaluator(trained, mc_num=512, batch_size=2)
  sigma = abs(ce[(p,)] - ce[(p + 1,)]) / 2 / np.sqrt(256)
  assert ev.loglikelihood("the cat", " s")[0] == pytest.approx(expected, abs=4 * sigma + 1e-4)


def test_autoregressive_likelihood_is_exact(workdirs):
  trained = experiment.load_trained(workdirs["llama"])
  ev = lm_eval.Evaluator(trained, mc_num=4, batch_size=4)
  seq, p = ev.encode_pair("the cat sat", " on")
  lp = _logp(trained, seq)
  expected = sum(lp[i - 1, seq[i]] for i in range(p, len(seq)))
  greedy = all(lp[i - 1].argmax() == seq[i] for i in range(p, len(seq)))
  assert ev.loglikelihood("the cat sat", " on") == (pytest.approx(expected, abs=1e-4), greedy)


def test_local_tasks_score_by_the_highest_likelihood(workdirs):
  trained = experiment.load_trained(workdirs["llama"])
  ev = lm_eval.Evaluator(trained, mc_num=4, batch_size=4, max_gen_toks=8)
  records = {r["task"]: r for r in lm_eval.run_tasks(ev, TASKS)}
  rows = [json.loads(line) for line in open(TASKS, encoding="utf-8")]
  hits = []
  for row in rows[:3]:
    lls = []
    for choice in row["choices"]:
      seq, p = ev.encode_pair(row["context"], choice)
      lp = _logp(trained, seq)
      lls.append(sum(lp[i - 1, seq[i]] for i in range(p, len(seq))))
    hits.append(int(np.argmax(lls)) == row["gold"])
  assert records["tiny_mc"] == {"task": "tiny_mc", "acc": float(np.mean(hits)), "n": 3}
  assert records["tiny_gen"]["n"] == 1 and records["tiny_gen"]["exact_match"] in (0.0, 1.0)
  text = ev.generate_until("the cat sat", ["\n", "."], 8)
  assert "." not in text and "\n" not in text


def test_bad_settings_are_one_line(workdirs):
  trained = experiment.load_trained(workdirs["llada"])
  with pytest.raises(UserError, match="mc_num=10, batch_size=4"):
    lm_eval.Evaluator(trained, mc_num=10, batch_size=4)


def test_command_runs_the_local_tasks(workdirs):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.lm_eval", f"--workdir={workdirs['llada']}",
                        f"--tasks={TASKS}", "--mc_num=4", "--batch_size=2", "--max_gen_toks=8", "--steps=8",
                        "--block_length=8"],
                       capture_output=True, text=True, env=env, timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert {r["task"] for r in records} == {"tiny_mc", "tiny_gen"} and all(r["mc_num"] == 4 for r in records)


def test_block_likelihood_is_unbiased_for_blocks_of_one(workdirs):
  """A block-diffusion model's estimate: with blocks of one token its expectation is the sum over continuation
  tokens of -log p(x_i | clean x_<i, [MASK] at i), which a causal pass over [x_<i, MASK] gives independently."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from diffusion_lm.model import Transformer  # pylint: disable=g-import-not-at-top
  trained = experiment.load_trained(workdirs["llada"])
  cfg = trained.model.config
  blocky = dataclasses.replace(trained, model=Transformer(dataclasses.replace(cfg, block_size=1)))
  causal = Transformer(dataclasses.replace(cfg, causal=True, block_size=0))
  ev = lm_eval.Evaluator(blocky, mc_num=2048, batch_size=256)
  seq, p = ev.encode_pair("the cat", " sat")
  assert len(seq) - p >= 2
  nll = []
  for i in range(p, len(seq)):
    x = np.append(seq[:i], blocky.tokenizer.mask_id)
    logits = causal.apply({"params": trained.params}, jnp.asarray(x)[None], None)
    nll.append(-float(jax.nn.log_softmax(np.asarray(logits[0, i], np.float64))[seq[i]]))
  # Per token the estimate is 1{masked} / t * nll with t ~ U[T_MIN, 1]: variance nll^2 (log(1 / T_MIN) - 1).
  sigma = np.sqrt(sum(n * n for n in nll) * (np.log(1e3) - 1) / 2048)
  assert ev.loglikelihood("the cat", " sat")[0] == pytest.approx(-sum(nll), abs=4 * sigma)
  # Blocks of four: the context's positions never scored (a context twice as long scores the same tokens).
  four = dataclasses.replace(trained, model=Transformer(dataclasses.replace(cfg, block_size=4)))
  value = lm_eval.Evaluator(four, mc_num=16, batch_size=16).loglikelihood("the cat", " sat")[0]
  assert -4 * sum(nll) < value < 0
