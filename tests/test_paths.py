"""gs:// paths: a bucket workdir trains, resumes, samples and evaluates through the non-POSIX branch.

`fake_gcs` stands in for Cloud Storage: gs://BUCKET/... lands in a temporary folder, both for
etils.epath (through which the project, orbax and tfds read and write) and for TensorStore (through
which orbax writes arrays). Like an object store it refuses appends, so code that appends to a bucket
object fails here as it would on GCS.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from diffusion_lm import api, data, metrics, paths, tokenizers
from diffusion_lm.errors import UserError


class FakeGcs(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """gs://BUCKET/KEY <-> ROOT/BUCKET/KEY; opening an object for append raises, as on GCS."""

  def __init__(self, root: str):
    self.root = root
    self.opened = []  # (uri, mode) of every open

  def local(self, uri) -> str:
    uri = os.fspath(uri)
    assert uri.startswith("gs://"), f"the fake gs:// backend was given a non-gs path {uri!r}"
    return os.path.join(self.root, uri[len("gs://"):])

  def uri(self, local) -> str:
    return "gs://" + os.path.relpath(os.fspath(local), self.root)

  def open(self, path, mode):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"{path}: objects in a bucket cannot be appended to (mode {mode!r})")
    self.opened.append((os.fspath(path), mode))
    return super().open(self.local(path), mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def glob(self, path):
    return [self.uri(p) for p in super().glob(self.local(path))]

  def walk(self, top, **kwargs):
    for folder, dirs, files in super().walk(self.local(top), **kwargs):
      yield self.uri(folder), dirs, files

  def makedirs(self, path, **kwargs):
    return super().makedirs(self.local(path), **kwargs)

  def mkdir(self, path, **kwargs):
    return super().mkdir(self.local(path), **kwargs)

  def rmtree(self, path):
    return super().rmtree(self.local(path))

  def remove(self, path):
    return super().remove(self.local(path))

  def rename(self, path, dst):
    return super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    return super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(self.local(path))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """A fake gs:// scheme over tmp_path/gcs; the test runs in the empty folder tmp_path/cwd."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  (tmp_path / "gcs").mkdir()
  (tmp_path / "cwd").mkdir()
  fake = FakeGcs(str(tmp_path / "gcs"))
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else epath would pick TensorFlow's gfile
  # TensorStore reaches GCS by itself (orbax hands it a gcs kvstore spec): the same folder instead.
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda uri: {"driver": "file", "path": fake.local(uri)})
  # orbax asks Cloud Storage whether the bucket has a hierarchical namespace: a flat bucket, as most are.
  monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: type("Bucket", (), {"hierarchical_namespace_enabled": False}))
  monkeypatch.chdir(tmp_path / "cwd")
  return fake


def _no_local_gs_folder(cwd):
  """Nothing was written under the working folder (a path made local would be ./gs:/...)."""
  return os.listdir(cwd) == [] and not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "gs:"))


def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("gs://bucket/run/") == "gs://bucket/run"
  assert paths.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
  assert paths.resolve("runs/demo") == os.path.join(str(tmp_path), "runs", "demo")
  assert paths.is_uri("gs://b/x") and paths.is_uri("s3://b/x") and not paths.is_uri("/gs/b/x")
  assert not paths.is_uri("runs/gs://x")


def test_bucket_path_without_its_packages_fails_in_one_line(tiny_config, tmp_path, monkeypatch):
  from diffusion_lm.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name in (
      "gcsfs", "google.cloud.storage") else real_find_spec(name, *args))
  monkeypatch.chdir(tmp_path)
  message = ("path 'gs://bucket/run' needs the packages gcsfs, google-cloud-storage; allowed: pip install gcsfs "
             "google-cloud-storage, or a local path")
  with pytest.raises(UserError, match=f"^{message}$"):
    train_and_evaluate(tiny_config, "gs://bucket/run")
  with pytest.raises(UserError, match=f"^{message}$"):
    api.load("gs://bucket/run")
  with pytest.raises(UserError, match="epath has no filesystem for ftp://"):
    api.load("ftp://host/run")
  assert os.listdir(tmp_path) == []


def test_token_cache_and_metrics_in_a_bucket(fake_gcs, tmp_path):
  text = ["To be, or not to be, that is the question:\n", "Whether 'tis nobler in the mind to suffer\n"]
  split = data.TextSplit("train", "f0", [{"text": t} for t in text], np.arange(2), np.array([False, True]), "text")
  tok = tokenizers.CharTokenizer.train(text)
  cached = data.tokenize_split(split, tok, "gs://bucket/cache/tokens")
  expected = tok.encode(text[0]) + tok.encode(text[1]) + [tok.eos_id]  # independent: encode each text
  assert cached.tokens.tolist() == expected and cached.num_chars == len("".join(text)) + 1
  stored = os.listdir(tmp_path / "gcs" / "bucket" / "cache" / "tokens")
  assert sorted(os.path.splitext(f)[1] for f in stored) == [".json", ".npy"]  # no temporaries, no lock
  again = data.tokenize_split(split, tok, "gs://bucket/cache/tokens")  # read back from the bucket
  assert again.tokens.tolist() == expected

  # metrics.jsonl and TensorBoard events: rewritten whole (no append), and a resumed writer keeps the old lines.
  writer = metrics.MetricWriter("gs://bucket/run", enabled=True)
  writer.write_scalars(1, {"train/loss": 2.5})
  writer.write_scalars(2, {"train/loss": 2.0})
  writer.close()
  writer = metrics.MetricWriter("gs://bucket/run", enabled=True)
  writer.write_scalars(3, {"train/loss": 1.5})
  writer.close()
  lines = (tmp_path / "gcs" / "bucket" / "run" / "metrics.jsonl").read_text().splitlines()
  assert [(r["step"], r["train/loss"]) for r in map(json.loads, lines)] == [(1, 2.5), (2, 2.0), (3, 1.5)]
  events = os.listdir(tmp_path / "gcs" / "bucket" / "run" / "tensorboard")
  assert len(events) >= 1 and all(f.startswith("events.out.tfevents") for f in events)
  assert all(os.path.getsize(tmp_path / "gcs" / "bucket" / "run" / "tensorboard" / f) > 0 for f in events)
  assert _no_local_gs_folder(tmp_path / "cwd")


def test_corpus_in_a_bucket_reads_as_the_same_corpus_on_disk(fake_gcs, small_corpus, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  shutil.copytree(small_corpus, tmp_path / "gcs" / "bucket" / "corpus")
  assert [os.path.basename(f) for f in data.list_text_files("gs://bucket/corpus")] == sorted(os.listdir(small_corpus))
  assert data.read_text_file("gs://bucket/corpus/doc2.txt.gz") == data.read_text_file(
      os.path.join(small_corpus, "doc2.txt.gz"))  # decompressed alike
  cfg = default.get_config().data
  cfg.update(source="local", passage_chars=512, validation_percent=10.0)
  texts = {}
  for where, path in (("bucket", "gs://bucket/corpus"), ("disk", small_corpus)):
    cfg.path = path
    texts[where] = list(data.load_text_split(cfg, "validation", str(tmp_path / "prepared" / where)).texts())
  assert texts["bucket"] == texts["disk"] and len(texts["disk"]) > 0


def test_bucket_workdir_train_resume_sample_evaluate(fake_gcs, tiny_config, tmp_path):
  from diffusion_lm.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config = tiny_config
  config.training.update(num_steps=4, checkpoint_every=2, sample_every=4)
  workdir = "gs://bucket/run"
  train_and_evaluate(config, workdir, stop_after=2)
  final = train_and_evaluate(config, workdir)  # resumes at step 2 from the bucket
  bucket = tmp_path / "gcs" / "bucket" / "run"
  assert sorted(os.listdir(bucket / "checkpoints")) == ["2", "4"]
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "samples/step_0000004.txt"):
    assert (bucket / name).is_file(), name
  # orbax wrote its metadata through the fake scheme too (not a local ./gs: folder)
  assert any(mode.startswith("w") and uri.startswith("gs://bucket/run/checkpoints/") for uri, mode in fake_gcs.opened)

  run = api.load(workdir)
  assert run.step == 4 and run.workdir == workdir
  texts = run.generate(prompt="KING.", num_samples=2, steps=4)
  assert len(texts) == 2 and all(t.startswith("KING.") and len(t) == 32 for t in texts)
  record = run.evaluate()
  assert record["checkpoint_step"] == 4 and record["nll_per_token"] == pytest.approx(final["eval/nll_per_token"])
  api.append_eval_record(workdir, record)
  api.append_eval_record(workdir, record)
  assert len((bucket / "eval.jsonl").read_text().splitlines()) == 2
  table = run.metrics()
  assert table["step"].tolist() == [2, 4] and np.isfinite(table["train/loss"]).all()
  assert _no_local_gs_folder(tmp_path / "cwd")
