"""Hugging Face checkpoint folders in and out: a local folder <-> an ordinary workdir.

  python -m diffusion_lm.convert --from_hf=path/to/LLaDA-8B-Base --workdir=runs/llada [--max_len=4096]
  python -m diffusion_lm.convert --to_hf=exported/ --workdir=runs/demo

Import reads config.json, the safetensors (one file, or shards listed by model.safetensors.index.json)
and tokenizer.json of a folder the user has (nothing is downloaded), and writes a workdir (orbax
checkpoint at step 0, config, tokenizer) that sample, evaluate, bench and fine-tuning
(`--config.init_from=WORKDIR`) open like any trained one. Families, told apart by config.json:

  llama  LlamaForCausalLM: RMSNorm, RoPE (theta; linear or llama3 scaling), SwiGLU, grouped-query
         attention, tied or untied head. Imported as an autoregressive model (objective ar).
  qwen2  Qwen2ForCausalLM: llama plus q/k/v biases (objective ar).
  gpt2   GPT2LMHeadModel: learned positions, LayerNorm with biases, GELU, tied head (objective ar).
  llada  LLaDA (model_type llada): the llama network under its own parameter names, bidirectional, a
         [MASK] token inside the vocabulary (objective diffusion).
  dream  Dream (model_type Dream): Qwen2 weights, bidirectional, the output at i predicting token i + 1
         (model.shift_logits), its own [MASK] id (objective diffusion).

Export writes model.safetensors (+ an index when sharded) and config.json in the LLaMA layout
(Qwen2's where the model has q/k/v biases) with the tokenizer, so other tools load what was trained
here. config.json carries a "diffusion_lm" section with the full model configuration: a bidirectional
model needs a bidirectional mask elsewhere, and importing the folder back restores the workdir's model
exactly (every table row included, so export -> import is the identity on the parameters).
Safetensors are read and written with the `safetensors` package's numpy API (bfloat16 tensors through
its flax reader); torch is never imported.
"""

import importlib.util
import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_lm import checkpointing, experiment, paths, tokenizers
from diffusion_lm.errors import CONFIGS_DIR, UserError, cli_main, parse_flags
from diffusion_lm.model import ModelConfig, Transformer

FAMILIES = ("llama", "qwen2", "gpt2", "llada", "dream")
SECTION = "diffusion_lm"  # config.json key of an exported model's own configuration
SHARD_BYTES = 4 << 30  # exported safetensors files hold at most this many bytes each
CHAR_VOCABULARY = "char_vocabulary.json"  # an exported character-level tokenizer (this project's own format)

# LLaDA's parameter names (modeling_llada.py, LLaDALlamaBlock) -> the LLaMA layout's.
_LLADA_TOP = {"model.transformer.wte.weight": "model.embed_tokens.weight",
              "model.transformer.ln_f.weight": "model.norm.weight",
              "model.transformer.ff_out.weight": "lm_head.weight"}
_LLADA_BLOCK = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                "attn_out": "self_attn.o_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
                "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}


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


def family_of(hf: dict) -> str:
  """The family of a config.json (see the module docstring)."""
  model_type = str(hf.get("model_type", "")).lower()
  architectures = " ".join(hf.get("architectures") or [])
  if model_type == "llada" or "LLaDA" in architectures:
    return "llada"
  if model_type == "dream" or "Dream" in architectures:
    return "dream"
  if model_type in ("llama", "qwen2", "gpt2"):
    return model_type
  raise UserError(f"config.json model_type={hf.get('model_type')!r}; allowed: {', '.join(FAMILIES)} "
                  "(LLaMA-style, Qwen2-style, GPT-2, LLaDA, Dream)")


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


