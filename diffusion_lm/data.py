"""Input pipeline: text -> tfds ArrayRecord -> tokens -> packed int32 windows -> per-process batches.

* Local text (the bundled corpus or a user's folder of .txt/.txt.gz/.txt.xz/.txt.bz2 files) goes
  through the `LocalText` tfds builder, prepared as ArrayRecord without TensorFlow; a named tfds
  dataset (`data.source="tfds"`) goes through `tfds.builder(...)` with the same file format. Both are
  read back with `as_data_source` (random access, no TensorFlow).
* Each split is tokenized once into a flat token stream (end-of-document ids between documents) and
  cached as .npy next to the prepared data; windows of `seq_len` tokens are the training examples.
* Batches come from a grain `MapDataset` (seeded shuffle, reshuffled each epoch, repeated): the
  global batch is the same whatever the process count, and each process reads only its rows. The
  iterator state (grain's `get_state()`) is saved in every checkpoint, so a resume continues the
  exact data order.
"""

import bz2
import dataclasses
import difflib
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import time
import zlib
from typing import Iterator, NamedTuple

import grain
import numpy as np

from diffusion_lm import corpora, paths
from diffusion_lm.errors import UserError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.xz", ".txt.bz2")
SOURCES = ("bundled", "local", "text8", "tfds", "hf", "jsonl")
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_SPLITS = {"train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}  # 90M / 5M / 5M


# ----------------------------------------------------------------------------- reading local text


def list_text_files(path: str) -> list[str]:
  """The text files at `path` (one file, or a folder searched recursively), sorted."""
  if not path:
    raise UserError("data.path is empty; allowed: a text file or a folder of .txt files")
  if not paths.exists(path):
    raise UserError(f"corpus path {path!r} does not exist; allowed: a text file or a folder of "
                    f"{', '.join(TEXT_SUFFIXES)} files")
  if paths.isfile(path):
    return [path]
  files = sorted(f for f in paths.files_under(path) if f.endswith(TEXT_SUFFIXES))
  if not files:
    raise UserError(f"corpus folder {path!r} holds no text files; allowed: {', '.join(TEXT_SUFFIXES)}")
  return files


def read_text_file(path: str) -> str:
  """Reads a (possibly compressed) UTF-8 text file; newlines normalised to \\n."""
  decompress = {".gz": gzip.decompress, ".xz": lzma.decompress, ".bz2": bz2.decompress}.get(
      os.path.splitext(path)[1], bytes)
  data = decompress(paths.read_bytes(path))
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"corpus file {path!r} is not UTF-8 text (byte {data[e.start]:#04x} at offset "
                    f"{e.start}); allowed: UTF-8 encoded text") from None
  if "\x00" in text:
    raise UserError(f"corpus file {path!r} holds NUL bytes (binary data?); allowed: UTF-8 text")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def split_passages(text: str, passage_chars: int) -> list[str]:
  """Cuts text into consecutive passages of about `passage_chars`, at line ends where possible.

  Concatenating the passages gives back the text exactly.
  """
  passages, start = [], 0
  while start < len(text):
    end = min(start + passage_chars, len(text))
    if end < len(text):
      newline = text.rfind("\n", start + passage_chars // 2, end)
      if newline != -1:
        end = newline + 1
    passages.append(text[start:end])
    start = end
  return passages


def document_name(path: str, files: list[str]) -> str:
  """A file's name relative to the corpus root (its document id)."""
  root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
  return os.path.relpath(path, root)


def passage_split(doc: str, part: int, validation_percent: float) -> str:
  """Deterministic train/validation assignment of a passage, by a hash of its name."""
  bucket = zlib.crc32(f"{doc}:{part}".encode()) % 10_000
  return "validation" if bucket < validation_percent * 100 else "train"


# ----------------------------------------------------------------------------- tfds builder

_TFDS = None


def _tfds():
  """Imports tensorflow_datasets lazily (slow import) with its progress bars off."""
  global _TFDS
  if _TFDS is None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
    # tfds warns on every custom builder config; ours are always custom (named by content hash).
    logging.getLogger("absl").addFilter(
        lambda record: not str(record.msg).startswith("Using custom data configuration"))
    _TFDS = tfds
  return _TFDS


def _local_text_builder_cls():
  tfds = _tfds()
  if hasattr(_local_text_builder_cls, "cls"):
    return _local_text_builder_cls.cls

  class LocalTextConfig(tfds.core.BuilderConfig):
    """One prepared copy per (files, split settings); the name is a hash of them."""

    def __init__(self, *, files, validation_percent, passage_chars, **kwargs):
      super().__init__(**kwargs)
      self.files = files
      self.validation_percent = validation_percent
      self.passage_chars = passage_chars

  class LocalText(tfds.core.GeneratorBasedBuilder):
    """Text files on disk as a tfds dataset: examples are passages {text, doc, part}."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="Local text files cut into passages, split train/validation by passage hash.",
          features=tfds.features.FeaturesDict({
              "text": tfds.features.Text(),
              "doc": tfds.features.Text(),
              "part": np.int64,
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split):
      cfg = self.builder_config
      for path in cfg.files:
        doc = document_name(path, cfg.files)
        for part, passage in enumerate(split_passages(read_text_file(path), cfg.passage_chars)):
          if passage_split(doc, part, cfg.validation_percent) == split:
            yield f"{doc}:{part}", {"text": passage, "doc": doc, "part": part}

  class Text8(tfds.core.GeneratorBasedBuilder):
    """text8 (the first 10^8 bytes of cleaned English Wikipedia: a-z and space) with the standard
    90M/5M/5M train/validation/test split, as passages {text, doc, part} in order."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, archive: str = "", **kwargs):
      self._archive = archive
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=self.__doc__, homepage="http://mattmahoney.net/dc/textdata.html",
          features=tfds.features.FeaturesDict({
              "text": tfds.features.Text(), "doc": tfds.features.Text(), "part": np.int64}))

    def _split_generators(self, dl_manager):
      path = self._archive or dl_manager.download(TEXT8_URL)
      text = read_text8(str(path))
      return {split: self._generate_examples(text, split) for split in TEXT8_SPLITS}

    def _generate_examples(self, text, split):
      lo, hi = (int(round(f * len(text))) for f in TEXT8_SPLITS[split])
      for part, start in enumerate(range(lo, hi, 1 << 16)):
        yield f"{split}:{part}", {"text": text[start:min(start + (1 << 16), hi)], "doc": split, "part": part}

  _local_text_builder_cls.cls = (LocalText, LocalTextConfig, Text8)
  return _local_text_builder_cls.cls


