import json
import os

import pytest

from conftest import ENGLISH
from diffusion_lm import data, tokenizers
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


# ----------------------------------------------------------------------------- Hugging Face tokenizer.json

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
WORDPIECE = os.path.join(FIXTURES, "wordpiece_tokenizer.json")
BYTE_BPE = os.path.join(FIXTURES, "bytelevel_bpe_tokenizer.json")
UNICODE = "To be, or not — “Ünïcødé” façade 💥 12345\n\n\tTabbed  twice"


def _file_ids(path):
  """{token: id} read straight from the JSON file (model vocabulary and added tokens)."""
  payload = json.load(open(path))
  ids = dict(payload["model"]["vocab"])
  ids.update({t["content"]: t["id"] for t in payload["added_tokens"]})
  return ids


def test_hf_wordpiece_special_ids_follow_the_file():
  tok = tokenizers.HFTokenizer.from_file(WORDPIECE)
  ids = _file_ids(WORDPIECE)
  assert tok.kind == "hf" and tok.vocab_size == max(ids.values()) + 1 == tok.mask_id
  assert (tok.eos_id, tok.bos_id, tok.vocab_mask_id) == (ids["[SEP]"], ids["[CLS]"], ids["[MASK]"])
  text = "To be, or not to be, that is the question."
  encoded = tok.encode(text)
  assert ids["[CLS]"] not in encoded and ids["[SEP]"] not in encoded  # no special tokens added
  assert tok.decode(encoded) == text.lower()  # bert-uncased style: round trip up to lowercasing
  assert tok.decode(tok.encode("to be") + [tok.mask_id, tok.eos_id] + tok.encode("or not")) == "to be_\n\nor not"


def test_hf_byte_level_bpe_round_trips_exactly():
  tok = tokenizers.HFTokenizer.from_file(BYTE_BPE)
  ids = _file_ids(BYTE_BPE)
  assert tok.eos_id == ids["<|endoftext|>"] and tok.bos_id is None and tok.vocab_mask_id is None
  for text in [ENGLISH, UNICODE]:
    encoded = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in encoded) and tok.eos_id not in encoded
    assert tok.decode(encoded) == text
  assert tok.decode(tok.encode("To be") + [tok.mask_id], show_mask=False) == "To be"


def test_hf_byte_level_alphabet_and_exact_char_counts():
  from tokenizers import pre_tokenizers
  alphabet = tokenizers.byte_level_alphabet()
  assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(alphabet.values()) == list(range(256))
  tok = tokenizers.HFTokenizer.from_file(BYTE_BPE)
  encoded = tok.encode(UNICODE)
  # The pieces' bytes, concatenated, are the text's UTF-8 bytes (checks which byte each stand-in means).
  assert b"".join(bytes(alphabet[c] for c in tok.tok.id_to_token(i)) for i in encoded) == UNICODE.encode()
  assert "".join(tok.token_text(i) for i in tok.encode(ENGLISH)) == ENGLISH
  counts = data.token_char_counts(tok)
  assert int(counts[encoded].sum()) == len(UNICODE)  # characters, not bytes (the emoji is 4 bytes)
  assert int(counts[tok.encode(ENGLISH) + [tok.eos_id]].sum()) == len(ENGLISH) + 1


def test_hf_save_load_keeps_vocabulary_and_eos_choice(tmp_path):
  tok = tokenizers.HFTokenizer.from_file(WORDPIECE, eos_token="[PAD]")
  path = tokenizers.save_tokenizer(tok, str(tmp_path))
  assert os.path.basename(path) == "tokenizer.json" and open(path, "rb").read() == open(WORDPIECE, "rb").read()
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert loaded.kind == "hf" and loaded.eos_id == _file_ids(WORDPIECE)["[PAD]"]
  assert loaded.fingerprint() == tok.fingerprint() != tokenizers.HFTokenizer.from_file(WORDPIECE).fingerprint()
  assert loaded.encode(ENGLISH) == tok.encode(ENGLISH)


def _hf_config(path, eos=""):
  from configs import default
  config = default.get_config().tokenizer
  config.kind, config.hf_path, config.hf_eos_token = "hf", path, eos
  return config


def test_hf_from_config_and_workdir_match(tmp_path):
  tok = tokenizers.train_tokenizer(_hf_config(BYTE_BPE), [])
  assert tok.fingerprint() == tokenizers.HFTokenizer.from_file(BYTE_BPE).fingerprint()
  assert tokenizers.tokenizer_matches(tok, _hf_config(BYTE_BPE))
  assert not tokenizers.tokenizer_matches(tok, _hf_config(WORDPIECE))
  assert tokenizers.tokenizer_matches(tok, _hf_config(str(tmp_path / "elsewhere.json")))  # file not at hand


def test_hf_bad_input_is_one_line_error(tmp_path):
  with pytest.raises(UserError, match="needs tokenizer.hf_path"):
    tokenizers.train_tokenizer(_hf_config(""), [])
  with pytest.raises(UserError, match="no such file"):
    tokenizers.train_tokenizer(_hf_config(str(tmp_path / "missing.json")), [])
  (tmp_path / "bad.json").write_text('{"model": 3}')
  with pytest.raises(UserError, match="not a Hugging Face tokenizer.json"):
    tokenizers.train_tokenizer(_hf_config(str(tmp_path / "bad.json")), [])
  with pytest.raises(UserError, match=r"hf_eos_token='\[EOS\]' is not in the vocabulary"):
    tokenizers.train_tokenizer(_hf_config(WORDPIECE, "[EOS]"), [])
  payload = json.load(open(BYTE_BPE))
  payload["added_tokens"][0]["content"] = "<|special|>"
  payload["model"]["vocab"]["<|special|>"] = payload["model"]["vocab"].pop("<|endoftext|>")
  (tmp_path / "no_eos.json").write_text(json.dumps(payload))
  with pytest.raises(UserError, match="none of the end-of-document tokens"):
    tokenizers.train_tokenizer(_hf_config(str(tmp_path / "no_eos.json")), [])


def test_hf_workdir_gets_its_own_copy(tmp_path, tiny_config):
  from diffusion_lm import experiment
  workdir = str(tmp_path / "run")
  tiny_config.tokenizer.update(kind="hf", hf_path=BYTE_BPE)
  tok = experiment.load_or_train_tokenizer(tiny_config, workdir)
  assert sorted(f for f in os.listdir(workdir) if not f.startswith(".")) == ["tokenizer.json", "tokenizer_config.json"]
  tiny_config.tokenizer.hf_path = str(tmp_path / "not_here.json")  # sampling on a machine without the file
  assert experiment.load_or_train_tokenizer(tiny_config, workdir).fingerprint() == tok.fingerprint()
  tiny_config.tokenizer.hf_path = WORDPIECE
  with pytest.raises(UserError, match="another vocabulary"):
    experiment.load_or_train_tokenizer(tiny_config, workdir)
