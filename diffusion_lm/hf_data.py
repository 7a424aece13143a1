"""Hugging Face datasets as a text source (data.source='hf'): one document per row.

`data.hf_name` names either
* a local copy, read with pyarrow (no `datasets` package needed):
  - a `save_to_disk` folder: a DatasetDict (dataset_dict.json, one folder per split) or a single
    Dataset (state.json; its split is called 'train');
  - parquet or JSON-lines files (one file, or a folder searched recursively): a file named SPLIT-...
    or SPLIT.... or lying under a SPLIT/ folder belongs to that split (the Hub's own layout); when no
    file is named after any split, all of them form 'train';
* or a dataset on the Hugging Face Hub (e.g. 'Skylion007/openwebtext', with `data.hf_config`), loaded
  with `datasets.load_dataset` (pip install datasets; it downloads into its own cache on first use).

A split may carry a row range in the Hub's syntax, with integers: 'train[:-100000]' (all but the
last 100,000 rows), 'train[-100000:]', 'test[:5000]'. Rows keep their order.
"""

import hashlib
import json
import os
import re

from diffusion_lm import paths
from diffusion_lm.errors import UserError

TABLE_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")
_SPLIT = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[(-?\d*):(-?\d*)\])?$")


def parse_split(spec: str) -> tuple[str, int | None, int | None]:
  """'train[:-100000]' -> ('train', None, -100000); UserError on anything else."""
  match = _SPLIT.match(str(spec).strip())
  if not match:
    raise UserError(f"split {spec!r}; allowed: a split name with an optional integer row range, e.g. train, "
                    "train[:-100000], test[:5000]")
  name, start, stop = match.groups()
  return name, int(start) if start else None, int(stop) if stop else None


class Rows:
  """Random access to one text column: rows[i] -> {key: text}."""

  def __init__(self, columns, key: str):
    self.columns = columns  # pyarrow ChunkedArrays / Arrays / lists, in order
    self.key = key
    self.offsets = [0]
    for column in columns:
      self.offsets.append(self.offsets[-1] + len(column))

  def __len__(self):
    return self.offsets[-1]

  def __getitem__(self, i: int) -> dict:
    import bisect  # pylint: disable=g-import-not-at-top
    if not 0 <= i < len(self):
      raise IndexError(i)
    part = bisect.bisect_right(self.offsets, i) - 1
    value = self.columns[part][i - self.offsets[part]]
    return {self.key: value if isinstance(value, str) else value.as_py()}


def _column(table, key: str, where: str):
  if key not in table.column_names:
    raise UserError(f"{where} has no column data.text_key={key!r}; allowed: one of {', '.join(table.column_names)}")
  return table.column(key)