def read_text8(path: str) -> str:
  """The text8 text from the zip archive (member "text8") or the unzipped file."""
  import zipfile  # pylint: disable=g-import-not-at-top
  data = paths.read_bytes(path)
  if zipfile.is_zipfile(io.BytesIO(data)):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      names = archive.namelist()
      if "text8" not in names:
        raise UserError(f"text8 archive {path!r} has no member 'text8' (has {names[:3]}); allowed: text8.zip")
      data = archive.read("text8")
  text = data.decode("ascii", errors="replace")
  bad = set(text) - set("abcdefghijklmnopqrstuvwxyz ")
  if bad:
    raise UserError(f"text8 file {path!r} holds characters {sorted(bad)[:5]} outside a-z and space;"
                    " allowed: the text8 file or text8.zip")
  return text


@dataclasses.dataclass
class TextSplit:
  """A split's texts in document order; `doc_ends[i]` says whether text i ends a document."""

  name: str
  fingerprint: str
  source: object  # random-access data source
  order: np.ndarray
  doc_ends: np.ndarray
  text_key: str
  transform: object = None  # str -> str applied to each text (data.detokenize), or None

  def __len__(self):
    return len(self.order)

  def texts(self) -> Iterator[str]:
    for i in self.order:
      value = self.source[int(i)][self.text_key]
      text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
      yield self.transform(text) if self.transform is not None else text


# data.detokenize="lm1b": LM1B's text comes with spaces around punctuation and clitics ("it 's , a"); the
# MDLM and BD3-LM data pipelines undo that before tokenizing, with these rewrites in this order.
LM1B_REWRITES = (
    ("http : / / ", "http://", False), ("https : / / ", "https://", False),
    (r" '(\w+)", r"'\1", True), (r" (\w+) \. ", r" \1. ", True), (r" (\w+) \.$", r" \1.", True),
    (" ? ", "? ", False), (r" \?$", "?", True), (" ! ", "! ", False), (r" \!$", "!", True),
    (" , ", ", ", False), (" : ", ": ", False), (" ; ", "; ", False), (" / ", "/", False),
    (r'" ([^"]+) "', r'"\1"', True), (r"' ([^']+) '", r"'\1'", True),
    (r"\( ([^()]+) \)", r"(\1)", True), (r"\[ ([^\[\]]+) \]", r"[\1]", True),
    ("$ ", "$", False), ("\u00a3 ", "\u00a3", False),
)


def lm1b_detokenize(text: str) -> str:
  """LM1B text with the tokenizer-style spacing undone (see LM1B_REWRITES)."""
  import re  # pylint: disable=g-import-not-at-top
  for pattern, replacement, is_regex in LM1B_REWRITES:
    text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
  return text


DETOKENIZERS = {"lm1b": lm1b_detokenize}


def _with_detokenizer(split: TextSplit, data_config) -> TextSplit:
  name = data_config.get("detokenize", "")
  if not name:
    return split
  if name not in DETOKENIZERS:
    raise UserError(f"data.detokenize={name!r}; allowed: '' (off), {', '.join(DETOKENIZERS)}")
  fingerprint = hashlib.sha256(f"{split.fingerprint}:detokenize={name}".encode()).hexdigest()[:12]
  return dataclasses.replace(split, fingerprint=fingerprint, transform=DETOKENIZERS[name])


