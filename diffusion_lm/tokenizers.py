"""Tokenizers: character level, SentencePiece and Hugging Face `tokenizers` vocabularies, each with an
end-of-document id and a [MASK] id.

Ids 0..K-1 are data tokens (the end-of-document token included); `mask_id` = K is reserved for the
diffusion [MASK] and never produced by `encode`. `decode` inverts `encode` exactly on text the
tokenizer covers (a Hugging Face vocabulary with a normaliser, e.g. bert-base-uncased's lowercasing,
inverts it up to that normalisation). All are stored in the workdir without pickle (JSON / the
SentencePiece proto) and written atomically, so a run killed while writing never leaves a half-written
tokenizer behind.
"""

import hashlib
import io
import json
from typing import Iterable, Protocol, Sequence

import numpy as np

from diffusion_lm import paths
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
  """Writes data to path (local or gs://) atomically; see paths.write_bytes."""
  paths.write_bytes(path, data)


def decode_runs(ids, decode_run, mask_id: int, eos_id: int, vocab_size: int, show_mask: bool) -> str:
  """Text of ids for a subword vocabulary: each run of data ids decoded whole by `decode_run` (so pieces
  join as the vocabulary joins them), [MASK] as "_" (when show_mask), end-of-document as a blank line;
  other ids (padding rows) are skipped."""
  run, out = [], []
  for i in np.asarray(ids).tolist():
    if i == mask_id or i == eos_id:
      if run:
        out.append(decode_run(run))
        run = []
      if i == eos_id:
        out.append("\n\n")
      elif show_mask:
        out.append("_")
    elif 0 <= i < vocab_size:
      run.append(i)
  if run:
    out.append(decode_run(run))
  return "".join(out)


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

  def __reduce__(self):  # pickled by its model (tokenizer processes); the processor object cannot be
    return (SentencePieceTokenizer, (self.model_proto,))

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
    return decode_runs(ids, self.sp.decode, self.mask_id, self.eos_id, self.vocab_size, show_mask)

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


