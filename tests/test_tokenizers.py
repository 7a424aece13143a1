import os

import pytest

from conftest import ENGLISH
from diffusion_lm import tokenizers
from diffusion_lm.errors import UserError

TEXTS = [ENGLISH * 20, "Ophelia: Nymph, in thy orisons\nBe all my sins remember'd.\n\n  Indented  twice\n"]


def test_char_round_trip_and_mask_id():
  tok = tokenizers.CharTokenizer.train(TEXTS)
  for text in TEXTS:
    ids = tok.encode(text)
    assert max(ids) < tok.eos_id < tok.mask_id == tok.vocab_size
    assert tok.decode(ids) == text
  assert tok.decode([tok.encode("a")[0], tok.mask_id], show_mask=True).endswith("_")


def test_char_unknown_character_is_one_line_error():
  tok = tokenizers.CharTokenizer.train(["abc"])
  with pytest.raises(UserError, match="'z' is not in the character vocabulary"):
    tok.encode("abz")


def test_char_save_load_without_pickle(tmp_path):
  tok = tokenizers.CharTokenizer.train(TEXTS)
  path = tokenizers.save_tokenizer(tok, str(tmp_path))
  assert path.endswith(".json")
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert loaded.chars == tok.chars and loaded.fingerprint() == tok.fingerprint()
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


@pytest.fixture(scope="module")
def sp_tokenizer():
  return tokenizers.SentencePieceTokenizer.train(TEXTS * 5, vocab_size=300, model_type="unigram")


def test_sentencepiece_round_trip(sp_tokenizer):
  tok = sp_tokenizer
  for text in TEXTS + ["Unseen: Ünïcødé façade — “quotes” 12345\n\n\tTabbed"]:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.mask_id not in ids
    assert tok.decode(ids) == text


def test_sentencepiece_is_deterministic_and_reloads(sp_tokenizer, tmp_path):
  again = tokenizers.SentencePieceTokenizer.train(TEXTS * 5, vocab_size=300, model_type="unigram")
  assert again.fingerprint() == sp_tokenizer.fingerprint()
  tokenizers.save_tokenizer(sp_tokenizer, str(tmp_path))
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert loaded.encode(ENGLISH) == sp_tokenizer.encode(ENGLISH)


def test_decode_marks_masks_and_document_ends(sp_tokenizer):
  tok = sp_tokenizer
  ids = tok.encode("To be") + [tok.mask_id, tok.eos_id] + tok.encode("or not")
  assert tok.decode(ids) == "To be_\n\nor not"
  assert tok.decode(ids, show_mask=False) == "To be\n\nor not"


def test_sentencepiece_bad_settings():
  with pytest.raises(UserError, match="model_type"):
    tokenizers.SentencePieceTokenizer.train(TEXTS, vocab_size=100, model_type="wordpiece")
  with pytest.raises(UserError, match="vocab_size=100000"):
    tokenizers.SentencePieceTokenizer.train(TEXTS, vocab_size=100000)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
  path = str(tmp_path / "f.bin")
  tokenizers.atomic_write_bytes(path, b"old")


  with pytest.raises(TypeError):
    tokenizers.atomic_write_bytes(path, object())  # write() fails mid-way
  assert open(path, "rb").read() == b"old"
  assert sorted(os.listdir(tmp_path)) == ["f.bin"]