def _local_path(data_config) -> str:
  return corpora.SHAKESPEARE_DIR if data_config.source == "bundled" else data_config.path


def _check_data_config(data_config):
  if data_config.source not in SOURCES:
    raise UserError(f"data.source={data_config.source!r}; allowed: {', '.join(SOURCES)}")
  if not 0 < data_config.validation_percent < 100:
    raise UserError(f"data.validation_percent={data_config.validation_percent}; allowed: 0 < value < 100")
  if data_config.passage_chars < 64:
    raise UserError(f"data.passage_chars={data_config.passage_chars}; allowed: an integer >= 64")


def _check_local_corpus(path, files, data_config) -> None:
  """Fails early, in one line, on text the builder would choke on or turn into an empty split."""
  counts = {"train": 0, "validation": 0}
  for f in files:
    doc = document_name(f, files)
    for part, _ in enumerate(split_passages(read_text_file(f), data_config.passage_chars)):
      counts[passage_split(doc, part, data_config.validation_percent)] += 1
  if not any(counts.values()):
    raise UserError(f"corpus {path!r} is empty; allowed: files holding UTF-8 text")
  for split, count in counts.items():
    if not count:
      raise UserError(
          f"corpus {path!r} gives an empty {split} split ({sum(counts.values())} passages of about "
          f"{data_config.passage_chars} characters, data.validation_percent={data_config.validation_percent});"
          " allowed: more text, a smaller data.passage_chars or another validation_percent")


def load_text_split(data_config, split: str, data_dir: str, coordinate: bool = True) -> TextSplit:
  """Prepares (once) and opens one split of the configured text source.

  coordinate: every process calls this together (process 0 prepares first, see `_prepare`); False
  when only one process calls it. data.detokenize, when set, rewrites each text as it is read.
  """
  return _with_detokenizer(_load_text_split(data_config, split, data_dir, coordinate), data_config)


def _load_text_split(data_config, split: str, data_dir: str, coordinate: bool = True) -> TextSplit:
  _check_data_config(data_config)
  if data_config.source == "jsonl":
    raise UserError("data.source='jsonl' holds prompt/response pairs, not running text; allowed: objective='sft' "
                    "(which reads them with data.prompt_response_rows) or a text source")
  tfds = _tfds()
  if data_config.source in ("bundled", "local"):
    files = list_text_files(_local_path(data_config))
    LocalText, LocalTextConfig, _ = _local_text_builder_cls()
    stamp = json.dumps([[paths.resolve(f), paths.size(f), paths.mtime(f)] for f in files]
                       + [data_config.validation_percent, data_config.passage_chars])
    fingerprint = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    if split not in ("train", "validation"):
      raise UserError(f"split {split!r} of local text; allowed: train, validation")
    builder = LocalText(
        config=LocalTextConfig(name=f"c{fingerprint}", files=files,
                               validation_percent=data_config.validation_percent,
                               passage_chars=data_config.passage_chars),
        data_dir=data_dir, file_format="array_record")
    if not paths.exists(paths.join(builder.data_dir, "dataset_info.json")):
      _check_local_corpus(_local_path(data_config), files, data_config)
    _prepare(builder, data_dir, coordinate)
    source = builder.as_data_source(split=split)
    docs = [source[i]["doc"] for i in range(len(source))]
    parts = [int(source[i]["part"]) for i in range(len(source))]
    order = np.array(sorted(range(len(source)), key=lambda i: (docs[i], parts[i])), dtype=np.int64)
    doc_ends = np.ones(len(order), dtype=bool)
    for j in range(len(order) - 1):
      a, b = order[j], order[j + 1]
      doc_ends[j] = not (docs[a] == docs[b] and parts[b] == parts[a] + 1)
    return TextSplit(split, fingerprint, source, order, doc_ends, "text")

  if data_config.source == "text8":
    return _text8_split(data_config, split, data_dir, coordinate)

  if data_config.source == "hf":
    from diffusion_lm import hf_data  # pylint: disable=g-import-not-at-top
    rows, lo, hi, fingerprint = hf_data.load_split(data_config, split)
    name = hf_data.parse_split(split)[0]  # the cache file name: no brackets
    return TextSplit(name, fingerprint, rows, np.arange(lo, hi), np.ones(hi - lo, dtype=bool), data_config.text_key)

  name = data_config.tfds_name
  base = name.split("/")[0].split(":")[0]
  known = tfds.list_builders(with_community_datasets=False)
  if base not in known:
    close = difflib.get_close_matches(base, known, n=3)
    raise UserError(f"unknown tfds dataset {name!r}"
                    + (f"; close matches: {', '.join(close)}" if close else "; see tfds.list_builders()"))
  builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
  _prepare(builder, data_dir or tfds.core.constants.DATA_DIR, coordinate)
  if split not in builder.info.splits:
    raise UserError(f"tfds dataset {name!r} has no split {split!r}; allowed: "
                    f"{', '.join(builder.info.splits)}")
  source = builder.as_data_source(split=split)
  n = len(source)
  fingerprint = hashlib.sha256(f"{builder.info.full_name}:{split}".encode()).hexdigest()[:12]
  return TextSplit(split, fingerprint, source, np.arange(n), np.ones(n, dtype=bool),
                   data_config.text_key)


