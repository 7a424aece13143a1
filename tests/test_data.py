import os

import numpy as np
import pytest

from configs import default
from diffusion_lm import data, tokenizers
from diffusion_lm.errors import UserError


def _data_config(**overrides):
  cfg = default.get_config().data
  cfg.passage_chars = 512
  cfg.validation_percent = 10.0
  cfg.update(overrides)
  return cfg


def test_split_passages_concatenate_back():
  text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(500))
  passages = data.split_passages(text, 200)
  assert "".join(passages) == text
  assert all(len(p) <= 200 for p in passages)
  assert all(p.endswith("\n") for p in passages[:-1])


def test_local_builder_splits_deterministically(small_corpus, tmp_path):
  cfg = _data_config(source="local", path=small_corpus)
  train = data.load_text_split(cfg, "train", str(tmp_path / "a"))
  val = data.load_text_split(cfg, "validation", str(tmp_path / "a"))
  again = data.load_text_split(cfg, "validation", str(tmp_path / "b"))
  assert len(train) > len(val) > 0
  assert list(val.texts()) == list(again.texts())
  # Train and validation passages together rebuild every document exactly.
  everything = {}
  for split in (train, val):
    for i in range(len(split)):
      ex = split.source[int(split.order[i])]
      everything[(ex["doc"].decode(), int(ex["part"]))] = ex["text"].decode()
  for name in sorted(os.listdir(small_corpus)):
    path = os.path.join(small_corpus, name)
    parts = sorted((p, t) for (d, p), t in everything.items() if d == name)
    assert "".join(t for _, t in parts) == data.read_text_file(path)


def test_document_ends_only_between_documents(small_corpus, tmp_path):
  cfg = _data_config(source="local", path=small_corpus, validation_percent=1.0)
  train = data.load_text_split(cfg, "train", str(tmp_path))
  # With 1% held out, most passages continue the previous one: only a few document ends.
  assert 3 <= int(train.doc_ends.sum()) < len(train) // 2


def test_tokenized_windows_and_chars_per_token(small_corpus, tmp_path):
  cfg = _data_config(source="local", path=small_corpus)
  split = data.load_text_split(cfg, "train", str(tmp_path))
  tok = tokenizers.CharTokenizer.train(split.texts())
  tokenized = data.tokenize_split(split, tok, str(tmp_path / "tokens"))
  assert tokenized.tokens.dtype == np.int32 and tokenized.chars_per_token == 1.0
  assert int((np.asarray(tokenized.tokens) == tok.eos_id).sum()) == int(split.doc_ends.sum())
  windows = data.Windows(tokenized.tokens, 16)
  np.testing.assert_array_equal(windows.rows([2])[0], tokenized.tokens[32:48])
  cached = data.tokenize_split(split, tok, str(tmp_path / "tokens"))  # from the .npy cache
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(tokenized.tokens))


def test_iterator_deterministic_and_resumes_exactly():
  windows = data.Windows(np.arange(10_000, dtype=np.int32), 10)
  it = data.make_train_iterator(windows, 8, seed=3)
  first = [next(it) for _ in range(5)]
  state = it.get_state()
  rest = [next(it) for _ in range(5)]
  again = data.make_train_iterator(windows, 8, seed=3)
  np.testing.assert_array_equal(np.stack([next(again) for _ in range(5)]), np.stack(first))
  resumed = data.make_train_iterator(windows, 8, seed=3)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(5)]), np.stack(rest))
  other_seed = data.make_train_iterator(windows, 8, seed=4)
  assert not np.array_equal(next(other_seed), first[0])


def test_process_shards_assemble_the_global_batch():
  windows = data.Windows(np.arange(4_000, dtype=np.int32), 10)
  whole = data.train_dataset(windows, 8, seed=1)
  parts = [data.train_dataset(windows, 8, seed=1, process_index=p, process_count=4) for p in range(4)]
  for step in (0, 1, 57):  # 57 crosses an epoch boundary (400 windows / 8)
    np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), whole[step])


