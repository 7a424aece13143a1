"""data.source=hf: Hugging Face datasets read from local copies (no `datasets` package), row ranges,
LM1B detokenization, and MDLM / BD3-LM framed windows."""

import os
import sys

import numpy as np
import pytest

from configs import default
from diffusion_lm import data, hf_data, tokenizers
from diffusion_lm.errors import UserError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
sys.path.insert(0, FIXTURES)
from make_hf_datasets import sentence  # noqa: E402  (what the fixture files hold)

TRAIN = [sentence(i) for i in range(40)]
TEST = [sentence(100 + i) for i in range(10)]


def _config(name, **overrides):
  config = default.get_config().data
  config.update(source="hf", hf_name=os.path.join(FIXTURES, "hf_dataset", name) if name else "")
  config.update(overrides)
  return config


@pytest.mark.parametrize("layout", ["saved", "parquet", "train.jsonl"])
def test_local_copies_read_the_rows_in_order(layout, tmp_path):
  split = data.load_text_split(_config(layout), "train", str(tmp_path))
  assert list(split.texts()) == TRAIN and split.doc_ends.all() and split.name == "train"
  if layout != "train.jsonl":
    assert list(data.load_text_split(_config(layout), "test", str(tmp_path)).texts()) == TEST


def test_row_ranges_follow_the_hub_syntax(tmp_path):
  def texts(spec):
    return list(data.load_text_split(_config("saved"), spec, str(tmp_path)).texts())
  assert texts("train[:-5]") == TRAIN[:-5] and texts("train[-5:]") == TRAIN[-5:]
  assert texts("test[2:4]") == TEST[2:4] and texts("train[35:]") == TRAIN[35:]
  # Disjoint ranges of one split are distinct splits for the token cache.
  fingerprints = {data.load_text_split(_config("saved"), s, str(tmp_path)).fingerprint
                  for s in ["train", "train[:-5]", "train[-5:]"]}
  assert len(fingerprints) == 3
  assert hf_data.parse_split(" train[:-100000] ") == ("train", None, -100000)
  for bad in ["train[:10%]", "train[a:b]", "train[1:2:3]"]:
    with pytest.raises(UserError, match="allowed: a split name with an optional integer row range"):
      hf_data.parse_split(bad)


def test_bad_hf_settings_are_one_line_errors(tmp_path, monkeypatch):
  with pytest.raises(UserError, match="has no split 'validation'; allowed: train, test"):
    data.load_text_split(_config("saved"), "validation", str(tmp_path))
  with pytest.raises(UserError, match="has no split 'test'; allowed: train"):
    data.load_text_split(_config("train.jsonl"), "test", str(tmp_path))
  with pytest.raises(UserError, match="no column data.text_key='body'; allowed: one of text, n"):
    data.load_text_split(_config("saved", text_key="body"), "train", str(tmp_path))
  with pytest.raises(UserError, match="selects no rows"):
    data.load_text_split(_config("saved"), "test[20:]", str(tmp_path))
  with pytest.raises(UserError, match="needs data.hf_name"):
    data.load_text_split(_config("", hf_name=""), "train", str(tmp_path))
  monkeypatch.setitem(sys.modules, "datasets", None)  # the package is not installed
  with pytest.raises(UserError, match="needs the datasets package; allowed: pip install datasets"):
    data.load_text_split(_config("", hf_name="someone/no-such-local-folder"), "train", str(tmp_path))


def test_saved_folder_reads_as_datasets_does(tmp_path):
  datasets = pytest.importorskip("datasets")
  saved = datasets.load_from_disk(os.path.join(FIXTURES, "hf_dataset", "saved"))
  ours = data.load_text_split(_config("saved"), "train[3:-3]", str(tmp_path))
  assert list(ours.texts()) == saved["train"]["text"][3:-3]