def _text8_split(data_config, split: str, data_dir: str, coordinate: bool = True) -> TextSplit:
  """text8 through the Text8 tfds builder: a local copy (data.path) or the public archive."""
  _, _, Text8 = _local_text_builder_cls()
  if split not in TEXT8_SPLITS:
    raise UserError(f"split {split!r} of text8; allowed: {', '.join(TEXT8_SPLITS)}")
  archive = data_config.path
  if archive and not paths.exists(archive):
    raise UserError(f"text8 path {archive!r} does not exist; allowed: the text8 file or text8.zip")
  # A local copy gets its own prepared dataset (keyed by its path and size), the download another.
  stamp = f"{paths.resolve(archive)}:{paths.size(archive)}" if archive else TEXT8_URL
  subdir = paths.join(data_dir, "text8-" + hashlib.sha256(stamp.encode()).hexdigest()[:12])
  builder = Text8(archive=archive, data_dir=subdir, file_format="array_record")
  try:
    _prepare(builder, subdir, coordinate)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if archive:
      raise
    raise UserError(f"text8 could not be downloaded from {TEXT8_URL} ({type(e).__name__}); offline, give a "
                    "local copy: --config.data.path=/path/to/text8.zip") from None
  source = builder.as_data_source(split=split)
  n = len(source)
  parts = [int(source[i]["part"]) for i in range(n)]
  order = np.array(sorted(range(n), key=lambda i: parts[i]), dtype=np.int64)
  doc_ends = np.zeros(n, dtype=bool)
  doc_ends[-1] = True  # each split is one continuous stretch of text
  fingerprint = hashlib.sha256(f"text8:{stamp}:{split}".encode()).hexdigest()[:12]
  return TextSplit(split, fingerprint, source, order, doc_ends, "text")


def _prepare(builder, data_dir: str, coordinate: bool = True):
  """download_and_prepare: process 0 first; after a barrier the others find the data prepared (a
  shared folder) or prepare their own copy (a folder of their own host). No file lock: it would
  coordinate nothing across the hosts of a pod."""
  if paths.is_uri(builder.data_dir) and not builder.is_prepared():
    raise UserError(f"data folder {data_dir!r} holds no prepared copy of this text and array_record writes "
                    "local files only; allowed: a local data.cache_dir (the default for a gs:// workdir), or a "
                    "bucket folder prepared elsewhere")
  if not coordinate:
    _download_and_prepare(builder)
    return
  if paths.is_writer():
    _download_and_prepare(builder)
  paths.sync("diffusion_lm:prepare")
  if not paths.is_writer():
    _download_and_prepare(builder)


def _download_and_prepare(builder) -> None:
  """builder.download_and_prepare, safe against another run preparing the same text in the same folder
  (two first runs sharing data.cache_dir): tfds prepares into a folder of its own and renames it into place
  when complete, so the one that finishes second finds a complete copy there, uses it, and drops its own."""
  try:
    builder.download_and_prepare(file_format="array_record")
  except FileExistsError as e:
    if not builder.is_prepared():
      raise
    found = re.search(r"Cannot rename (\S+)\. Destination", str(e))
    if found and "incomplete." in os.path.basename(found.group(1)) and not paths.is_uri(found.group(1)):
      shutil.rmtree(found.group(1), ignore_errors=True)
    logging.info("data in %s was prepared by another run at the same time; using its copy", builder.data_dir)


# ----------------------------------------------------------------------------- tokenization cache


def token_char_counts(tokenizer) -> np.ndarray:
  """Characters of text each data token id stands for: int32[vocab_size].

  Summed over a run of tokens this gives the characters of the text the run encodes, exactly: a
  character is counted at the token holding its first UTF-8 byte (SentencePiece byte-fallback pieces
  of one character count 1, 0, ...), and the end-of-document token counts one, as in
  `TokenizedSplit.num_chars`. Bits per character of any set of windows come from it without decoding.
  """
  counts = np.ones(tokenizer.vocab_size, dtype=np.int32)
  if tokenizer.kind == "char":
    return counts  # one id per character, plus end-of-document
  if tokenizer.kind == "hf":
    return tokenizer.char_counts()
  if tokenizer.kind != "sentencepiece":
    raise UserError(f"tokenizer kind {tokenizer.kind!r}; allowed: char, sentencepiece, hf")
  sp = tokenizer.sp
  for i in range(tokenizer.vocab_size):
    if sp.is_byte(i):
      byte = int(sp.id_to_piece(i)[3:5], 16)
      counts[i] = 0 if 0x80 <= byte < 0xC0 else 1  # a continuation byte starts no character
    elif not (sp.is_control(i) or sp.is_unknown(i)):
      counts[i] = len(sp.id_to_piece(i))  # "\u2581" stands for one space
  return counts