def test_every_window_once_per_epoch():
  windows = data.Windows(np.arange(640, dtype=np.int32), 10)
  ds = data.train_dataset(windows, 8, seed=0)
  firsts = np.concatenate([ds[s][:, 0] for s in range(8)]) // 10
  assert sorted(firsts.tolist()) == list(range(64))


def test_eval_batches_pad_and_flag():
  token_chars = np.arange(250) % 3  # any per-id counts: the batches must carry each row's sum
  windows = data.Windows(np.arange(250, dtype=np.int32), 10, token_chars=token_chars)
  batches = list(data.eval_batches(windows, 10))
  assert len(batches) == 3 and batches[-1].valid.sum() == 5 and batches[0].valid.all()
  assert batches[-1].window_ids.tolist() == [20, 21, 22, 23, 24, -1, -1, -1, -1, -1]
  expected = [sum(i % 3 for i in range(10 * w, 10 * w + 10)) for w in range(20, 25)]
  assert batches[-1].chars.tolist() == expected + [0] * 5


def test_capped_eval_subset_is_seeded_and_spread_over_the_split():
  num_windows, batch, max_batches = 1000, 8, 3  # 24 of 1000 windows
  ids = data.eval_window_ids(num_windows, batch, max_batches, seed=0)
  assert len(ids) == 24 and len(set(ids.tolist())) == 24 and 0 <= ids.min() and ids.max() < num_windows
  assert not np.array_equal(ids, np.arange(24)) and ids.max() >= 24  # not the first windows in file order
  # Spread: ten documents of 100 windows each all contribute, and no gap is wider than two strata.
  assert sorted(set((ids // 100).tolist())) == list(range(10))
  gaps = np.diff(np.concatenate([[-1], np.sort(ids), [num_windows]]))
  assert gaps.max() <= 2 * num_windows / 24 + 1
  np.testing.assert_array_equal(data.eval_window_ids(num_windows, batch, max_batches, seed=0), ids)
  assert not np.array_equal(data.eval_window_ids(num_windows, batch, max_batches, seed=1), ids)
  # No cap, or a split the cap covers: every window, in order.
  np.testing.assert_array_equal(data.eval_window_ids(20, batch, 0, seed=0), np.arange(20))
  np.testing.assert_array_equal(data.eval_window_ids(24, batch, max_batches, seed=5), np.arange(24))
  with pytest.raises(UserError, match="evaluation.max_batches=-1; allowed: an integer >= 0"):
    data.eval_window_ids(20, batch, -1)


def test_capped_eval_subset_draws_uniformly_within_each_stratum():
  # 10 windows, 3 picks: strata [0, 3), [3, 6), [6, 10), so each window is drawn with probability
  # 1/3, 1/3, 1/3 | 1/3, 1/3, 1/3 | 1/4, 1/4, 1/4, 1/4 over seeds.
  draws = np.stack([data.eval_window_ids(10, 3, 1, seed=s) for s in range(6000)])
  frequency = np.bincount(draws.ravel(), minlength=10) / len(draws)
  expected = np.array([1 / 3] * 6 + [1 / 4] * 4)
  np.testing.assert_allclose(frequency, expected, atol=0.025)
  assert (draws[:, 0] < 3).all() and ((draws[:, 1] >= 3) & (draws[:, 1] < 6)).all() and (draws[:, 2] >= 6).all()


def _sentencepiece(texts, vocab_size=320):
  return tokenizers.SentencePieceTokenizer.train(texts, vocab_size)


@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
def test_token_char_counts_give_the_characters_of_any_token_run(kind):
  import conftest
  train = conftest.ENGLISH * 20
  tok = tokenizers.CharTokenizer.train([train + "\u00e9\u65e5\U0001F600"]) if kind == "char" else _sentencepiece([train])
  table = data.token_char_counts(tok)
  # Characters the SentencePiece model never saw fall back to UTF-8 bytes: 2, 3 and 4 pieces each.
  text = "caf\u00e9 au lait, \u65e5\u672c. \U0001F600 To be, or not to be:\n" if kind == "sentencepiece" else \
      "To be, \u00e9\u65e5 or not\U0001F600 to be:\n"
  ids = tok.encode(text)
  assert int(table[ids].sum()) == len(text)
  assert int(table[[tok.eos_id]].sum()) == 1  # an end of document counts one, as TokenizedSplit.num_chars does
  # Every prefix that ends between characters decodes to exactly as many characters as the table counts.
  checked = 0
  for k in range(1, len(ids) + 1):
    prefix = tok.decode(ids[:k])
    if "\ufffd" not in prefix:
      assert int(table[ids[:k]].sum()) == len(prefix), (k, prefix)
      checked += 1
  if kind == "sentencepiece":  # 2 + 3 + 3 + 4 byte pieces; prefixes ending inside a character: 1 + 2 + 2 + 3
    assert sum(tok.sp.is_byte(i) for i in ids) == 12 and checked == len(ids) - 8
  else:
    assert checked == len(ids)


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty_folder", "holds no text files"),
    ("empty_file", "is empty"),
    ("latin1", "is not UTF-8 text"),
    ("binary", "NUL bytes"),
])
def test_bad_corpus_is_one_line_error(tmp_path, setup, message):
  folder = tmp_path / "c"
  folder.mkdir()
  if setup == "empty_file":
    (folder / "a.txt").write_text("")
  elif setup == "latin1":
    (folder / "a.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 100)
  elif setup == "binary":
    (folder / "a.txt").write_bytes(b"ab\x00\x01" * 100)
  path = str(folder / "nope") if setup == "missing" else str(folder)
  with pytest.raises(UserError) as e:
    data.load_text_split(_data_config(source="local", path=path), "train", str(tmp_path / "d"))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_tfds_dataset_names_close_matches(tmp_path):
  with pytest.raises(UserError, match="unknown tfds dataset 'lm1c'.*lm1b"):
    data.load_text_split(_data_config(source="tfds", tfds_name="lm1c"), "train", str(tmp_path))


def test_unknown_source_and_short_corpus(tmp_path):
  with pytest.raises(UserError, match="data.source='hub'"):
    data.load_text_split(_data_config(source="hub"), "train", str(tmp_path))
  with pytest.raises(UserError, match="fewer than one sequence"):
    data.Windows(np.arange(5, dtype=np.int32), 8)


def _text8_fixture(tmp_path, chars=200_000):
  import zipfile
  text = data.read_text_file(os.path.join(os.path.dirname(data.__file__), "corpora", "shakespeare",
                                          "hamlet.txt.xz")).lower()
  clean = "".join(c if "a" <= c <= "z" else " " for c in text)
  clean = " ".join(clean.split())[:chars]
  path = tmp_path / "text8.zip"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("text8", clean)
  return str(path), clean


def test_text8_standard_split_from_a_local_archive(tmp_path):
  path, text = _text8_fixture(tmp_path)
  cfg = _data_config(source="text8", path=path)
  splits = {s: "".join(data.load_text_split(cfg, s, str(tmp_path / "d")).texts())
            for s in ("train", "validation", "test")}
  n = len(text)
  assert splits["train"] == text[:int(0.9 * n)]
  assert splits["validation"] == text[int(0.9 * n):int(0.95 * n)]
  assert splits["train"] + splits["validation"] + splits["test"] == text


def test_text8_bad_inputs(tmp_path):
  with pytest.raises(UserError, match="text8 path .* does not exist"):
    data.load_text_split(_data_config(source="text8", path=str(tmp_path / "none.zip")), "train", str(tmp_path))
  bad = tmp_path / "text8"
  bad.write_text("Hello, World")
  with pytest.raises(UserError, match="outside a-z and space"):
    data.load_text_split(_data_config(source="text8", path=str(bad)), "train", str(tmp_path / "d2"))
  with pytest.raises(UserError, match="split 'dev' of text8; allowed: train, validation, test"):
    data.load_text_split(_data_config(source="text8", path=str(bad)), "dev", str(tmp_path / "d3"))


def test_a_single_huge_line_is_cut_into_passages(tmp_path):
  folder = tmp_path / "c"
  folder.mkdir()
  (folder / "one_line.txt").write_text("word " * 200_000)  # 1 MB, no newline
  cfg = _data_config(source="local", path=str(folder), passage_chars=4096)
  train = data.load_text_split(cfg, "train", str(tmp_path / "d"))
  val = data.load_text_split(cfg, "validation", str(tmp_path / "d"))
  lengths = [len(t) for t in train.texts()]
  assert max(lengths) <= 4096 and len(train) + len(val) >= 200


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_tokenizer_processes_write_the_same_cache(kind, small_corpus, tmp_path, monkeypatch):
  split = data.load_text_split(_data_config(source="local", path=small_corpus), "train", str(tmp_path))
  if kind == "hf":
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bytelevel_bpe_tokenizer.json")
    tok = tokenizers.HFTokenizer.from_file(fixture)
  else:
    tok = tokenizers.SentencePieceTokenizer.train(split.texts(), vocab_size=340)
  expected = np.concatenate([tok.encode(t) + [tok.eos_id] * int(e) for t, e in zip(split.texts(), split.doc_ends)])
  one = data.tokenize_split(split, tok, str(tmp_path / "one"), processes=1)
  monkeypatch.setattr(data, "BATCH_CHARS", 2000)  # many batches: more than the 2 x 2 kept in flight
  assert len(list(data._text_batches(split, data.BATCH_CHARS))) > 8
  two = data.tokenize_split(split, tok, str(tmp_path / "two"), processes=2)
  np.testing.assert_array_equal(np.asarray(one.tokens), expected)
  assert one.num_chars == two.num_chars == sum(len(t) + int(e) for t, e in zip(split.texts(), split.doc_ends))
  for suffix in (".npy", ".json"):  # the cache files are byte for byte the same
    (a,), (b,) = [[os.path.join(d, f) for f in os.listdir(d) if f.endswith(suffix)]
                  for d in (tmp_path / "one", tmp_path / "two")]
    assert open(a, "rb").read() == open(b, "rb").read()
  with pytest.raises(UserError, match="data.tokenize_processes=-1"):
    data.tokenize_split(split, tok, str(tmp_path / "three"), processes=-1)


def test_tokenizer_processes_do_not_rerun_an_unguarded_script(tmp_path):
  """A script calling the library at its top level (no `if __name__ == "__main__"`) runs once."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  fixtures = os.path.join(root, "tests", "fixtures")
  script = tmp_path / "script.py"
  script.write_text(f"""import sys
sys.path.insert(0, {root!r})
from configs import default
from diffusion_lm import data, tokenizers
config = default.get_config().data
config.update(source="hf", hf_name={os.path.join(fixtures, "hf_dataset", "train.jsonl")!r})
split = data.load_text_split(config, "train", {str(tmp_path)!r})
tok = tokenizers.HFTokenizer.from_file({os.path.join(fixtures, "bytelevel_bpe_tokenizer.json")!r})
data.BATCH_CHARS = 200
print("ran", len(data.tokenize_split(split, tok, {str(tmp_path / "tokens")!r}, processes=2).tokens), flush=True)
""")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert [line.split()[0] for line in out.stdout.splitlines()] == ["ran"], out.stdout


def test_two_first_runs_sharing_a_data_folder_both_prepare(tmp_path):
  """Two runs preparing the same text in one data.cache_dir at once: tfds renames each finished copy into
  place, and the second rename found the first there (FileExistsError, before the fix on every one of three
  tries here); now the later one uses the complete copy and drops its own."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / "prepare.py"
  script.write_text(f"""import sys
sys.path.insert(0, {root!r})
from configs import demo
from diffusion_lm import data
print("texts", len(data.load_text_split(demo.get_config().data, "train", sys.argv[1], coordinate=False)))
""")
  cache = str(tmp_path / "cache")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  runs = [subprocess.Popen([sys.executable, str(script), cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env) for _ in range(2)]
  outs = [run.communicate(timeout=300) for run in runs]
  assert [run.returncode for run in runs] == [0, 0], [err[-1500:] for _, err in outs]
  counts = [[line for line in out.splitlines() if line.startswith("texts ")] for out, _ in outs]
  assert counts[0] == counts[1] == ["texts 1210"]
  (builder,) = os.listdir(os.path.join(cache, "local_text"))
  assert os.listdir(os.path.join(cache, "local_text", builder)) == ["1.0.0"]  # no half-prepared copy left
