"""The shared reader/writer of Hugging Face folders: config.json, safetensors (one file or shards with an
index), tokenizer files, and the workdir a converted model becomes. Family modules (convert/<family>.py)
only map names and shapes; whatever a folder holds besides the tensors is read and written here.

Safetensors are read and written with the `safetensors` package's numpy API (bfloat16 tensors through
its flax reader); torch is never imported.
"""

import importlib.util
import json
import os

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


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's checkpoint as float32 numpy arrays (bfloat16/float16 widened)."""
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
  tensors = {}
  for name in files:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise UserError(f"{path!r} is listed by model.safetensors.index.json but missing; allowed: the complete folder")
    try:
      tensors.update(_read_safetensors_file(path))
    except (UserError, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own SafetensorError, OSError...)
      raise UserError(f"{path!r} does not read as safetensors ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                      "allowed: an intact file (a truncated or interrupted download: fetch it again)") from None
  return tensors


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  tensors = {}
  with safe_open(path, framework="np") as f:
    for key in f.keys():
      if f.get_slice(key).get_dtype() == "BF16":  # numpy has no bfloat16: read through jax
        with safe_open(path, framework="flax") as g:
          tensors[key] = np.asarray(g.get_tensor(key).astype(jnp.float32))
      else:
        tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
  return tensors


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


def check_tree(params, model: Transformer, seq_len: int) -> None:
  """The built tree must be exactly the one the network initialises (names and shapes)."""
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32),
                                               jnp.zeros((1,), jnp.float32)))["params"]
  expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, expected,
                   is_leaf=lambda x: hasattr(x, "unbox")))}
  got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  if expected != got:
    missing = sorted(set(expected) - set(got))[:3]
    extra = sorted(set(got) - set(expected))[:3]
    shapes = [(k, got[k], expected[k]) for k in sorted(set(got) & set(expected)) if got[k] != expected[k]][:3]
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


def write_workdir(workdir: str, model_fields: dict, objective: str, tokenizer, params, seq_len: int,
                  data: dict | None = None, sampling: dict | None = None) -> str:
  """A workdir holding `params` (numpy tree) as the step-0 checkpoint of a config built from
  configs/default.py with `model_fields`, `objective`, `data` (config.data fields, e.g. an encoder's
  framing) and `sampling` (config.sampling defaults, generation_config.py); returns the checkpoint directory."""
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
  check_tree(params, model, config.data.seq_len)
  tx, _ = experiment.make_optimizer(config)
  params = jax.tree.map(jnp.asarray, params)
  state = experiment.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                                opt_state=tx.init(params))
  paths.makedirs(workdir)
  tokenizers.save_tokenizer(tokenizer, experiment.tokenizer_dir(workdir))
  config_dict = {**experiment.config_to_dict(config), "vocab_size": tokenizer.vocab_size}
  paths.write_bytes(paths.join(workdir, "config.json"), json.dumps(config_dict, indent=2).encode())
  manager = checkpointing.make_manager(workdir)
  try:
    checkpointing.save(manager, 0, state, {}, config_dict, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  return checkpointing.checkpoint_dir(workdir)


# ----------------------------------------------------------------------------- writing a folder


def write_safetensors(tensors: dict, folder: str) -> list[str]:
  """model.safetensors, or shards of at most SHARD_BYTES with model.safetensors.index.json."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    if current and size + tensors[name].nbytes > SHARD_BYTES:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += tensors[name].nbytes
  shards.append(current)
  if len(shards) == 1:
    paths.write_bytes(paths.join(folder, "model.safetensors"), save(shards[0], metadata={"format": "pt"}))
    return ["model.safetensors"]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards):
    paths.write_bytes(paths.join(folder, name), save(shard, metadata={"format": "pt"}))
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
           "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
  paths.write_bytes(paths.join(folder, "model.safetensors.index.json"), json.dumps(index, indent=2).encode())
  return names + ["model.safetensors.index.json"]


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
