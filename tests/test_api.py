"""The Python API: diffusion_lm.load(workdir) -> Run.generate / sample / evaluate / metrics."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import diffusion_lm
from diffusion_lm import api
from diffusion_lm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(trained_workdir):
  return diffusion_lm.load(trained_workdir)


def test_generate_is_what_the_sample_command_prints(run, trained_workdir):
  texts = run.generate(prompt="KING.", num_samples=3, sampler="confidence", steps=8, seed=5, temperature=0.7)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.sample", f"--workdir={trained_workdir}", "--json",
                        "--prompt=KING.", "--num_samples=3", "--sampler=confidence", "--steps=8", "--seed=5",
                        "--temperature=0.7"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert [json.loads(line)["text"] for line in out.stdout.splitlines()] == texts
  assert all(t.startswith("KING.") and len(t) == 32 for t in texts)  # char model: 32 tokens, 32 characters
  assert run.generate(prompt="KING.", num_samples=3, sampler="confidence", steps=8, seed=5, temperature=0.7) == texts
  assert run.generate(prompt="KING.", num_samples=3, sampler="confidence", steps=8, seed=6, temperature=0.7) != texts


def test_sample_keeps_the_given_text_and_reports_its_settings(run):
  generation = run.sample(infill="To be, [MASK*6] the question.", num_samples=2, seed=1, return_trajectory=True)
  for text in generation.texts:
    assert text.startswith("To be, ") and text[7 + 6:].startswith(" the question.")
  masked = generation.template == run.tokenizer.mask_id
  given = len("To be, ") + len(" the question.")
  assert masked.sum(axis=1).tolist() == [32 - given] * 2  # the [MASK*6] and the positions after the text
  assert generation.sampler.steps == run.config.sampling.steps  # the checkpoint config's, none given
  assert generation.output.trajectory.shape[1:] == (2, 32) and generation.step == run.step == 6
  assert "2 samples, 32 tokens, ancestral sampler, 8 steps, seed 1, checkpoint step 6" == generation.describe()


def test_bad_arguments_are_one_line_errors(run, tmp_path):
  with pytest.raises(UserError, match="unknown sampler setting 'temprature'; allowed: steps, temperature"):
    run.generate(temprature=0.5)
  with pytest.raises(UserError, match="num_samples=0; allowed: an integer >= 1"):
    run.generate(num_samples=0)
  with pytest.raises(UserError, match="seq_len=64; allowed: 1 to the model's max_len=32"):
    run.generate(seq_len=64)
  with pytest.raises(UserError, match="max_new_tokens sets the length after the prompt"):
    run.generate(infill="a [MASK] b", max_new_tokens=4)
  with pytest.raises(UserError, match="holds no checkpoint"):
    diffusion_lm.load(str(tmp_path))
  with pytest.raises(UserError, match="has no metrics.jsonl"):
    api.read_metrics(str(tmp_path))


def test_evaluate_scores_the_split_reproducibly(run):
  record = run.evaluate(max_batches=1)
  assert record["windows_scored"] == 8 and record["tokens_scored"] == 8 * 32  # evaluation.batch_size = 8
  assert record["checkpoint_step"] == 6 and record["params"] == "ema" and record["split"] == "validation"
  assert record["bits_per_token"] == pytest.approx(record["nll_per_token"] / math.log(2))
  assert run.evaluate(max_batches=1) == record
  assert run.config.evaluation.max_batches == 2  # the run's own config is left as it was


def test_metrics_table_merges_each_steps_lines(run, trained_workdir, tmp_path):
  table = run.metrics()
  logged = [json.loads(line) for line in open(os.path.join(trained_workdir, "metrics.jsonl"))]
  train = {r["step"]: r["train/loss"] for r in logged if "train/loss" in r}
  evals = {r["step"]: r["eval/bits_per_char"] for r in logged if "eval/bits_per_char" in r}
  assert table["step"].tolist() == sorted(set(train) | set(evals)) == [2, 4, 6]
  assert table["train/loss"].tolist() == [train[s] for s in (2, 4, 6)]
  assert np.isnan(table["eval/bits_per_char"][:2]).all() and table["eval/bits_per_char"][2] == evals[6]
  assert "train/loss" in repr(table).splitlines()[0] and len(repr(table).splitlines()) == 4

  # A resumed run logs again the steps after its last checkpoint: the last line of a step wins.
  lines = [{"step": 1, "time": 1.0, "train/loss": 3.0}, {"step": 2, "time": 2.0, "train/loss": 2.5},
           {"step": 2, "time": 9.0, "train/loss": 2.4}, {"step": 2, "time": 9.1, "eval/bits_per_char": 4.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  resumed = api.read_metrics(str(tmp_path))
  assert resumed["step"].tolist() == [1, 2] and resumed["train/loss"].tolist() == [3.0, 2.4]
  assert resumed.rows() == [{"step": 1, "time": 1.0, "train/loss": 3.0},
                            {"step": 2, "time": 9.1, "train/loss": 2.4, "eval/bits_per_char": 4.0}]
