"""The shared reader/writer of Hugging Face folders: config.json, safetensors (one file or shards with an
index), tokenizer files, and the workdir a converted model becomes. Family modules (convert/<family>.py)
only map names and shapes; whatever a folder holds besides the tensors is read and written here.

Safetensors are read and written with the `safetensors` package's numpy API (bfloat16 tensors through
its flax reader); torch is never imported.
"""

from collections.abc import Mapping
import importlib.util
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_lm import chat, checkpointing, experiment, generation_config, paths, tokenizers
from diffusion_lm.errors import CONFIGS_DIR, UserError
from diffusion_lm.model import Transformer

SECTION = "diffusion_lm"  # config.json key of an exported model's own configuration
SHARD_BYTES = 4 << 30  # exported safetensors files hold at most this many bytes each
CHAR_VOCABULARY = "char_vocabulary.json"  # an exported character-level tokenizer (this project's own format)


# ----------------------------------------------------------------------------- reading a folder


def read_hf_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"--from_hf={folder!r} has no config.json; allowed: a local Hugging Face checkpoint folder "
                    "(config.json, *.safetensors, tokenizer.json)")
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, unreadable
    raise UserError(f"{path!r} does not read as JSON ({' '.join(str(e).split())}); allowed: the config.json of a "
                    "Hugging Face checkpoint") from None
  if not isinstance(hf, dict):
    raise UserError(f"{path!r} holds a {type(hf).__name__}, not an object; allowed: the config.json of a Hugging "
                    "Face checkpoint")
  return hf


def safetensors_files(folder: str) -> list[str]:
  """The paths of the folder's safetensors: model.safetensors, or the shards its index lists."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
      raise UserError(f"{index!r} does not read as a safetensors index ({type(e).__name__}: {e}); allowed: a JSON "
                      "object whose weight_map maps tensor names to shard files") from None
  elif os.path.isfile(os.path.join(folder, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
  if not files:
    raise UserError(f"--from_hf={folder!r} holds no *.safetensors; allowed: a folder with model.safetensors or "
                    "shards listed by model.safetensors.index.json (convert .bin checkpoints with transformers)")
  for name in files:
    if not os.path.isfile(os.path.join(folder, name)):
      raise UserError(f"{os.path.join(folder, name)!r} is listed by model.safetensors.index.json but missing; "
                      "allowed: the complete folder")
  return [os.path.join(folder, name) for name in files]


def _unreadable(path: str, error: Exception) -> UserError:
  return UserError(f"{path!r} does not read as safetensors ({type(error).__name__}: "
                   f"{' '.join(str(error).split())[:160]}); allowed: an intact file (a truncated or interrupted "
                   "download: fetch it again)")


class Tensors(Mapping):
  """The tensors of a folder's safetensors by name, each read from its file (float32; bfloat16/float16
  widened) when asked for and not kept: an import holds one tensor at a time, not the checkpoint.
  `renamed` gives a view under other names (a family whose names differ from the layout it maps through)."""

  def __init__(self, where: dict[str, str], names: dict[str, str] | None = None):
    self._where = where  # stored name -> file
    self._names = names if names is not None else {name: name for name in where}  # name -> stored name

  @classmethod
  def of_folder(cls, folder: str) -> "Tensors":
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    where = {}
    for path in safetensors_files(folder):
      try:
        with safe_open(path, framework="np") as f:
          where.update({key: path for key in f.keys()})
      except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError...)
        raise _unreadable(path, e) from None
    return cls(where)

  def renamed(self, names: dict[str, str]) -> "Tensors":
    """A view whose name k is this mapping's names[k]."""
    return Tensors(self._where, {new: self._names[old] for new, old in names.items()})

  def without(self, name: str) -> "Tensors":
    return Tensors(self._where, {k: v for k, v in self._names.items() if k != name})

  def __getitem__(self, name: str) -> np.ndarray:
    stored = self._names[name]
    path = self._where[stored]
    try:
      return read_tensor(path, stored)
    except (UserError, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(path, e) from None

  def __contains__(self, name) -> bool:  # without reading the tensor
    return name in self._names

  def __iter__(self):
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)


def read_tensor(path: str, key: str) -> np.ndarray:
  """One tensor of a safetensors file as float32 (numpy has no bfloat16: those are read through jax)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework="np") as f:
    if f.get_slice(key).get_dtype() != "BF16":
      return np.asarray(f.get_tensor(key), dtype=np.float32)
  with safe_open(path, framework="flax") as g:
    return np.asarray(g.get_tensor(key)).astype(np.float32)


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's checkpoint as float32 numpy arrays (bfloat16/float16 widened); for
  small checkpoints and tests (an import reads them one at a time through `Tensors`)."""
  tensors = Tensors.of_folder(folder)
  return {name: tensors[name] for name in tensors}


