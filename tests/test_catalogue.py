"""The bad-input catalogue: every case is one `error:` line, exit code 2, no traceback, workdir untouched.

The README's troubleshooting table lists the same cases.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
TINY = ["--config=configs/tiny.py"]


def _corpus(tmp_path, kind):
  folder = tmp_path / "corpus"
  folder.mkdir(exist_ok=True)
  if kind == "empty":
    (folder / "a.txt").write_text("")
  elif kind == "binary":
    (folder / "a.txt").write_bytes(b"\x00\x01\x02\x03" * 500)
  elif kind == "latin1":
    (folder / "a.txt").write_bytes("Caf\u00e9 cr\u00e8me\n".encode("latin-1") * 500)
  return str(folder)


# (case id, module, args with {workdir} / {corpus:kind} / {tmp} placeholders, expected message fragment)
CASES = [
    ("unknown-config-key", "train", TINY + ["--config.model.num_layer=3"],
     "unknown config key '--config.model.num_layer'; did you mean 'num_layers'?"),
    ("wrong-type", "train", TINY + ["--config.model.num_layers=three"], "invalid literal for int()"),
    ("non-positive-layers", "train", TINY + ["--config.model.num_layers=0"],
     "model.num_layers=0; allowed: an integer >= 1"),
    ("non-positive-batch", "train", TINY + ["--config.training.batch_size=0"],
     "training.batch_size=0; allowed: an integer >= 1"),
    ("unknown-schedule", "train", TINY + ["--config.diffusion.name=sqrt"],
     "unknown schedule 'sqrt'; allowed: linear, cosine, polynomial, geometric, mlm"),
    ("unknown-objective", "train", TINY + ["--config.objective=gan"], "objective='gan'; allowed: diffusion, ar, block"),
    ("missing-corpus", "train", TINY + ["--config.data.source=local", "--config.data.path={tmp}/nope"],
     "does not exist"),
    ("empty-corpus", "train", TINY + ["--config.data.source=local", "--config.data.path={corpus:empty}"],
     "is empty"),
    ("binary-corpus", "train", TINY + ["--config.data.source=local", "--config.data.path={corpus:binary}"],
     "holds NUL bytes"),
    ("not-utf8-corpus", "train", TINY + ["--config.data.source=local", "--config.data.path={corpus:latin1}"],
     "is not UTF-8 text (byte 0xe9"),
    ("unknown-dataset", "train", TINY + ["--config.data.source=tfds", "--config.data.tfds_name=lm1c"],
     "unknown tfds dataset 'lm1c'; close matches: lm1b"),
    ("unknown-source", "train", TINY + ["--config.data.source=hub"], "data.source='hub'"),
    ("missing-text8", "train", TINY + ["--config.data.source=text8", "--config.data.path={tmp}/text8.zip"],
     "text8 path"),
    ("seq-len-above-max", "train", TINY + ["--config.data.seq_len=64"], "data.seq_len=64 exceeds model.max_len=32"),
    ("batch-not-divisible", "train", TINY + ["--config.training.batch_size=3"],
     "training.batch_size=3 is not divisible by the data-parallel size 2"),
    ("other-model-shape", "train", TINY + ["--config.model.num_layers=3", "--workdir={trained}"],
     "model.num_layers=2 in the checkpoint, 3 requested"),
    ("other-tokenizer", "train", TINY + ["--config.tokenizer.kind=sentencepiece", "--workdir={trained}"],
     "holds a char tokenizer"),
    ("tokenizer-not-matching-checkpoint", "sample", ["--workdir={swapped}"],
     "the tokenizer has 11 tokens but the checkpoint was trained with"),
    ("no-checkpoint", "sample", ["--workdir={tmp}/empty"], "holds no checkpoint"),
    ("steps-below-one", "sample", ["--workdir={trained}", "--steps=0"], "steps=0; allowed: an integer >= 1"),
    ("prompt-too-long", "sample", ["--workdir={trained}", "--prompt=" + "x" * 40],
     "prompt is 40 tokens, longer than seq_len=32"),
    ("seq-len-above-model", "sample", ["--workdir={trained}", "--seq_len=64"], "allowed: 1 to the model's max_len=32"),
    ("prompt-outside-vocabulary", "sample", ["--workdir={trained}", "--prompt=caf\u00e9 \u2603"],
     "is not in the character vocabulary"),
    ("unknown-sampler", "sample", ["--workdir={trained}", "--sampler=beam"], "--sampler"),
    ("block-length", "sample", ["--workdir={trained}", "--sampler=blocks", "--block_length=5"],
     "block_length=5 does not divide the sequence length 32"),
    ("threshold-range", "sample", ["--workdir={trained}", "--sampler=threshold", "--threshold=0"],
     "threshold=0.0; allowed: 0 < threshold <= 1"),
    ("top-p-range", "sample", ["--workdir={trained}", "--top_p=1.5"], "top_p=1.5; allowed: 0 < top_p <= 1"),
    ("too-many-steps", "sample", ["--workdir={trained}", "--sampler=confidence", "--steps=33"],
     "steps=33 exceeds the 32 positions to generate"),
    ("infill-without-mask", "sample", ["--workdir={trained}", "--infill=no holes"], "has no [MASK] or [MASK*n]"),
    ("diffusion-judge", "evaluate", ["--workdir={trained}", "--judge_workdir={trained}", "--num_gen_samples=2"],
     "the judge holds a diffusion model"),
    # Issue 23: what used to end in a traceback or silently did something else.
    ("config-syntax-error", "train", ["--config={tmp}/syntax_error.py"],
     "syntax_error.py: Python syntax error at line 1"),
    ("config-without-get_config", "train", ["--config={tmp}/no_get_config.py"], "the file defines no get_config()"),
    ("unknown-config-group", "train", TINY + ["--config.modell.x=3"],
     "unknown config key '--config.modell.x'; did you mean 'model'?"),
    ("unused-config-argument", "train", ["--config=configs/tiny.py:foo"], "config argument 'foo'"),
    ("seed-above-32-bits", "train", TINY + ["--config.seed=4294967296"],
     "seed=4294967296; allowed: an integer from 0 to 4294967295"),
    ("num-steps-below-checkpoint", "train", TINY + ["--workdir={trained}", "--config.training.num_steps=2"],
     "training.num_steps=2 is below the step 6"),
    ("workdir-is-a-file", "sample", ["--workdir={tmp}/a_file"], "is a file, not a folder"),
    ("sample-seed-above-32-bits", "sample", ["--workdir={trained}", "--seed=4294967296"], "--seed=4294967296; allowed"),
    ("malformed-infill-hole", "sample", ["--workdir={trained}", "--infill=ab [MASK*x] cd [MASK*3] ef"],
     "infill hole '[MASK*x]' is malformed"),
    ("html-is-a-folder", "sample", ["--workdir={trained}", "--html={tmp}"], "is a directory"),
    ("damaged-tokenizer", "sample", ["--workdir={damaged_tokenizer}"], "does not load (JSONDecodeError"),
    ("distill-misspelled-key", "distill", ["--teacher_workdir={trained}", "--workdir={tmp}/student",
                                           "--config.distill.factr=2"],
     "unknown config key '--config.distill.factr'; did you mean 'factor'?"),
    ("distill-model-override", "distill", ["--teacher_workdir={trained}", "--workdir={tmp}/student",
                                           "--config.model.num_layers=3"],
     "distill builds the student with the teacher's network"),
    ("evaluate-flag-names", "evaluate", ["--workdir={trained}", "--num_gen_samples=2", "--gen_steps=0"],
     "--gen_steps=0; allowed: an integer >= 1"),
    ("bench-list-flag", "bench", ["--workdir={trained}", "--batches=abc"], "--batches=abc: 'abc' is not an integer"),
    ("convert-invalid-config-json", "convert", ["--from_hf={hf:bad_json}", "--workdir={tmp}/converted"],
     "config.json' does not read as JSON"),
    ("convert-truncated-safetensors", "convert", ["--from_hf={hf:truncated}", "--workdir={tmp}/converted"],
     "does not read as safetensors"),
    ("convert-shapes-disagree", "convert", ["--from_hf={hf:wider_mlp}", "--workdir={tmp}/converted"],
     "do not match the model that config.json describes"),
]


def _hf_folder(tmp_path, kind):
  """A copy of the tiny LLaMA fixture, damaged as `kind` says."""
  folder = str(tmp_path / f"hf_{kind}")
  shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "hf", "llama"), folder)
  config_path = os.path.join(folder, "config.json")
  if kind == "bad_json":
    with open(config_path, "w") as f:
      f.write("{not json")
  elif kind == "truncated":
    shard = os.path.join(folder, "model-00001-of-00002.safetensors")
    os.truncate(shard, os.path.getsize(shard) // 2)
  elif kind == "wider_mlp":
    config = json.load(open(config_path))
    config["intermediate_size"] *= 2
    with open(config_path, "w") as f:
      json.dump(config, f)
  return folder


def _snapshot(path):
  if not os.path.isdir(path):
    return None
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)),
                 os.path.getmtime(os.path.join(d, f))) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def swapped_workdir(trained_workdir, tmp_path_factory):
  """A copy of the trained run whose tokenizer was replaced by one of another vocabulary."""
  path = str(tmp_path_factory.mktemp("swapped") / "run")
  shutil.copytree(trained_workdir, path)
  with open(os.path.join(path, "tokenizer.json"), "w") as f:
    json.dump({"kind": "char", "chars": "abcdefghij"}, f)
  return path


@pytest.fixture(scope="module")
def damaged_tokenizer_workdir(trained_workdir, tmp_path_factory):
  """A copy of the trained run whose tokenizer.json was cut in half."""
  path = str(tmp_path_factory.mktemp("damaged_tokenizer") / "run")
  shutil.copytree(trained_workdir, path)
  tokenizer = os.path.join(path, "tokenizer.json")
  os.truncate(tokenizer, os.path.getsize(tokenizer) // 2)
  return path


@pytest.mark.parametrize("case, module, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, module, args, expected, tmp_path, trained_workdir, swapped_workdir, damaged_tokenizer_workdir,
                   data_cache):
  os.makedirs(tmp_path / "empty", exist_ok=True)
  (tmp_path / "syntax_error.py").write_text("def get_config(:\n")
  (tmp_path / "no_get_config.py").write_text("import ml_collections\nCONFIG = ml_collections.ConfigDict()\n")
  (tmp_path / "a_file").write_text("not a workdir")
  filled = []
  for a in args:
    for kind in ("empty", "binary", "latin1"):
      a = a.replace("{corpus:%s}" % kind, _corpus(tmp_path, kind)) if "{corpus:%s}" % kind in a else a
    for kind in ("bad_json", "truncated", "wider_mlp"):
      a = a.replace("{hf:%s}" % kind, _hf_folder(tmp_path, kind)) if "{hf:%s}" % kind in a else a
    filled.append(a.replace("{tmp}", str(tmp_path)).replace("{trained}", trained_workdir)
                  .replace("{swapped}", swapped_workdir).replace("{damaged_tokenizer}", damaged_tokenizer_workdir))
  if module == "train" and not any(a.startswith("--workdir=") for a in filled):
    filled.append(f"--workdir={tmp_path / 'run'}")
  if module == "train":
    filled.append(f"--config.data.cache_dir={tmp_path / 'cache'}" if "source=" in " ".join(filled)
                  else f"--config.data.cache_dir={data_cache}")
  workdir = next(a.split("=", 1)[1] for a in filled if a.startswith("--workdir="))
  before = _snapshot(workdir)
  out = subprocess.run([sys.executable, "-m", f"diffusion_lm.{module}", *filled], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert out.returncode == 2, (case, out.returncode, out.stderr[-2000:])
  assert len(errors) == 1 and expected in errors[0], (case, out.stderr[-2000:])
  assert "Traceback" not in out.stderr
  after = _snapshot(workdir)
  if before is not None:
    assert after == before, case  # nothing in an existing workdir changed
  else:
    assert after is None or not any(p.startswith("checkpoints") for p, _, _ in after), case


def test_verbose_shows_the_traceback(trained_workdir):
  out = subprocess.run([sys.executable, "-m", "diffusion_lm.sample", f"--workdir={trained_workdir}", "--steps=0",
                        "--verbose"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "Traceback" in out.stderr and "steps=0" in out.stderr
