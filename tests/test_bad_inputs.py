"""Bad inputs through the Python API and the files a run keeps (issue 23): a UserError naming the value, or
the right behaviour; never a traceback or a silent wrong answer. The command-line cases are in
tests/test_catalogue.py."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from diffusion_lm import api, experiment, sampling
from diffusion_lm.errors import MAX_SEED, UserError
from diffusion_lm.metrics import MetricWriter
from diffusion_lm.tokenizers import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(trained_workdir):
  return api.load(trained_workdir)


@pytest.mark.parametrize("seed", [MAX_SEED + 1, 2**40, -1, "abc", 1.0, True])
def test_a_seed_outside_32_bits_is_refused_not_wrapped(run, seed):
  with pytest.raises(UserError, match=re.escape(f"seed={seed!r}; allowed: an integer from 0 to {MAX_SEED}")):
    run.generate(seed=seed)


def test_the_largest_seed_is_its_own(run):
  """2^32 - 1 is accepted and gives its own samples, not seed 0's (np.uint32 passes as an integer)."""
  top = run.sample(seed=np.uint32(MAX_SEED), num_samples=2).output.tokens
  zero = run.sample(seed=0, num_samples=2).output.tokens
  assert not np.array_equal(top, zero)


def test_config_seeds_are_checked_before_any_work(tiny_config):
  for field in ("seed", "sampling.seed", "evaluation.seed"):
    config = tiny_config.copy_and_resolve_references()
    group, _, name = field.rpartition(".")
    (config[group] if group else config)[name] = MAX_SEED + 1
    with pytest.raises(UserError, match=f"{field}={MAX_SEED + 1}; allowed"):
      experiment.check_config(config)


@pytest.mark.parametrize("infill, bad", [("ab [MASK*x] cd [MASK*3] ef", "[MASK*x]"), ("ab [mask*4] cd [MASK] ef", "[mask*4]"),
                                         ("[MASK *2] [MASK]", "[MASK *2]"), ("[MASK*x]", "[MASK*x]")])
def test_a_malformed_infill_hole_is_refused_even_beside_a_valid_one(infill, bad):
  tokenizer = CharTokenizer(sorted(set("abcdefMASK*x []")))
  with pytest.raises(UserError, match=re.escape(f"infill hole {bad!r} is malformed")):
    sampling.template_tokens(tokenizer, 32, infill=infill)


def test_valid_infill_holes_still_work():
  tokenizer = CharTokenizer(sorted(set("abcdef ")))
  row = sampling.template_tokens(tokenizer, 12, infill="ab [MASK*3] c[MASK]d")
  m = tokenizer.mask_id
  want = tokenizer.encode("ab ") + [m] * 3 + tokenizer.encode(" c") + [m] + tokenizer.encode("d")
  assert row.tolist() == want + [m] * (12 - len(want))


@pytest.mark.parametrize("call, message", [
    (lambda: api.load(None), "workdir=None; allowed: the path of a trained workdir"),
    ("generate_prompt", "prompt=123; allowed: a string"),
    ("evaluate_keyword", "unknown evaluate setting 'bogus'; allowed: split, max_batches, num_t_samples, seed"),
])
def test_api_arguments_are_named(run, call, message):
  calls = {"generate_prompt": lambda: run.generate(prompt=123), "evaluate_keyword": lambda: run.evaluate(bogus=1)}
  with pytest.raises(UserError, match=re.escape(message)):
    (calls[call] if isinstance(call, str) else call)()


def test_a_metrics_line_cut_by_a_kill_is_dropped_not_glued_onto(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.5}\n{"step": 3, "train/lo')
  assert api.read_metrics(str(tmp_path))["step"].tolist() == [1, 2]  # readable as it is
  writer = MetricWriter(str(tmp_path), enabled=True)  # a resumed run
  writer.write_scalars(3, {"train/loss": 2.0})
  writer.close()
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["train/loss"] == 2.0
  table = api.read_metrics(str(tmp_path))
  assert table["step"].tolist() == [1, 2, 3] and table["train/loss"].tolist() == [3.0, 2.5, 2.0]


def test_a_bad_metrics_line_in_the_middle_is_named(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(UserError, match="metrics.jsonl: line 2 is not a metrics record"):
    api.read_metrics(str(tmp_path))


def test_evaluate_prints_its_result_when_eval_jsonl_cannot_be_written(trained_workdir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_workdir, workdir)
  target = os.path.join(workdir, "eval.jsonl")
  if os.path.isfile(target):  # an earlier evaluation of the shared workdir wrote one
    os.remove(target)
  os.makedirs(target)  # unwritable as a file, even for root
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.evaluate", f"--workdir={workdir}", "--max_batches=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["checkpoint_step"] == 6 and record["bits_per_char"] > 0
  assert "Traceback" not in out.stderr
  assert [line for line in out.stderr.splitlines() if line.startswith("warning:")] == [
      f"warning: could not append the result to {workdir}/eval.jsonl (Is a directory); it is printed above only"]


def test_model_settings_are_refused_before_any_data_is_prepared(tmp_path, tiny_config):
  from diffusion_lm.train import train_and_evaluate
  tiny_config.model.num_heads = 3  # 32 / 3 is no even head width
  tiny_config.data.cache_dir = str(tmp_path / "cache")
  workdir = tmp_path / "run"
  with pytest.raises(UserError, match="model.d_model=32 with num_heads=3"):
    train_and_evaluate(tiny_config, str(workdir))
  assert not (workdir / "tokenizer.json").exists() and not (tmp_path / "cache").exists()


def test_a_character_only_in_the_validation_split_names_the_split_and_the_fix(tmp_path):
  from diffusion_lm import data
  tokenizer = CharTokenizer(sorted(set("abc ")))  # what the train split held
  split = data.TextSplit(name="validation", fingerprint="f", source=[{"text": "abc"}, {"text": "ab\u00e9"}],
                         order=np.arange(2), doc_ends=np.ones(2, bool), text_key="text")
  with pytest.raises(UserError) as e:
    data.tokenize_split(split, tokenizer, str(tmp_path), coordinate=False, processes=1)
  message = str(e.value)
  assert message.startswith("the 'validation' split: character '\u00e9' is not in the character vocabulary")
  assert "built from the train split only" in message and "tokenizer.kind=sentencepiece" in message