@dataclasses.dataclass
class TokenizedSplit:
  tokens: np.ndarray  # int32 (memory-mapped), documents separated by eos_id
  num_chars: int  # characters of text these tokens encode (each end-of-document counted as one)

  @property
  def chars_per_token(self) -> float:
    return self.num_chars / max(1, len(self.tokens))


def tokenize_split(text_split: TextSplit, tokenizer, cache_dir: str, coordinate: bool = True,
                   processes: int = 0) -> TokenizedSplit:
  """Token stream of a split, cached as .npy keyed by the split and tokenizer fingerprints.

  Process 0 tokenizes and writes the cache; the others wait at a barrier and read it (or, on a folder
  of their own host, make their own). A local cache is memory-mapped; one in a bucket is read whole.
  coordinate: every process calls this together; False when only one does.
  processes: tokenizer processes (data.tokenize_processes); 0 picks one per CPU core (at most 16) for
  splits of PARALLEL_MIN_TEXTS texts or more, 1 tokenizes here. The cache is the same either way.
  """
  stem = paths.join(cache_dir, f"{text_split.name}-{text_split.fingerprint}-{tokenizer.fingerprint()}")
  if (paths.is_writer() or not coordinate) and not paths.exists(stem + ".json"):
    try:
      _tokenize_to_cache(text_split, tokenizer, stem, processes)
    except UserError as e:
      if "character vocabulary" not in str(e):
        raise
      raise UserError(f"the {text_split.name!r} split: {e}, which is built from the train split only; allowed: "
                      "tokenizer.kind=sentencepiece (byte fallback encodes any text), or text whose characters all "
                      "occur in the train split") from None
  if coordinate:
    paths.sync("diffusion_lm:tokenize")
    if not paths.exists(stem + ".json"):
      _tokenize_to_cache(text_split, tokenizer, stem, processes)
  meta = json.loads(paths.read_bytes(stem + ".json"))
  if paths.is_uri(stem):
    tokens = np.load(io.BytesIO(paths.read_bytes(stem + ".npy")))
  else:
    tokens = np.load(stem + ".npy", mmap_mode="r")
  return TokenizedSplit(tokens, meta["num_chars"])


PARALLEL_MIN_TEXTS = 20_000  # data.tokenize_processes=0: smaller splits are tokenized in-process
BATCH_CHARS = 1 << 20  # characters of text per unit of work sent to a tokenizer process


def _text_batches(text_split: TextSplit, batch_chars: int):
  """[(text, ends document), ...] lists of about batch_chars characters, in split order."""
  batch, chars = [], 0
  for text, ends in zip(text_split.texts(), text_split.doc_ends):
    batch.append((text, bool(ends)))
    chars += len(text)
    if chars >= batch_chars:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


def _encode_batch(tokenizer, batch) -> np.ndarray:
  ids = []
  for text, ends in batch:
    ids.extend(tokenizer.encode(text))
    if ends:
      ids.append(tokenizer.eos_id)
  return np.asarray(ids, dtype=np.int32)


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tokenizer


def _encode_batch_in_worker(batch) -> np.ndarray:
  return _encode_batch(_WORKER_TOKENIZER, batch)


def _encoded_batches(text_split: TextSplit, tokenizer, processes: int, batch_chars: int):
  """(token ids, texts, characters) of each batch, in split order, from `processes` processes.

  At most 2 x processes batches are in flight, so memory does not grow with the corpus. Workers are
  spawned (not forked): the parent may hold JAX's threads.
  """
  batches = _text_batches(text_split, batch_chars)
  if processes <= 1:
    for batch in batches:
      yield _encode_batch(tokenizer, batch), len(batch), sum(len(t) + e for t, e in batch)
    return
  import collections  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  # A spawned worker first re-imports the caller's main script, which reruns a script whose top level
  # is not guarded by `if __name__ == "__main__"`; the workers need nothing from it (their code lives in
  # this package), so they start from an empty main module instead.
  main = sys.modules["__main__"]
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    pool = multiprocessing.get_context("spawn").Pool(processes, _init_worker, (tokenizer,))
  finally:
    sys.modules["__main__"] = main
  with pool:
    in_flight = collections.deque()
    for batch in batches:
      in_flight.append((pool.apply_async(_encode_batch_in_worker, (batch,)), len(batch),
                        sum(len(t) + e for t, e in batch)))
      if len(in_flight) >= 2 * processes:
        result, texts, chars = in_flight.popleft()
        yield result.get(), texts, chars
    while in_flight:
      result, texts, chars = in_flight.popleft()
      yield result.get(), texts, chars