def test_lm1b_detokenizer():
  cases = {
      "he said , \" hello there \" ( and so ) it 's 5 $ .": "he said, \"hello there\" (and so) it's 5 $.",
      "see http : / / example . com / a / b today": "see http://example . com/a/b today",
      "really ? yes ! one ; two : three": "really? yes! one; two: three",
      "a [ note ] costs £ 3 .": "a [note] costs £3.",
      "the ' quoted ' word .": "the 'quoted' word.",
  }
  for spaced, expected in cases.items():
    assert data.lm1b_detokenize(spaced) == expected


def test_detokenize_setting_rewrites_texts_and_the_cache_key(tmp_path):
  plain = data.load_text_split(_config("saved"), "train", str(tmp_path))
  detok = data.load_text_split(_config("saved", detokenize="lm1b"), "train", str(tmp_path))
  assert list(detok.texts()) == [data.lm1b_detokenize(t) for t in TRAIN] != TRAIN
  assert detok.fingerprint != plain.fingerprint
  with pytest.raises(UserError, match="data.detokenize='ptb'; allowed: '' \\(off\\), lm1b"):
    data.load_text_split(_config("saved", detokenize="ptb"), "train", str(tmp_path))


def test_framed_windows_as_mdlm_wraps_them():
  stream = np.arange(100, 150, dtype=np.int32)
  windows = data.Windows(stream, 8, token_chars=np.arange(200) % 3 + 1, frame_id=7)
  assert len(windows) == 50 // 6
  rows = windows.rows([0, 2])
  np.testing.assert_array_equal(rows[0], [7, 100, 101, 102, 103, 104, 105, 7])
  np.testing.assert_array_equal(rows[1], [7, 112, 113, 114, 115, 116, 117, 7])
  np.testing.assert_array_equal(windows.row_chars(rows), [sum(i % 3 + 1 for i in range(100, 106)),
                                                           sum(i % 3 + 1 for i in range(112, 118))])
  with pytest.raises(UserError, match="data.seq_len=2 with data.frame_windows"):
    data.Windows(stream, 2, frame_id=7)


def test_framed_windows_as_an_encoder_reads_text():
  """data.frame_open='bos': [CLS] (here 5) opens each window, [SEP] (7) closes it."""
  stream = np.arange(100, 150, dtype=np.int32)
  windows = data.Windows(stream, 8, token_chars=np.arange(200) % 3 + 1, frame_id=(5, 7))
  rows = windows.rows([1])
  np.testing.assert_array_equal(rows[0], [5, 106, 107, 108, 109, 110, 111, 7])
  np.testing.assert_array_equal(windows.row_chars(rows), [sum(i % 3 + 1 for i in range(106, 112))])


def test_lm1b_setting_end_to_end_on_a_local_copy(tmp_path):
  """The pieces configs/lm1b.py combines: hf source, detokenizer, WordPiece with [CLS] as eos, framed windows."""
  from configs import lm1b
  from diffusion_lm import experiment
  config = lm1b.get_config()
  assert config.data.tfds_name == "lm1b" and config.data.eval_split == "test"  # the same sentences as the Hub's
  config.data.update(source="hf", hf_name=os.path.join(FIXTURES, "hf_dataset", "saved"), seq_len=16,
                     tokenize_processes=1)
  config.tokenizer.hf_path = os.path.join(FIXTURES, "wordpiece_tokenizer.json")
  tok = experiment.load_or_train_tokenizer(config, str(tmp_path))
  cls_id = tok.tok.token_to_id("[CLS]")
  assert tok.eos_id == cls_id
  windows, _ = experiment.load_windows(config, str(tmp_path), tok, config.data.eval_split)
  expected = []
  for text in TEST:
    expected += tok.encode(data.lm1b_detokenize(text)) + [cls_id]
  assert len(windows) == len(expected) // 14
  for i in range(len(windows)):
    np.testing.assert_array_equal(windows.rows([i])[0], [cls_id] + expected[14 * i:14 * i + 14] + [cls_id])