def require(hf: dict, key: str, allowed, what: str) -> None:
  """A config.json setting the importer does not map is refused by name (missing: the first allowed)."""
  if hf.get(key, allowed[0]) not in allowed:
    raise UserError(f"config.json {key}={hf.get(key)!r}: {what}; allowed: {', '.join(map(repr, allowed))}")


def getter(tensors: dict):
  """get(name) -> float32 array, or a one-line error naming the missing tensor."""
  def get(name):
    if name not in tensors:
      raise UserError(f"checkpoint tensor {name!r} is missing; allowed: a complete checkpoint of its family")
    return np.asarray(tensors[name], np.float32)
  return get


def pad_rows(table_VxD: np.ndarray, rows: int, mask_row: int | None) -> np.ndarray:
  """The table with `rows` rows: its own first, then zeros; row `mask_row` (a [MASK] outside the
  checkpoint's vocabulary) starts as the mean of its rows, a neutral point to fine-tune from.
  A 1-D table (a logit bias) is padded the same way."""
  if table_VxD.shape[0] > rows:
    raise UserError(f"a table of {table_VxD.shape[0]} rows exceeds the model's {rows}")
  out = np.zeros((rows,) + table_VxD.shape[1:], np.float32)
  out[:table_VxD.shape[0]] = table_VxD
  if mask_row is not None and mask_row >= table_VxD.shape[0]:
    out[mask_row] = table_VxD.mean(axis=0)
  return out


def hf_tokenizer(folder: str, vocab_size: int, eos_id, mask_id: int):
  """The folder's tokenizer.json as an hf tokenizer with the checkpoint's ids; a folder exported from
  here may hold this project's SentencePiece model (tokenizer.model) or character vocabulary instead."""
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.isfile(path):
    own = None
    if os.path.isfile(os.path.join(folder, CHAR_VOCABULARY)):
      with open(os.path.join(folder, CHAR_VOCABULARY)) as f:
        own = tokenizers.CharTokenizer(list(json.load(f)["chars"]))
    elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
      own = tokenizers.load_tokenizer(folder)
    if own is None or own.vocab_size != vocab_size:
      raise UserError(f"--from_hf={folder!r} has no tokenizer.json; allowed: a folder with the Hugging Face "
                      "tokenizer (tokenizer.json)")
    return own
  with open(path, "rb") as f:
    raw = f.read()
  plain = tokenizers.HFTokenizer(raw)
  eos_token = plain.tok.id_to_token(int(eos_id)) if eos_id is not None else ""
  mask_token = plain.tok.id_to_token(int(mask_id)) if mask_id is not None and mask_id >= 0 else ""
  if mask_id is not None and mask_id >= 0 and not mask_token:
    raise UserError(f"config.json mask_token_id={mask_id} has no token in tokenizer.json; allowed: the "
                    "checkpoint's own tokenizer")
  tokenizer = tokenizers.HFTokenizer(raw, eos_token or "", mask_token, vocab_size)
  if tokenizer.vocab_size != vocab_size:
    raise UserError(f"tokenizer.json has ids up to {tokenizer.vocab_size - 1}, beyond the model's {vocab_size} "
                    "embedding rows; allowed: the checkpoint's own tokenizer")
  return tokenizer


def token_id(folder: str, *candidates: str) -> int | None:
  """The id of the first of `candidates` in the folder's tokenizer.json (None without one or the file)."""
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.isfile(path):
    return None
  with open(path, "rb") as f:
    vocab = tokenizers.HFTokenizer(f.read()).tok.get_vocab(with_added_tokens=True)
  return next((vocab[c] for c in candidates if c in vocab), None)


# ----------------------------------------------------------------------------- workdirs


def expected_shapes(model: Transformer, seq_len: int) -> dict[str, tuple]:
  """{key path: shape} of the tree the network initialises (computed abstractly: nothing allocated)."""
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32),
                                               jnp.zeros((1,), jnp.float32)))["params"]
  return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, expected,
                   is_leaf=lambda x: hasattr(x, "unbox")))}