def tokenize_processes(processes: int, num_texts: int) -> int:
  """Processes to tokenize a split of num_texts texts with (see tokenize_split)."""
  if not isinstance(processes, int) or processes < 0:
    raise UserError(f"data.tokenize_processes={processes!r}; allowed: 0 (automatic), 1 (in-process) or more")
  if processes == 0:
    return min(os.cpu_count() or 1, 16) if num_texts >= PARALLEL_MIN_TEXTS else 1
  return processes


def _tokenize_to_cache(text_split: TextSplit, tokenizer, stem: str, processes: int = 0) -> None:
  """Writes STEM.npy (the token stream) and then STEM.json (its counts: the cache is complete)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  start = time.time()
  processes = tokenize_processes(processes, len(text_split))
  chunks, num_chars = [], 0
  with tqdm(total=len(text_split), unit="text", desc=f"tokenizing {text_split.name}", leave=False,
            mininterval=2.0, dynamic_ncols=True) as bar:
    for ids, texts, chars in _encoded_batches(text_split, tokenizer, processes, BATCH_CHARS):
      chunks.append(ids)
      num_chars += chars
      bar.update(texts)
  tokens = np.concatenate(chunks) if chunks else np.zeros((0,), np.int32)
  paths.write_with(stem + ".npy", lambda f: np.save(f, tokens))
  paths.write_bytes(stem + ".json", json.dumps({"num_tokens": int(len(tokens)), "num_chars": num_chars}).encode())
  logging.info("tokenized %s: %d chars -> %d tokens in %.1fs (%d processes)", text_split.name, num_chars,
               len(tokens), time.time() - start, processes)


# ----------------------------------------------------------------------------- batching


class Windows:
  """Non-overlapping windows of `seq_len` tokens over a token stream (the tail is dropped).

  `token_chars` (int[V], from `token_char_counts`) gives each window's character count, which
  bits per character needs; windows without it serve training only.
  `frame_id` (data.frame_windows): each window is frame_id, then seq_len - 2 tokens of the stream, then
  frame_id again, as the wrapped data of MDLM and BD3-LM are; the two frame tokens encode no text. A pair
  (open, close) frames as BERT-style encoders read text: [CLS] ... [SEP] (data.frame_open = "bos").
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, split_name: str = "train",
               token_chars: np.ndarray | None = None, frame_id: int | None = None):
    self.stride = seq_len - 2 if frame_id is not None else seq_len
    if frame_id is not None and seq_len < 3:
      raise UserError(f"data.seq_len={seq_len} with data.frame_windows; allowed: 3 or more")
    if len(tokens) < self.stride:
      raise UserError(f"the {split_name} split has {len(tokens)} tokens, fewer than one sequence of "
                      f"data.seq_len={seq_len}; allowed: a smaller seq_len or more text")
    self.tokens = tokens
    self.seq_len = seq_len
    self.token_chars = token_chars
    self.frame_id = frame_id
    self.frame_ids = None if frame_id is None else tuple(frame_id) if isinstance(frame_id, (tuple, list)) else (
        frame_id, frame_id)

  def __len__(self):
    return len(self.tokens) // self.stride

  def rows(self, indices) -> np.ndarray:
    starts = np.asarray(indices, dtype=np.int64) * self.stride
    rows = np.stack([np.asarray(self.tokens[s:s + self.stride], dtype=np.int32) for s in starts])
    if self.frame_ids is not None:
      opening, closing = (np.full((len(rows), 1), i, dtype=np.int32) for i in self.frame_ids)
      rows = np.concatenate([opening, rows, closing], axis=1)
    return rows

  def row_chars(self, rows_NxL: np.ndarray) -> np.ndarray:
    """Characters of text each row of tokens encodes: int64[N]."""
    if self.token_chars is None:
      raise ValueError("these windows were built without token_chars; pass data.token_char_counts(tokenizer)")
    rows_NxL = np.asarray(rows_NxL)
    if self.frame_id is not None:
      rows_NxL = rows_NxL[:, 1:-1]
    return np.asarray(self.token_chars, dtype=np.int64)[rows_NxL].sum(axis=-1)