def _rope_settings(hf: dict) -> dict:
  """ModelConfig rope fields from either config.json layout (rope_theta + rope_scaling, or transformers'
  newer rope_parameters)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  if not scaling and params.get("rope_type", "default") != "default":
    scaling = params
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  fields = {"rope_base": float(theta)}
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if kind == "default":
    return fields
  if kind not in ("linear", "llama3"):
    raise UserError(f"config.json rope scaling {kind!r}; allowed: default, linear, llama3")
  fields.update(rope_scaling=kind, rope_scaling_factor=float(scaling["factor"]))
  if kind == "llama3":
    fields.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                  rope_high_freq_factor=float(scaling["high_freq_factor"]),
                  rope_original_max_len=int(scaling["original_max_position_embeddings"]))
  return fields


def _require(hf: dict, key: str, allowed, what: str) -> None:
  if hf.get(key, allowed[0]) not in allowed:
    raise UserError(f"config.json {key}={hf.get(key)!r}: {what}; allowed: {', '.join(map(repr, allowed))}")


def model_settings(hf: dict, family: str) -> tuple[dict, str, dict]:
  """(ModelConfig fields with vocab_size, objective, {"eos_id", "mask_id"}) of a config.json."""
  if SECTION in hf:  # exported here: the model exactly as it was
    section = dict(hf[SECTION])
    # Instruction tuning is a way of training a masked diffusion model, on data the folder does not hold.
    objective = "diffusion" if section["objective"] == "sft" else section["objective"]
    return section["model"], objective, {"eos_id": hf.get("eos_token_id"),
                                                    "mask_id": section["model"].get("mask_token_id", -1)}
  if family == "llada":
    for key, allowed in (("include_bias", (False,)), ("input_emb_norm", (False,)), ("scale_logits", (False,)),
                         ("alibi", (False,)), ("block_type", ("llama",)), ("layer_norm_type", ("rms",)),
                         ("activation_type", ("silu", "swiglu"))):
      _require(hf, key, allowed, "not the LLaMA-style block this importer reads")
    heads = int(hf["n_heads"])
    fields = dict(d_model=int(hf["d_model"]), num_layers=int(hf["n_layers"]), num_heads=heads,
                  num_kv_heads=int(hf.get("n_kv_heads") or heads), mlp_dim=int(hf["mlp_hidden_size"]),
                  max_len=int(hf.get("max_sequence_length", 4096)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                  rope_base=float(hf.get("rope_theta", 10000.0)), qkv_bias=bool(hf.get("include_qkv_bias", False)),
                  tie_embeddings=bool(hf.get("weight_tying", False)),
                  vocab_size=int(hf.get("embedding_size") or hf["vocab_size"]), causal=False,
                  mask_token_id=int(hf["mask_token_id"]))
    objective = "diffusion"
  elif family == "gpt2":
    for key, allowed, what in (("scale_attn_by_inverse_layer_idx", (False,), "per-layer attention scaling"),
                               ("reorder_and_upcast_attn", (False,), "reordered attention"),
                               ("scale_attn_weights", (True,), "unscaled attention"),
                               ("activation_function", ("gelu_new", "gelu", "gelu_pytorch_tanh"), "activation")):
      _require(hf, key, allowed, what)
    d_model = int(hf["n_embd"])
    fields = dict(d_model=d_model, num_layers=int(hf["n_layer"]), num_heads=int(hf["n_head"]),
                  mlp_dim=int(hf.get("n_inner") or 4 * d_model), max_len=int(hf.get("n_positions", 1024)),
                  norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                  mlp="gelu" if hf.get("activation_function") == "gelu" else "gelu_tanh", position="learned",
                  qkv_bias=True, linear_bias=True, tie_embeddings=True, vocab_size=int(hf["vocab_size"]),
                  causal=True)
    objective = "ar"
  else:  # llama, qwen2, dream
    _require(hf, "hidden_act", ("silu",), "not a SwiGLU MLP")
    _require(hf, "mlp_bias", (False,), "MLP biases")
    if family == "llama":
      _require(hf, "attention_bias", (False,), "biases on all four attention projections")
    d_model, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, d_model // heads):
      raise UserError(f"config.json head_dim={hf['head_dim']} with hidden_size={d_model} and {heads} heads; allowed: "
                      "head_dim = hidden_size / num_attention_heads")
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    fields = dict(d_model=d_model, num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
                  num_kv_heads=kv_heads if kv_heads != heads else 0, mlp_dim=int(hf["intermediate_size"]),
                  max_len=int(hf.get("max_position_embeddings", 4096)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  qkv_bias=family in ("qwen2", "dream"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  vocab_size=int(hf["vocab_size"]), causal=family != "dream", **_rope_settings(hf))
    if family == "dream":
      fields.update(shift_logits=True, mask_token_id=int(hf["mask_token_id"]))
    objective = "diffusion" if family == "dream" else "ar"
  eos = hf.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos
  return fields, objective, {"eos_id": eos, "mask_id": fields.get("mask_token_id", -1)}


# ----------------------------------------------------------------------------- tensors <-> parameters


def to_llama_names(tensors: dict, family: str) -> dict:
  """LLaDA's parameter names renamed to the LLaMA layout's (other families already use them)."""
  if family != "llada":
    return tensors
  renamed = {}
  for name, value in tensors.items():
    if name in _LLADA_TOP:
      renamed[_LLADA_TOP[name]] = value
      continue
    parts = name.split(".")  # model.transformer.blocks.<i>.<module>.<weight|bias>
    if parts[:3] != ["model", "transformer", "blocks"] or parts[4] not in _LLADA_BLOCK:
      raise UserError(f"LLaDA checkpoint tensor {name!r} is not one this importer maps; allowed: the "
                      "LLaDALlamaBlock names (q_proj, k_proj, v_proj, attn_out, attn_norm, ff_norm, ff_proj, "
                      "up_proj, ff_out)")
    renamed[f"model.layers.{parts[3]}.{_LLADA_BLOCK[parts[4]]}.{parts[5]}"] = value
  return renamed


def _pad_rows(table_VxD: np.ndarray, rows: int, mask_row: int | None) -> np.ndarray:
  """The table with `rows` rows: its own first, then zeros; row `mask_row` (a [MASK] outside the
  checkpoint's vocabulary) starts as the mean of its rows, a neutral point to fine-tune from."""
  if table_VxD.shape[0] > rows:
    raise UserError(f"a table of {table_VxD.shape[0]} rows exceeds the model's {rows}")
  out = np.zeros((rows, table_VxD.shape[1]), np.float32)
  out[:table_VxD.shape[0]] = table_VxD
  if mask_row is not None and mask_row >= table_VxD.shape[0]:
    out[mask_row] = table_VxD.mean(axis=0)
  return out


def params_from_llama(tensors: dict, cfg: ModelConfig) -> dict:
  """The Transformer parameter tree from LLaMA-layout tensors (HF Linear weights are [out, in])."""
  get = _getter(tensors)
  d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  mask_row = cfg.vocab_size if cfg.mask_token_id < 0 else None
  params = {"embed": {"embedding": _pad_rows(get("model.embed_tokens.weight"), cfg.padded_vocab, mask_row)},
            "final_norm": {"scale": get("model.norm.weight")}}
  if not cfg.tie_embeddings:
    params["head"] = {"kernel": _pad_rows(get("lm_head.weight"), cfg.padded_vocab, None).T.copy()}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    block = {
        "attn_norm": {"scale": get(p + "input_layernorm.weight")},
        "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
        "query": get(p + "self_attn.q_proj.weight").T.reshape(d, h, hd),
        "key": get(p + "self_attn.k_proj.weight").T.reshape(d, kv, hd),
        "value": get(p + "self_attn.v_proj.weight").T.reshape(d, kv, hd),
        "out": get(p + "self_attn.o_proj.weight").T.reshape(h, hd, d),
        "wi_gate": {"kernel": get(p + "mlp.gate_proj.weight").T},
        "wi_up": {"kernel": get(p + "mlp.up_proj.weight").T},
        "wo": {"kernel": get(p + "mlp.down_proj.weight").T},
    }
    if cfg.qkv_bias:
      block.update({"query_bias": get(p + "self_attn.q_proj.bias").reshape(h, hd),
                    "key_bias": get(p + "self_attn.k_proj.bias").reshape(kv, hd),
                    "value_bias": get(p + "self_attn.v_proj.bias").reshape(kv, hd)})
    params[f"block_{i}"] = block
  return params


def params_from_gpt2(tensors: dict, cfg: ModelConfig) -> dict:
  """The Transformer parameter tree from GPT-2 tensors (its Conv1D weights are [in, out])."""
  tensors = {name.removeprefix("transformer."): value for name, value in tensors.items()}
  get = _getter(tensors)
  d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
  wpe = get("wpe.weight")
  if wpe.shape[0] < cfg.max_len:
    raise UserError(f"model.max_len={cfg.max_len} exceeds the checkpoint's {wpe.shape[0]} learned positions")
  params = {"embed": {"embedding": _pad_rows(get("wte.weight"), cfg.padded_vocab, cfg.vocab_size)},
            "pos_embed": wpe[:cfg.max_len],
            "final_norm": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")}}
  for i in range(cfg.num_layers):
    p = f"h.{i}."
    w_qkv = np.split(get(p + "attn.c_attn.weight"), 3, axis=1)
    b_qkv = np.split(get(p + "attn.c_attn.bias"), 3)
    params[f"block_{i}"] = {
        "attn_norm": {"scale": get(p + "ln_1.weight"), "bias": get(p + "ln_1.bias")},
        "mlp_norm": {"scale": get(p + "ln_2.weight"), "bias": get(p + "ln_2.bias")},
        **{name: w.reshape(d, h, hd) for name, w in zip(("query", "key", "value"), w_qkv)},
        **{f"{name}_bias": b.reshape(h, hd) for name, b in zip(("query", "key", "value"), b_qkv)},
        "out": get(p + "attn.c_proj.weight").reshape(h, hd, d),
        "out_bias": get(p + "attn.c_proj.bias"),
        "wi": {"kernel": get(p + "mlp.c_fc.weight"), "bias": get(p + "mlp.c_fc.bias")},
        "wo": {"kernel": get(p + "mlp.c_proj.weight"), "bias": get(p + "mlp.c_proj.bias")},
    }
  return params


def _getter(tensors: dict):
  def get(name):
    if name not in tensors:
      raise UserError(f"checkpoint tensor {name!r} is missing; allowed: a complete checkpoint of its family")
    return np.asarray(tensors[name], np.float32)
  return get


def llama_tensors(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """LLaMA-layout tensors (HF Linear [out, in]) of a Transformer parameter tree; every table row kept."""
  if cfg.time_conditioning or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu" or cfg.position != "rope" or cfg.linear_bias:
    raise UserError("export writes the LLaMA layout (RMSNorm, RoPE, SwiGLU, no time conditioning); this model has "
                    f"norm={cfg.norm!r}, mlp={cfg.mlp!r}, position={cfg.position!r}, "
                    f"time_conditioning={cfg.time_conditioning}; allowed: a LLaMA-style model")
  p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  out = {"model.embed_tokens.weight": p["embed"]["embedding"], "model.norm.weight": p["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = p["head"]["kernel"].T
  for i in range(cfg.num_layers):
    b, q = p[f"block_{i}"], f"model.layers.{i}."
    out.update({
        q + "input_layernorm.weight": b["attn_norm"]["scale"],
        q + "post_attention_layernorm.weight": b["mlp_norm"]["scale"],
        q + "self_attn.q_proj.weight": b["query"].reshape(d, h * hd).T,
        q + "self_attn.k_proj.weight": b["key"].reshape(d, kv * hd).T,
        q + "self_attn.v_proj.weight": b["value"].reshape(d, kv * hd).T,
        q + "self_attn.o_proj.weight": b["out"].reshape(h * hd, d).T,
        q + "mlp.gate_proj.weight": b["wi_gate"]["kernel"].T,
        q + "mlp.up_proj.weight": b["wi_up"]["kernel"].T,
        q + "mlp.down_proj.weight": b["wo"]["kernel"].T,
    })
    if cfg.qkv_bias:
      out.update({q + f"self_attn.{n}_proj.bias": b[f"{name}_bias"].reshape(-1)
                  for n, name in (("q", "query"), ("k", "key"), ("v", "value"))})
  return {name: np.ascontiguousarray(value) for name, value in out.items()}


def _check_tree(params, model: Transformer, seq_len: int) -> None:
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


# ----------------------------------------------------------------------------- workdirs


def _default_config():
  """configs/default.py's config (every field), which the workdir's config starts from."""
  path = os.path.join(CONFIGS_DIR, "default.py")
  spec = importlib.util.spec_from_file_location("_diffusion_lm_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_workdir(workdir: str, model_fields: dict, objective: str, tokenizer, params, seq_len: int) -> str:
  """A workdir holding `params` (numpy tree) as the step-0 checkpoint of a config built from
  configs/default.py with `model_fields` and `objective`; returns the checkpoint directory."""
  if checkpointing.read_saved_config(workdir)[0] is not None:
    raise UserError(f"--workdir={workdir!r} already holds a checkpoint; allowed: a new or empty workdir")
  config = _default_config()
  config.objective = objective
  # The objective sets the attention structure (causal, decode_window); the tokenizer the vocabulary.
  fields = {k: v for k, v in model_fields.items() if k not in ("vocab_size", "causal", "decode_window")}
  for key, value in fields.items():
    config.model[key] = value
  config.tokenizer.kind = tokenizer.kind
  config.data.seq_len = min(seq_len, fields["max_len"])
  config.evaluation.batch_size = config.training.batch_size = 8
  experiment.check_config(config)
  model = Transformer(experiment.model_config(config, tokenizer.vocab_size))
  _check_tree(params, model, config.data.seq_len)
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


def _hf_tokenizer(folder: str, vocab_size: int, eos_id, mask_id: int):
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


def import_hf(folder: str, workdir: str, max_len: int = 0, seq_len: int = 128) -> dict:
  """Converts the Hugging Face folder into `workdir`; returns a summary (family, objective, parameters)."""
  hf = read_hf_config(folder)
  family = family_of(hf) if SECTION not in hf else "diffusion_lm export (LLaMA layout)"
  fields, objective, ids = model_settings(hf, family)
  if max_len:
    if fields.get("position") == "learned" and max_len > fields["max_len"]:
      raise UserError(f"--max_len={max_len} exceeds the checkpoint's {fields['max_len']} learned positions")
    fields["max_len"] = max_len
  elif SECTION not in hf:
    fields["max_len"] = min(fields["max_len"], 4096)  # the decoding cache holds max_len positions
  cfg = ModelConfig(**fields)
  tensors = to_llama_names(read_safetensors(folder), family)
  if cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)
  try:
    params = params_from_gpt2(tensors, cfg) if family == "gpt2" else params_from_llama(tensors, cfg)
  except ValueError as e:  # a reshape of a tensor whose size config.json does not predict
    if isinstance(e, UserError):
      raise
    raise UserError(f"the tensors in {folder!r} do not fit its config.json ({' '.join(str(e).split())[:200]}); "
                    "allowed: the config.json that came with these safetensors") from None
  if SECTION in hf:
    # Exported here with every table row: the padded tables come back as they were.
    params["embed"]["embedding"] = tensors["model.embed_tokens.weight"]
    if not cfg.tie_embeddings:
      params["head"]["kernel"] = tensors["lm_head.weight"].T.copy()
  tokenizer = _hf_tokenizer(folder, cfg.vocab_size, ids["eos_id"], ids["mask_id"])
  write_workdir(workdir, fields, objective, tokenizer, params, seq_len)
  return {"family": family, "objective": objective, "parameters": experiment.param_count(params),
          "vocab_size": cfg.vocab_size, "mask_id": tokenizer.mask_id, "eos_id": tokenizer.eos_id}


def _write_safetensors(tensors: dict, folder: str) -> list[str]:
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


def export_hf(workdir: str, folder: str, use_ema: bool = True) -> list[str]:
  """Writes the workdir's model as a Hugging Face folder; returns the files written."""
  if paths.exists(paths.join(folder, "config.json")):
    raise UserError(f"--to_hf={folder!r} already holds a config.json; allowed: a new or empty folder")
  trained = experiment.load_trained(workdir, use_ema=use_ema)
  cfg, tokenizer = trained.model.config, trained.tokenizer
  tensors = llama_tensors(jax.device_get(trained.params), cfg)
  model_fields = {k: v for k, v in experiment.config_to_dict(trained.config)["model"].items()}
  model_fields["vocab_size"] = cfg.vocab_size
  rows = cfg.padded_vocab
  hf = {
      "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
      "model_type": "qwen2" if cfg.qkv_bias else "llama",
      "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_embeddings, "vocab_size": rows,
      "attention_bias": False, "mlp_bias": False, "eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.eos_id,
      "mask_token_id": tokenizer.mask_id, "torch_dtype": "float32",
      # Attention of the exported network: a bidirectional (masked diffusion) model needs a full mask.
      "is_causal": bool(cfg.causal),
      SECTION: {"model": model_fields, "objective": trained.config.objective, "mask_id": tokenizer.mask_id},
  }
  if cfg.rope_scaling:
    hf["rope_scaling"] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling == "llama3":
      hf["rope_scaling"].update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                                original_max_position_embeddings=cfg.rope_original_max_len)
  written = _write_safetensors(tensors, folder)
  paths.write_bytes(paths.join(folder, "config.json"), json.dumps(hf, indent=2).encode())
  written.append("config.json")
  if tokenizer.kind == "hf":
    paths.write_bytes(paths.join(folder, "tokenizer.json"), tokenizer.tokenizer_json)
    settings = {"eos_token": tokenizer.eos_token}
    if tokenizer.mask_id < rows and tokenizer.mask_token:
      settings["mask_token"] = tokenizer.mask_token
    paths.write_bytes(paths.join(folder, "tokenizer_config.json"), json.dumps(settings).encode())
    written += ["tokenizer.json", "tokenizer_config.json"]
  elif tokenizer.kind == "sentencepiece":
    paths.write_bytes(paths.join(folder, "tokenizer.model"), tokenizer.model_proto)
    written.append("tokenizer.model")
  else:
    paths.write_bytes(paths.join(folder, CHAR_VOCABULARY), tokenizer.to_json())
    written.append(CHAR_VOCABULARY)
  return written


# ----------------------------------------------------------------------------- command line


def define_flags():
  flags.DEFINE_string("from_hf", None, "Import: a local Hugging Face checkpoint folder (config.json, "
                      "*.safetensors, tokenizer.json).")
  flags.DEFINE_string("to_hf", None, "Export: the folder to write (safetensors + config.json + tokenizer).")
  flags.DEFINE_string("workdir", None, "The workdir to write (import) or read (export).")
  flags.DEFINE_integer("max_len", 0, "Import: longest sequence the model accepts (default: the checkpoint's, "
                       "at most 4096; the decoding cache holds this many positions).")
  flags.DEFINE_integer("seq_len", 128, "Import: data.seq_len of the workdir's config (sample / evaluate default).")
  flags.DEFINE_bool("raw_params", False, "Export: the raw parameters instead of the EMA parameters.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  f = flags.FLAGS
  if not f.workdir or bool(f.from_hf) == bool(f.to_hf):
    raise UserError("convert needs --workdir and exactly one of --from_hf (import) or --to_hf (export)")
  if f.from_hf:
    summary = import_hf(f.from_hf, f.workdir, f.max_len, f.seq_len)
    print(f"imported {summary['family']} ({summary['parameters']:,} parameters, vocab {summary['vocab_size']}, "
          f"[MASK] id {summary['mask_id']}, end-of-text id {summary['eos_id']}) as objective "
          f"{summary['objective']!r} into {f.workdir}")
  else:
    written = export_hf(f.workdir, f.to_hf, use_ema=not f.raw_params)
    print(f"exported {f.workdir} to {f.to_hf}: {', '.join(written)}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