def _read_file(path: str, key: str):
  """The text column of one parquet / JSON-lines / Arrow file."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    schema = pq.read_schema(paths.path(path).open("rb")) if paths.is_uri(path) else pq.read_schema(path)
    if key not in schema.names:
      raise UserError(f"{path} has no column data.text_key={key!r}; allowed: one of {', '.join(schema.names)}")
    source = pa.BufferReader(paths.read_bytes(path)) if paths.is_uri(path) else path
    return pq.read_table(source, columns=[key]).column(key)
  if path.endswith(".arrow"):  # the Arrow IPC stream files of save_to_disk, memory-mapped when local
    source = pa.BufferReader(paths.read_bytes(path)) if paths.is_uri(path) else pa.memory_map(path)
    return _column(pa.ipc.open_stream(source).read_all(), key, path)
  texts = []
  for n, line in enumerate(paths.read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path} line {n} is not JSON ({e.msg}); allowed: one JSON object per line") from None
    if not isinstance(row, dict) or key not in row:
      raise UserError(f"{path} line {n} has no key data.text_key={key!r}; allowed: one object per line with it")
    texts.append(str(row[key]))
  return texts


def _saved_split_files(folder: str, split: str, name: str) -> list[str]:
  """The arrow files of `split` in a save_to_disk folder."""
  if paths.exists(paths.join(folder, "dataset_dict.json")):
    splits = json.loads(paths.read_bytes(paths.join(folder, "dataset_dict.json")))["splits"]
    if split not in splits:
      raise UserError(f"data.hf_name={name!r} has no split {split!r}; allowed: {', '.join(splits)}")
    folder = paths.join(folder, split)
  elif split != "train":
    raise UserError(f"data.hf_name={name!r} is one saved Dataset, split 'train'; allowed split: train")
  state = json.loads(paths.read_bytes(paths.join(folder, "state.json")))
  return [paths.join(folder, f["filename"]) for f in state["_data_files"]]


def _split_of(relative: str, splits: set[str]) -> str | None:
  parts = relative.replace(os.sep, "/").split("/")
  for folder in parts[:-1]:
    if folder in splits:
      return folder
  stem = parts[-1]
  return next((s for s in splits if stem.startswith((s + "-", s + "."))), None)


def _table_split_files(root: str, split: str, name: str) -> list[str]:
  files = [root] if paths.isfile(root) else sorted(
      f for f in paths.files_under(root) if f.endswith(TABLE_SUFFIXES))
  if not files:
    raise UserError(f"data.hf_name={name!r} holds no dataset files; allowed: a save_to_disk folder or "
                    f"{', '.join(TABLE_SUFFIXES)} files")
  known = {"train", "validation", "test", split}
  named = {f: _split_of(os.path.relpath(f, root) if f != root else os.path.basename(f), known) for f in files}
  if not any(named.values()):  # no file is named after a split: all of them are 'train'
    named = {f: "train" for f in files}
  chosen = [f for f in files if named[f] == split]
  if not chosen:
    found = sorted({s for s in named.values() if s})
    raise UserError(f"data.hf_name={name!r} has no split {split!r}; allowed: {', '.join(found)}")
  return chosen


def _hub_split(data_config, spec: str):
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"data.hf_name={data_config.hf_name!r} is not a local folder or file, so it is loaded from the "
                    "Hugging Face Hub, which needs the datasets package; allowed: pip install datasets, or a "
                    "local save_to_disk folder / parquet / JSON-lines files") from None
  dataset = datasets.load_dataset(data_config.hf_name, data_config.get("hf_config") or None, split=spec)
  if data_config.text_key not in dataset.column_names:
    raise UserError(f"data.hf_name={data_config.hf_name!r} has no column data.text_key={data_config.text_key!r}; "
                    f"allowed: one of {', '.join(dataset.column_names)}")
  return dataset, getattr(dataset, "_fingerprint", "")


def load_split(data_config, spec: str):
  """(random-access rows, first row, end row, fingerprint) of one split of data.hf_name."""
  name, key = data_config.hf_name, data_config.text_key
  if not name:
    raise UserError("data.source='hf' needs data.hf_name; allowed: a Hub dataset name (e.g. Skylion007/openwebtext) "
                    "or a local save_to_disk folder / parquet / JSON-lines files")
  split, start, stop = parse_split(spec)
  if paths.exists(name):
    root = paths.resolve(name)
    saved = paths.isdir(root) and (paths.exists(paths.join(root, "dataset_dict.json"))
                                   or paths.exists(paths.join(root, "state.json")))
    files = _saved_split_files(root, split, name) if saved else _table_split_files(root, split, name)
    rows = Rows([_read_file(f, key) for f in files], key)
    stamp = json.dumps([[f, paths.size(f), paths.mtime(f)] for f in files] + [key])
  else:
    rows, hub_fingerprint = _hub_split(data_config, split)
    stamp = json.dumps([name, data_config.get("hf_config", ""), split, hub_fingerprint, key])
  n = len(rows)
  lo, hi, _ = slice(start, stop).indices(n)
  if hi <= lo:
    raise UserError(f"split {spec!r} of data.hf_name={name!r} selects no rows (the split has {n}); allowed: a "
                    "range inside it")
  fingerprint = hashlib.sha256(f"{stamp}:{lo}:{hi}".encode()).hexdigest()[:12]
  return rows, lo, hi, fingerprint
