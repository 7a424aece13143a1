"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""

import atexit
import os
import shutil
import sys
import tempfile

_OTHER_XLA_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split()
                    if not f.startswith("--xla_force_host_platform_device_count")]  # once, in xdist workers too
os.environ["XLA_FLAGS"] = " ".join(_OTHER_XLA_FLAGS + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, its subprocesses and xdist workers (they inherit the
# environment): the many tiny trainings compile the same programs again (each builds its own jit), and a
# cache hit takes a fraction of a compile. A fresh folder per session (unless JAX_COMPILATION_CACHE_DIR is
# already set), so no test sees another run's cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffusion_lm_tests_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

ENGLISH = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
"""


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  """A data/token cache shared by the tests that train on the bundled corpus."""
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def tiny_config(data_cache):
  from configs import tiny
  config = tiny.get_config()
  config.data.cache_dir = data_cache
  return config


@pytest.fixture
def small_corpus(tmp_path):
  """A folder of three small text files (one compressed)."""
  import gzip
  folder = tmp_path / "corpus"
  folder.mkdir()
  for i in range(3):
    text = "".join(f"{line} [{i}:{j}]\n" for j in range(40) for line in ENGLISH.splitlines())
    if i == 2:
      with gzip.open(folder / f"doc{i}.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    else:
      (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
  return str(folder)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, data_cache):
  """A tiny model trained 6 steps, interrupted: stopped after 4 steps, then the same call again."""
  from configs import tiny
  from diffusion_lm.train import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny.get_config()
  config.data.cache_dir = data_cache
  config.training.update(num_steps=6, checkpoint_every=2, sample_every=4)
  train_and_evaluate(config, workdir, stop_after=4)
  train_and_evaluate(config, workdir)  # same config: resumes at 4
  return workdir


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", help="also run tests marked slow (long fault injection)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running; run with --runslow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def import_llada_instruct(root, template: str, max_len: int) -> str:
  """The tiny LLaDA fixture (tests/fixtures/hf/llada) given `template` as its chat template, imported into
  ROOT/base; returns the workdir."""
  import json
  import pathlib
  import shutil
  from diffusion_lm import convert
  folder = pathlib.Path(root) / "llada_instruct"
  shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf", "llada"), folder)
  (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
  workdir = str(pathlib.Path(root) / "base")
  convert.import_hf(str(folder), workdir, max_len=max_len)
  return workdir


def write_word_pairs(path) -> str:
  """A JSON-lines file of SFT pairs (two words -> the next word of a fixed sentence, 68 rows); returns its path."""
  import json
  words = "the quick brown fox jumps over the lazy dog and a tiny model reads a tiny story".split()
  pairs = [{"prompt": " ".join(words[i:i + 2]), "response": " " + words[(i + 2) % len(words)]}
           for i in range(len(words))] * 4
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(p) for p in pairs) + "\n")
  return str(path)