def train_dataset(windows: Windows, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Step-indexed dataset: item s is this process's rows of global batch s (int32[B/P, L])."""
  if global_batch % process_count:
    raise UserError(f"batch_size={global_batch} is not divisible by the process count {process_count}")
  per_process = global_batch // process_count
  lo = process_index * per_process
  ds = grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat(None).batch(global_batch)
  return ds.map(lambda idx: windows.rows(idx[lo:lo + per_process]))


def make_train_iterator(windows: Windows, global_batch: int, seed: int, process_index: int = 0,
                        process_count: int = 1):
  """A checkpointable grain iterator (get_state/set_state) with background prefetch."""
  ds = train_dataset(windows, global_batch, seed, process_index, process_count)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def eval_window_ids(num_windows: int, batch_size: int, max_batches: int = 0, seed: int = 0) -> np.ndarray:
  """Indices of the windows an evaluation scores, increasing: int64[n].

  Uncapped (max_batches = 0, or a split of at most max_batches * batch_size windows): every window.
  Capped: M = max_batches * batch_size windows, one drawn uniformly from each of M consecutive strata
  of (nearly, +-1 window) equal size, by a numpy generator seeded with `seed`. Windows follow document
  order, so every 1/M-th stretch of the split contributes one window: all documents longer than that
  are represented, where the first M windows would cover the first documents only and a plain random
  subset leaves gaps and clusters by chance (a noisier estimate). The draw depends on nothing but these
  arguments, so every process picks the same windows whatever the process and device counts.
  """
  if max_batches < 0:
    raise UserError(f"evaluation.max_batches={max_batches}; allowed: an integer >= 0 (0: the whole split)")
  cap = max_batches * batch_size
  if not max_batches or num_windows <= cap:
    return np.arange(num_windows, dtype=np.int64)
  edges = np.arange(cap + 1, dtype=np.int64) * num_windows // cap
  return np.random.default_rng(seed).integers(edges[:-1], edges[1:]).astype(np.int64)


class EvalBatch(NamedTuple):
  tokens: np.ndarray  # int32[B, L]; padding rows repeat the first row
  valid: np.ndarray  # bool[B]: False on padding rows
  window_ids: np.ndarray  # int64[B]: the window each row is (-1 on padding rows)
  chars: np.ndarray | None  # int64[B]: characters each row encodes (0 on padding); None without token_chars


def eval_batches(windows: Windows, batch_size: int, max_batches: int = 0, seed: int = 0) -> Iterator[EvalBatch]:
  """Global batches over the windows `eval_window_ids` picks, in increasing order; the last is padded."""
  ids = eval_window_ids(len(windows), batch_size, max_batches, seed)
  for start in range(0, len(ids), batch_size):
    idx = ids[start:start + batch_size]
    rows = windows.rows(idx)
    chars = windows.row_chars(rows) if windows.token_chars is not None else None
    valid = np.ones(batch_size, dtype=bool)
    pad = batch_size - len(idx)
    if pad:
      valid[len(idx):] = False
      rows = np.concatenate([rows, np.repeat(rows[:1], pad, axis=0)])
      idx = np.concatenate([idx, np.full(pad, -1, np.int64)])
      chars = None if chars is None else np.concatenate([chars, np.zeros(pad, np.int64)])
    yield EvalBatch(rows, valid, idx, chars)


# ----------------------------------------------------------------------------- prompt/response pairs


def read_prompt_response(path: str, render=None) -> list[tuple[str, str]]:
  """(prompt, response) pairs of a JSONL file (see read_sft_records)."""
  return [(prompt, response) for prompt, response, _ in read_sft_records(path, render)]


def read_sft_records(path: str, render=None) -> list[tuple[str, str, str]]:
  """(prompt, response, split key) of a JSONL file whose lines are {"prompt": ..., "response": ...}
  pairs or {"messages": [{"role": ..., "content": ...}, ...]} conversations.

  A conversation is rendered by the model's chat template, `render(messages, add_generation_prompt)`
  (chat.render bound to the workdir's template and tokenizer), and gives one pair per assistant turn, as
  the LLaDA paper describes its SFT of a multi-turn dialogue (its code is not published): the prompt is the
  rendered history up to that turn with the generation prompt, the response the rest of the rendering of
  that turn (its end-of-turn token included). The split key is the whole conversation, so its turns land
  in one split together."""
  if not paths.isfile(path):
    raise UserError(f"data.path={path!r}: no such file; allowed: a JSONL file of {{\"prompt\": ..., "
                    "\"response\": ...}} or {\"messages\": [...]} lines (data.source='jsonl')")
  records = []
  for number, line in enumerate(paths.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict) and "messages" in record:
      records.extend(_conversation_pairs(record["messages"], render, f"{path}:{number}"))
      continue
    try:
      prompt, response = record["prompt"], record["response"]
    except (KeyError, TypeError):
      raise UserError(f"{path}:{number}: not a JSON object with string fields prompt and response (or a messages "
                      "list); allowed: one {\"prompt\": ..., \"response\": ...} or {\"messages\": [{\"role\": ..., "
                      "\"content\": ...}, ...]} object per line") from None
    if not isinstance(prompt, str) or not isinstance(response, str):
      raise UserError(f"{path}:{number}: prompt and response must be strings")
    records.append((prompt, response, json.dumps([prompt, response])))
  if not records:
    raise UserError(f"data.path={path!r} holds no prompt/response pairs")
  return records


def _conversation_pairs(messages, render, where: str) -> list[tuple[str, str, str]]:
  if render is None:
    raise UserError(f"{where}: chat messages need the model's chat template; allowed: fine-tune a workdir that "
                    "has one (config.init_from = an instruct model imported with its chat template), or "
                    "prompt/response lines")
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
    raise UserError(f"{where}: messages={str(messages)[:80]!r}; allowed: a non-empty list of "
                    "{\"role\": str, \"content\": str}")
  turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  if not turns or turns[0] == 0:
    raise UserError(f"{where}: a conversation with no assistant turn after a prompt; allowed: messages holding "
                    "at least one {\"role\": \"assistant\"} message after another message")
  key = json.dumps(messages, sort_keys=True)
  pairs = []
  for i in turns:
    prompt = render(messages[:i], True)
    whole = render(messages[:i + 1], False)
    if not whole.startswith(prompt):
      raise UserError(f"{where}: the chat template's rendering of turn {i} does not extend the rendered prompt "
                      "(the template writes history differently once answered); allowed: a template whose "
                      "rendering of a conversation begins with the rendering of its history")
    pairs.append((prompt, whole[len(prompt):], key))
  return pairs


def pair_split(prompt: str, response: str, validation_percent: float, key: str | None = None) -> str:
  """'train' or 'validation' for one pair, by a hash of its text (stable whatever the file order); `key`
  (a conversation's text) replaces the pair's own when given."""
  digest = zlib.crc32((json.dumps([prompt, response]) if key is None else key).encode())
  return "validation" if digest % 10_000 < validation_percent * 100 else "train"


class PromptResponseRows(Windows):
  """One row of seq_len tokens per prompt/response pair: the prompt's tokens stored as their complement
  ~id (negative; objective 'sft' holds them clean and scores the rest), the response, then end-of-text
  padding to seq_len (at least one end-of-text, so an answer has an end). Serves the train iterator and
  eval_batches as Windows do; row_chars counts the characters of the scored part."""

  def __init__(self, rows_NxL: np.ndarray, split_name: str = "train", token_chars: np.ndarray | None = None):
    self.rows_NxL = rows_NxL
    self.seq_len = rows_NxL.shape[1]
    self.token_chars = token_chars
    self.split_name = split_name

  def __len__(self):
    return self.rows_NxL.shape[0]

  def rows(self, indices) -> np.ndarray:
    return self.rows_NxL[np.asarray(indices, dtype=np.int64)]

  def row_chars(self, rows_NxL: np.ndarray) -> np.ndarray:
    if self.token_chars is None:
      raise ValueError("these rows were built without token_chars; pass data.token_char_counts(tokenizer)")
    scored = np.where(rows_NxL < 0, 0, np.asarray(self.token_chars, dtype=np.int64)[np.maximum(rows_NxL, 0)])
    return scored.sum(axis=-1)


def prompt_response_rows(data_config, split: str, tokenizer, token_chars=None, render=None) -> PromptResponseRows:
  """The split's pairs of data.path as rows of data.seq_len tokens (see PromptResponseRows); `render`
  renders chat messages (see read_sft_records)."""
  if split not in ("train", "validation"):
    raise UserError(f"split {split!r} of prompt/response pairs; allowed: train, validation")
  seq_len = data_config.seq_len
  # data.frame_open = "bos" (configs/encoder_sft.py): the prompt is a BERT first segment, [CLS] prompt [SEP].
  framed = data_config.get("frame_open", "") == "bos"
  if framed and getattr(tokenizer, "bos_id", None) is None:
    raise UserError("data.frame_open='bos' with a tokenizer that has none of [CLS], <s>, <bos>; allowed: '' or an "
                    "hf tokenizer with one of them")
  rows = []
  for prompt, response, key in read_sft_records(data_config.path, render):
    if pair_split(prompt, response, data_config.validation_percent, key) != split:
      continue
    prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response)
    if framed:
      prompt_ids = [tokenizer.bos_id] + prompt_ids + [tokenizer.eos_id]
    length = len(prompt_ids) + len(response_ids)
    if length >= seq_len:
      raise UserError(f"a prompt/response pair of {length} tokens leaves no room for the end-of-text in "
                      f"data.seq_len={seq_len} (prompt {prompt[:40]!r}); allowed: pairs shorter than seq_len")
    rows.append([~i for i in prompt_ids] + response_ids + [tokenizer.eos_id] * (seq_len - length))
  if not rows:
    raise UserError(f"data.path={data_config.path!r} gives an empty {split} split "
                    f"(data.validation_percent={data_config.validation_percent}); allowed: more pairs")
  return PromptResponseRows(np.asarray(rows, dtype=np.int32), split, token_chars)