# End-of-document tokens looked for, in this order, when tokenizer.hf_eos_token is empty: GPT-2's
# <|endoftext|>, BERT's [SEP] (MDLM wraps LM1B sentences as [CLS] ... [SEP]), then common others.
HF_EOS_TOKENS = ("<|endoftext|>", "[SEP]", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
HF_BOS_TOKENS = ("[CLS]", "<s>", "<bos>", "<|begin_of_text|>")
HF_MASK_TOKENS = ("[MASK]", "<mask>", "<|mask|>")


def byte_level_alphabet() -> dict[str, int]:
  """The printable stand-in character of each byte in byte-level BPE vocabularies (GPT-2's scheme).

  Bytes that are printable Latin-1 characters stand for themselves; the other bytes, in increasing
  order, take the characters from U+0100 on. Returns {stand-in character: byte}.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
               + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  table, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      table[chr(byte)] = byte
    else:
      table[chr(256 + extra)] = byte
      extra += 1
  return table


class HFTokenizer:
  """A Hugging Face `tokenizers` vocabulary (WordPiece, BPE, Unigram) read from a tokenizer.json.

  Nothing is trained: the file is the vocabulary (e.g. bert-base-uncased's or GPT-2's, downloaded
  once). `encode` adds no special tokens (the data pipeline places end-of-document ids itself).
  `eos_id` is the end-of-document token (`eos_token`, or the first of HF_EOS_TOKENS the vocabulary
  has); `bos_id` and `vocab_mask_id` are the vocabulary's own begin token and mask token, or None.
  The diffusion [MASK] stays `mask_id` = vocab_size, one past the file's largest id, unless a converted
  checkpoint names its own (`mask_token`, e.g. LLaDA's <|mdm_mask|>: mask_id is then that token's id,
  inside the vocabulary). `vocab_size` (a converted checkpoint's embedding rows, often more than the
  file's ids) raises the vocabulary to the model's; ids without a token decode to nothing.
  """

  kind = "hf"

  def __init__(self, tokenizer_json: bytes, eos_token: str = "", mask_token: str = "", vocab_size: int = 0):
    try:
      import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError("tokenizer.kind='hf' needs the Hugging Face tokenizers package; allowed: "
                      "pip install -r requirements.txt (or pip install tokenizers)") from None
    try:
      self.tok = hf_tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except  (the Rust side raises plain Exception)
      raise UserError(f"not a Hugging Face tokenizer.json: {str(e).splitlines()[0][:200]}; allowed: a "
                      "tokenizer.json written by the tokenizers library (e.g. from the model's hub page)") from None
    self.tokenizer_json = tokenizer_json
    vocab = self.tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(max(vocab.values()) + 1, int(vocab_size))
    if mask_token and mask_token not in vocab:
      raise UserError(f"mask token {mask_token!r} is not in the tokenizer.json; allowed: one of its tokens")
    self.mask_token = mask_token
    self.mask_id = vocab[mask_token] if mask_token else self.vocab_size
    self.special_tokens = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
    if eos_token:
      if eos_token not in vocab:
        raise UserError(f"tokenizer.hf_eos_token={eos_token!r} is not in the vocabulary; allowed: one of its "
                        f"tokens, e.g. {', '.join(sorted(self.special_tokens)[:8]) or 'none are special'}")
    else:
      eos_token = next((t for t in HF_EOS_TOKENS if t in vocab), "")
      if not eos_token:
        raise UserError(f"the tokenizer.json has none of the end-of-document tokens {', '.join(HF_EOS_TOKENS)}; "
                        "allowed: name one of its tokens in tokenizer.hf_eos_token")
    self.eos_token = eos_token
    self.eos_id = vocab[eos_token]
    self.bos_id = next((vocab[t] for t in HF_BOS_TOKENS if t in vocab), None)
    self.vocab_mask_id = next((vocab[t] for t in HF_MASK_TOKENS if t in vocab), None)
    self.byte_level = (self._section("decoder") or {}).get("type") == "ByteLevel"

  def __reduce__(self):  # pickled by its file and eos choice (tokenizer processes)
    return (HFTokenizer, (self.tokenizer_json, self.eos_token))

  def _section(self, name: str):
    return json.loads(self.tokenizer_json).get(name)

  @classmethod
  def from_file(cls, path: str, eos_token: str = "") -> "HFTokenizer":
    if not path:
      raise UserError("tokenizer.kind='hf' needs tokenizer.hf_path; allowed: the path of a Hugging Face "
                      "tokenizer.json (e.g. bert-base-uncased's or gpt2's, downloaded once)")
    if not paths.isfile(path):
      raise UserError(f"tokenizer.hf_path={path!r}: no such file; allowed: the path of a Hugging Face "
                      "tokenizer.json")
    return cls(paths.read_bytes(path), eos_token)

  def encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int], show_mask: bool = True) -> str:
    return decode_runs(ids, lambda run: self.tok.decode(run, skip_special_tokens=False), self.mask_id, self.eos_id,
                       self.vocab_size, show_mask)

  def token_text(self, i: int) -> str:
    """The text of one data token (for step-by-step displays)."""
    if i == self.eos_id:
      return "\n\n"
    piece = self.tok.id_to_token(int(i)) or ""
    if self.byte_level and piece not in self.special_tokens:
      alphabet = byte_level_alphabet()
      return bytes(alphabet[c] for c in piece if c in alphabet).decode("utf-8", errors="replace")
    prefix = (self._section("decoder") or {}).get("prefix", "##")
    return piece[len(prefix):] if piece.startswith(prefix) else " " + piece

  def char_counts(self) -> np.ndarray:
    """Characters each id stands for (see data.token_char_counts): int32[vocab_size].

    Exact for byte-level vocabularies (GPT-2): a character counts at the token holding its first UTF-8
    byte. Otherwise the length of the piece's text without a continuation prefix: such tokenizers drop
    whitespace and normalise before splitting, so per-character figures count the normalised text's
    non-space characters.
    """
    counts = np.ones(self.vocab_size, dtype=np.int32)
    alphabet = byte_level_alphabet() if self.byte_level else {}
    prefix = (self._section("decoder") or {}).get("prefix", "##")
    for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
      if piece in self.special_tokens:
        continue  # end-of-document and other special tokens count one
      if self.byte_level:
        counts[i] = sum(1 for c in piece if not 0x80 <= alphabet.get(c, 0) < 0xC0)
      else:
        counts[i] = len(piece) - (len(prefix) if piece.startswith(prefix) and len(piece) > len(prefix) else 0)
    return counts

  def fingerprint(self) -> str:
    settings = self.settings()
    extra = json.dumps(settings, sort_keys=True).encode() if len(settings) > 1 else b""
    return hashlib.sha256(self.tokenizer_json + b"\0" + self.eos_token.encode() + extra).hexdigest()[:16]

  def settings(self) -> dict:
    """What tokenizer_config.json keeps besides the tokenizer.json: the eos choice, and a converted
    checkpoint's own mask token and vocabulary size."""
    settings = {"eos_token": self.eos_token}
    if self.mask_token or self.vocab_size > max(self.tok.get_vocab(with_added_tokens=True).values()) + 1:
      settings.update({"mask_token": self.mask_token, "vocab_size": self.vocab_size})
    return settings


TOKENIZER_FILES = {"char": "tokenizer.json", "sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}


HF_CONFIG_FILE = "tokenizer_config.json"  # hf kind: {"eos_token": ...}, as in Hugging Face model folders


def save_tokenizer(tokenizer, directory: str) -> str:
  path = paths.join(directory, TOKENIZER_FILES[tokenizer.kind])
  if tokenizer.kind == "hf":
    # The eos choice first: a tokenizer.json without it reloads with the default eos token.
    atomic_write_bytes(paths.join(directory, HF_CONFIG_FILE),
                       json.dumps(tokenizer.settings()).encode())
    atomic_write_bytes(path, tokenizer.tokenizer_json)
    return path
  data = tokenizer.to_json() if tokenizer.kind == "char" else tokenizer.model_proto
  atomic_write_bytes(path, data)
  return path


def load_tokenizer(directory: str):
  """Loads the tokenizer saved in `directory`; None if there is none; UserError naming the file when it
  is damaged (truncated, overwritten)."""
  try:
    return _load_tokenizer(directory)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (json, tokenizers and sentencepiece raise many kinds)
    files = [paths.join(directory, name) for name in (TOKENIZER_FILES["char"], HF_CONFIG_FILE,
                                                       TOKENIZER_FILES["sentencepiece"]) if paths.exists(
                                                           paths.join(directory, name))]
    reason = " ".join(str(e).split())[:160]
    raise UserError(f"the tokenizer in {directory!r} does not load ({type(e).__name__}: {reason}; files: "
                    f"{', '.join(files)}); allowed: an intact tokenizer file (copy it from a backup or the "
                    "workdir it came from)") from None


def _load_tokenizer(directory: str):
  json_path = paths.join(directory, TOKENIZER_FILES["char"])  # char and hf kinds
  sp_path = paths.join(directory, TOKENIZER_FILES["sentencepiece"])
  if paths.exists(json_path):
    raw = paths.read_bytes(json_path)
    payload = json.loads(raw)
    if payload.get("kind") == "char":
      return CharTokenizer(list(payload["chars"]))
    eos_token, settings = "", {}
    if paths.exists(paths.join(directory, HF_CONFIG_FILE)):
      settings = json.loads(paths.read_bytes(paths.join(directory, HF_CONFIG_FILE)))
      eos_token = settings.get("eos_token") or ""
      if isinstance(eos_token, dict):  # Hugging Face's AddedToken form
        eos_token = eos_token.get("content", "")
    # mask_token / vocab_size: only a converted checkpoint's (convert.py writes them; a Hugging Face
    # folder's own tokenizer_config.json has a mask_token too, but this project's [MASK] stays outside).
    mask_token = (settings.get("mask_token") or "") if "vocab_size" in settings else ""
    return HFTokenizer(raw, eos_token, mask_token, int(settings.get("vocab_size") or 0))
  if paths.exists(sp_path):
    return SentencePieceTokenizer(paths.read_bytes(sp_path))
  return None


def tokenizer_matches(tokenizer, tokenizer_config) -> bool:
  if tokenizer.kind != tokenizer_config.kind:
    return False
  if tokenizer.kind == "sentencepiece":
    return tokenizer.vocab_size == tokenizer_config.vocab_size
  if tokenizer.kind == "hf" and tokenizer_config.get("hf_path") and paths.isfile(tokenizer_config.hf_path):
    # Where the configured file is at hand it must be the workdir's vocabulary (sampling elsewhere
    # without the file uses the workdir's copy).
    wanted = HFTokenizer.from_file(tokenizer_config.hf_path, tokenizer_config.get("hf_eos_token", ""))
    return wanted.fingerprint() == tokenizer.fingerprint()
  return True


def train_tokenizer(tokenizer_config, texts: Iterable[str]):
  """Builds the tokenizer named by `config.tokenizer` from the training texts (hf: reads its file)."""
  kind = tokenizer_config.kind
  if kind == "char":
    return CharTokenizer.train(texts)
  if kind == "sentencepiece":
    size = tokenizer_config.vocab_size
    if not isinstance(size, int) or size < 16:
      raise UserError(f"tokenizer.vocab_size={size!r}; allowed: an integer >= 16")
    return SentencePieceTokenizer.train(texts, size, tokenizer_config.model_type,
                                        tokenizer_config.max_sentences)
  if kind == "hf":
    return HFTokenizer.from_file(tokenizer_config.get("hf_path", ""), tokenizer_config.get("hf_eos_token", ""))
  raise UserError(f"tokenizer.kind={kind!r}; allowed: char, sentencepiece, hf")
