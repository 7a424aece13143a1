"""Tokenizers: character level and SentencePiece, each with an end-of-document id and a [MASK] id.

Ids 0..K-1 are data tokens (the end-of-document token included); `mask_id` = K is reserved for the
diffusion [MASK] and never produced by `encode`. `decode` inverts `encode` exactly on text the
tokenizer covers. Both are stored in the workdir without pickle (JSON / the SentencePiece proto) and
written atomically, so a run killed while writing never leaves a half-written tokenizer behind.
"""

import hashlib
import io
import json
import os
import tempfile
from typing import Iterable, Protocol, Sequence

import numpy as np

from diffusion_lm.errors import UserError

class Tokenizer(Protocol):
  kind: str
  vocab_size: int  # data tokens K (excluding [MASK])
  mask_id: int  # == vocab_size
  eos_id: int

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int], show_mask: bool = True) -> str: ...
  def fingerprint(self) -> str: ...


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes data to path via a temp file in the same directory and os.replace (atomic on POSIX)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class CharTokenizer:
  """One id per character seen in the training text, plus end-of-document."""

  kind = "char"

  def __init__(self, chars: Sequence[str]):
    chars = list(chars)
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
      raise UserError("character vocabulary must list distinct single characters")
    self.chars = chars
    self._index = {c: i for i, c in enumerate(chars)}
    self.eos_id = len(chars)
    self.vocab_size = len(chars) + 1
    self.mask_id = self.vocab_size

  @classmethod
  def train(cls, texts: Iterable[str]) -> "CharTokenizer":
    seen = set()
    for text in texts:
      seen.update(text)
    if not seen:
      raise UserError("cannot build a character vocabulary from an empty training split")
    return cls(sorted(seen))

  def encode(self, text: str) -> list[int]:
    try:
      return [self._index[c] for c in text]
    except KeyError as e:
      raise UserError(f"character {e.args[0]!r} is not in the character vocabulary of this model "
                      f"({len(self.chars)} characters seen in training)") from None

  def decode(self, ids: Sequence[int], show_mask: bool = True) -> str:
    out = []
    for i in np.asarray(ids).tolist():
      if i < len(self.chars):
        out.append(self.chars[i])
      elif i == self.eos_id:
        out.append("\n\n")
      elif i == self.mask_id and show_mask:
        out.append("_")
    return "".join(out)

  def token_text(self, i: int) -> str:
    """The text of one data token (for step-by-step displays)."""
    return self.chars[i] if i < len(self.chars) else "\n\n"

  def to_json(self) -> bytes:
    return json.dumps({"kind": "char", "chars": "".join(self.chars)}).encode()

  def fingerprint(self) -> str:
    return hashlib.sha256(self.to_json()).hexdigest()[:16]


class SentencePieceTokenizer:
  """SentencePiece (unigram or BPE) with identity normalisation and byte fallback: round-trips."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.eos_id = self.sp.eos_id()
    self.vocab_size = self.sp.get_piece_size()
    self.mask_id = self.vocab_size

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "unigram",
            max_sentences: int = 300_000) -> "SentencePieceTokenizer":
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if model_type not in ("unigram", "bpe"):
      raise UserError(f"tokenizer.model_type={model_type!r}; allowed: unigram, bpe")

    # Deterministic reservoir sample of the training lines (SentencePiece's own sampler is seeded
    # from the clock), so the same corpus always gives the same tokenizer.
    rng = np.random.default_rng(0)
    lines: list[str] = []
    seen = 0
    for text in texts:
      for line in text.split("\n"):
        if not line.strip():
          continue
        seen += 1
        if len(lines) < max_sentences:
          lines.append(line)
        else:
          j = rng.integers(0, seen)
          if j < max_sentences:
            lines[j] = line

    proto = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size,
          model_type=model_type, character_coverage=1.0, byte_fallback=True,
          normalization_rule_name="identity", add_dummy_prefix=False,
          remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=["\n"],
          unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, num_threads=1, minloglevel=2,
          allow_whitespace_only_pieces=True, split_by_whitespace=True)
    except RuntimeError as e:
      raise UserError(f"sentencepiece training failed with tokenizer.vocab_size={vocab_size}: "
                      f"{str(e).splitlines()[0]}") from None
    return cls(proto.getvalue())

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids: Sequence[int], show_mask: bool = True) -> str:
    pieces, out = [], []
    for i in np.asarray(ids).tolist():
      if i == self.mask_id or i == self.eos_id:
        if pieces:
          out.append(self.sp.decode(pieces))
          pieces = []
        if i == self.eos_id:
          out.append("\n\n")
        elif show_mask:
          out.append("_")
      elif 0 <= i < self.vocab_size:
        pieces.append(i)
    if pieces:
      out.append(self.sp.decode(pieces))
    return "".join(out)

  def token_text(self, i: int) -> str:
    """The text of one data token (for step-by-step displays); byte pieces show as their byte."""
    if i == self.eos_id:
      return "\n\n"
    piece = self.sp.id_to_piece(int(i))
    if self.sp.is_byte(int(i)):
      return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
    return piece.replace("\u2581", " ")

  def fingerprint(self) -> str:
    return hashlib.sha256(self.model_proto).hexdigest()[:16]


TOKENIZER_FILES = {"char": "tokenizer.json", "sentencepiece": "tokenizer.model"}


def save_tokenizer(tokenizer, directory: str) -> str:
  path = os.path.join(directory, TOKENIZER_FILES[tokenizer.kind])
  data = tokenizer.to_json() if tokenizer.kind == "char" else tokenizer.model_proto
  atomic_write_bytes(path, data)
  return path


def load_tokenizer(directory: str):
  """Loads the tokenizer saved in `directory`; None if there is none."""
  char_path = os.path.join(directory, TOKENIZER_FILES["char"])
  sp_path = os.path.join(directory, TOKENIZER_FILES["sentencepiece"])
  if os.path.exists(char_path):
    with open(char_path, "rb") as f:
      payload = json.loads(f.read())
    return CharTokenizer(list(payload["chars"]))
  if os.path.exists(sp_path):
    with open(sp_path, "rb") as f:
      return SentencePieceTokenizer(f.read())
  return None


def tokenizer_matches(tokenizer, tokenizer_config) -> bool:
  if tokenizer.kind != tokenizer_config.kind:
    return False
  if tokenizer.kind == "sentencepiece":
    return tokenizer.vocab_size == tokenizer_config.vocab_size
  return True


def train_tokenizer(tokenizer_config, texts: Iterable[str]):
  """Builds the tokenizer named by `config.tokenizer` from the training texts."""
  kind = tokenizer_config.kind
  if kind == "char":
    return CharTokenizer.train(texts)
  if kind == "sentencepiece":
    size = tokenizer_config.vocab_size
    if not isinstance(size, int) or size < 16:
      raise UserError(f"tokenizer.vocab_size={size!r}; allowed: an integer >= 16")
    return SentencePieceTokenizer.train(texts, size, tokenizer_config.model_type,
                                        tokenizer_config.max_sentences)
  raise UserError(f"tokenizer.kind={kind!r}; allowed: char, sentencepiece")