def shapes_of(tree) -> dict[str, tuple]:
  return {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def check_shapes(got: dict, expected: dict, complete: bool = True) -> None:
  """The built tree must be exactly the one the network initialises (names and shapes); with
  complete=False, `got` may be a part of it."""
  missing = sorted(set(expected) - set(got))[:3] if complete else []
  extra = sorted(set(got) - set(expected))[:3]
  shapes = [(k, got[k], expected[k]) for k in sorted(set(got) & set(expected)) if got[k] != expected[k]][:3]
  if missing or extra or shapes:
    raise UserError(f"converted parameters do not match the model that config.json describes: missing {missing}, "
                    f"extra {extra}, shapes (name, got, expected) {shapes}; allowed: the config.json that came with "
                    "these safetensors")


def _default_config():
  """configs/default.py's config (every field), which the workdir's config starts from."""
  path = os.path.join(CONFIGS_DIR, "default.py")
  spec = importlib.util.spec_from_file_location("_diffusion_lm_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}


def write_workdir(workdir: str, model_fields: dict, objective: str, tokenizer, params, seq_len: int,
                  data: dict | None = None, sampling: dict | None = None, dtype: str = "float32") -> dict:
  """A workdir whose step-0 checkpoint holds the parameters only (no optimizer state, no EMA copy: training
  creates those on its devices), of a config built from configs/default.py with `model_fields`,
  `objective`, `data` (config.data fields, e.g. an encoder's framing) and `sampling` (config.sampling
  defaults, generation_config.py).

  params: a tree of numpy arrays, or (top-level name, make) parts, each made, stored in `dtype` and
  dropped before the next: host memory holds one part (a block, or one table) at a time. The checkpoint
  is written in a staging folder and moved into place whole. Returns {"parameters": count, "dtype": dtype}.
  """
  if dtype not in DTYPES:
    raise UserError(f"--dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
  if checkpointing.read_saved_config(workdir)[0] is not None:
    raise UserError(f"--workdir={workdir!r} already holds a checkpoint; allowed: a new or empty workdir")
  config = _default_config()
  config.objective = objective
  # The objective sets the attention structure (causal, decode_window); the tokenizer the vocabulary.
  fields = {k: v for k, v in model_fields.items() if k not in ("vocab_size", "causal", "decode_window")}
  for key, value in fields.items():
    config.model[key] = value
  for key, value in (data or {}).items():
    config.data[key] = value
  config.tokenizer.kind = tokenizer.kind
  config.data.seq_len = min(seq_len, fields["max_len"])
  config.evaluation.batch_size = config.training.batch_size = 8
  generation_config.apply_defaults(config, sampling or {})
  experiment.check_config(config)
  model = Transformer(experiment.model_config(config, tokenizer.vocab_size))
  expected = expected_shapes(model, config.data.seq_len)
  parts = list(params.items()) if isinstance(params, dict) else params
  parts = [(name, (lambda value=make: value) if isinstance(params, dict) else make) for name, make in parts]
  config_dict = {**experiment.config_to_dict(config), "vocab_size": tokenizer.vocab_size}
  paths.makedirs(workdir)
  got = {}
  try:
    checkpointing.write_params(workdir, _stored(parts, expected, DTYPES[dtype], got), config_dict)
    check_shapes(got, expected)  # nothing missing (each part was checked as it came)
  except BaseException:
    checkpointing.discard_staged_params(workdir)  # a refused import leaves no half-written step behind
    raise
  checkpointing.commit_params(workdir)
  tokenizers.save_tokenizer(tokenizer, experiment.tokenizer_dir(workdir))
  paths.write_bytes(paths.join(workdir, "config.json"), json.dumps(config_dict, indent=2).encode())
  return {"parameters": int(sum(np.prod(shape) for shape in got.values())), "dtype": dtype}


def _stored(parts, expected: dict, dtype, got: dict):
  """(name, subtree) of each part as stored: checked against the network's tree, cast to `dtype`; `got`
  collects the shapes."""
  for name, make in parts:
    part = {name: make()}
    shapes = shapes_of(part)
    check_shapes(shapes, expected, complete=False)
    got.update(shapes)
    yield name, jax.tree.map(lambda a: np.asarray(a).astype(dtype, copy=False), part[name])
    del part


# ----------------------------------------------------------------------------- writing a folder


def write_safetensors(tensors, folder: str) -> list[str]:
  """model.safetensors, or shards of at most SHARD_BYTES with model.safetensors.index.json, of `tensors`
  ((name, array) pairs, or a dict), float32, written as they come: each tensor's bytes go to the open
  shard's data file and the array is dropped, so host memory holds one tensor (plus the part it came
  from), never a shard. A shard's file is its header followed by that data (copied in blocks)."""
  shards = []  # [(data file, {name: (shape, begin, end)})]
  size = 0
  data = None
  scratch = tempfile.mkdtemp(prefix="diffusion_lm-export-") if paths.is_uri(folder) else folder
  try:
    for name, array in (tensors.items() if isinstance(tensors, dict) else tensors):
      array = np.ascontiguousarray(np.asarray(array, np.float32))
      if data is None or (shards[-1][1] and size + array.nbytes > SHARD_BYTES):
        if data is not None:
          data.close()
        path = os.path.join(scratch, f".shard-{len(shards)}.data")
        os.makedirs(scratch, exist_ok=True)
        data = open(path, "wb")
        shards.append((path, {}))
        size = 0
      shards[-1][1][name] = (array.shape, size, size + array.nbytes)
      data.write(memoryview(array).cast("B"))
      size += array.nbytes
      del array
    if data is not None:
      data.close()
    if len(shards) == 1:
      names = ["model.safetensors"]
    else:
      names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, (path, entries) in zip(names, shards):
      paths.write_with(paths.join(folder, name), lambda f, path=path, entries=entries: _write_shard(f, path, entries))
  finally:
    for path, _ in shards:
      if os.path.exists(path):
        os.remove(path)
    if scratch != folder:
      shutil.rmtree(scratch, ignore_errors=True)
  if len(shards) == 1:
    return names
  index = {"metadata": {"total_size": int(sum(end - begin for _, entries in shards
                                              for _, begin, end in entries.values()))},
           "weight_map": {t: name for name, (_, entries) in zip(names, shards) for t in entries}}
  paths.write_bytes(paths.join(folder, "model.safetensors.index.json"), json.dumps(index, indent=2).encode())
  return names + ["model.safetensors.index.json"]


def _write_shard(f, data_path: str, entries: dict) -> None:
  """A safetensors file: 8-byte little-endian header length, the JSON header (padded with spaces to a
  multiple of 8, as the safetensors package writes it), then the data."""
  header = {"__metadata__": {"format": "pt"}}
  header.update({name: {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}
                 for name, (shape, begin, end) in entries.items()})
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  f.write(len(raw).to_bytes(8, "little"))
  f.write(raw)
  with open(data_path, "rb") as data:
    shutil.copyfileobj(data, f, 64 << 20)


def write_tokenizer(tokenizer, folder: str, rows: int, chat_template: str = "") -> list[str]:
  """The workdir's tokenizer in the folder: tokenizer.json + tokenizer_config.json (hf, with the chat
  template when the workdir has one), tokenizer.model (SentencePiece) or this project's character vocabulary."""
  if tokenizer.kind == "hf":
    paths.write_bytes(paths.join(folder, "tokenizer.json"), tokenizer.tokenizer_json)
    settings = {"eos_token": tokenizer.eos_token}
    if tokenizer.mask_id < rows and tokenizer.mask_token:
      settings["mask_token"] = tokenizer.mask_token
    if chat_template:
      settings["chat_template"] = chat_template
    paths.write_bytes(paths.join(folder, "tokenizer_config.json"), json.dumps(settings).encode())
    return ["tokenizer.json", "tokenizer_config.json"]
  if tokenizer.kind == "sentencepiece":
    paths.write_bytes(paths.join(folder, "tokenizer.model"), tokenizer.model_proto)
    return ["tokenizer.model"]
  paths.write_bytes(paths.join(folder, CHAR_VOCABULARY), tokenizer.to_json())
  return [CHAR_VOCABULARY]


def write_folder(folder: str, tensors: dict, hf_config: dict, tokenizer, rows: int, sampling=None,
                 chat_template: str = "") -> list[str]:
  """A Hugging Face folder: the tensors (sharded above SHARD_BYTES), config.json, generation_config.json
  (the workdir's sampler defaults, when given) and the tokenizer with its chat template; returns the files
  written. Files a folder holds besides these are added here."""
  if paths.exists(paths.join(folder, "config.json")):
    raise UserError(f"--to_hf={folder!r} already holds a config.json; allowed: a new or empty folder")
  written = write_safetensors(tensors, folder)
  paths.write_bytes(paths.join(folder, "config.json"), json.dumps(hf_config, indent=2).encode())
  written.append("config.json")
  if sampling is not None:
    written.append(generation_config.write(folder, sampling, tokenizer.mask_id))
  return written + write_tokenizer(tokenizer, folder, rows, chat_template)


def read_workdir_template(workdir: str) -> str:
  return chat.load_template(experiment.tokenizer_dir(workdir))


def copy_template(folder: str, workdir: str) -> None:
  chat.save_template(experiment.tokenizer_dir(workdir), chat.read_template(folder))
