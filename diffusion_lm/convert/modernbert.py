"""ModernBERT (ModernBertForMaskedLM): pre-norm LayerNorms without biases (the first block's attention
reads the normed embeddings as they are), a fused q/k/v projection, GeGLU (gelu(first half) * second
half), no biases, rotary embeddings with separate bases for global and sliding-window layers, every
global_attn_every_n_layers-th layer global and the others attending local_attention // 2 positions each
way, and the masked-LM head (dense, GELU, norm, decoder tied to the embeddings with a bias); [MASK]
inside the vocabulary. Imported as a masked diffusion model.

config.json comes in two layouts: the original (global_rope_theta, local_rope_theta,
global_attn_every_n_layers) and transformers' newer one (layer_types, rope_parameters per layer type);
both are read, and export writes both.
"""

import functools

import numpy as np

from diffusion_lm.convert import bert, io
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig

NAME = "modernbert"
# The workdir's data: windows framed as the encoder reads text, [CLS] ... [SEP] (<s> ... </s>).
DATA = {"frame_windows": True, "frame_open": "bos"}


def matches(hf: dict) -> bool:
  return str(hf.get("model_type", "")).lower() == "modernbert"


def _global_every(hf: dict) -> int:
  every = int(hf.get("global_attn_every_n_layers", 3))
  layer_types = hf.get("layer_types")
  if layer_types:
    expected = ["sliding_attention" if i % every else "full_attention" for i in range(len(layer_types))]
    if list(layer_types) != expected:
      raise UserError(f"config.json layer_types={layer_types}; allowed: every global_attn_every_n_layers={every}"
                      "-th layer full_attention from the first, the others sliding_attention")
  return every


def _thetas(hf: dict) -> tuple[float, float]:
  params = hf.get("rope_parameters") or {}
  for kind in ("full_attention", "sliding_attention"):
    rope_type = (params.get(kind) or {}).get("rope_type", "default")
    if rope_type != "default":
      raise UserError(f"config.json rope_parameters.{kind}.rope_type={rope_type!r}; allowed: 'default'")
  full = (params.get("full_attention") or {}).get("rope_theta", hf.get("global_rope_theta", 160000.0))
  local = (params.get("sliding_attention") or {}).get("rope_theta", hf.get("local_rope_theta", 10000.0))
  return float(full), float(local)


def settings(folder: str, hf: dict) -> tuple[dict, str, dict]:
  for key, allowed, what in (("hidden_activation", ("gelu",), "the GeGLU's activation"),
                             ("classifier_activation", ("gelu",), "the head's activation"),
                             ("attention_bias", (False,), "attention biases"), ("mlp_bias", (False,), "MLP biases"),
                             ("classifier_bias", (False,), "a bias on the head's dense layer")):
    io.require(hf, key, allowed, what)
  mask_id = io.token_id(folder, *bert.MASK_TOKENS)
  if mask_id is None:
    raise UserError(f"--from_hf={folder!r}: the tokenizer.json has none of {', '.join(bert.MASK_TOKENS)}; "
                    "allowed: the masked language model's own tokenizer")
  global_base, local_base = _thetas(hf)
  fields = dict(d_model=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]), mlp_dim=int(hf["intermediate_size"]),
                max_len=int(hf.get("max_position_embeddings", 8192)),
                norm="layernorm" if hf.get("norm_bias", False) else "layernorm_nobias",
                norm_eps=float(hf.get("norm_eps", 1e-5)), mlp="geglu", embed_norm=True, first_attn_norm=False,
                rope_base=global_base, local_rope_base=local_base, local_window=int(hf.get("local_attention", 128)),
                global_every=_global_every(hf), head_transform=True, head_bias=bool(hf.get("decoder_bias", True)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)), vocab_size=int(hf["vocab_size"]),
                causal=False, mask_token_id=mask_id)
  eos = hf.get("sep_token_id")
  return fields, "diffusion", {"eos_id": io.token_id(folder, *bert.EOS_TOKENS) if eos is None else eos,
                               "mask_id": mask_id}


def _norm(get, name: str, cfg: ModelConfig) -> dict:
  out = {"scale": get(name + ".weight")}
  if cfg.norm == "layernorm":
    out["bias"] = get(name + ".bias")
  return out


def param_parts(tensors, cfg: ModelConfig) -> list:
  """(top-level name, make) parts of the Transformer parameter tree from ModernBERT tensors (HF Linear
  weights are [out, in]); each part reads its tensors when made."""
  get = io.getter(tensors)
  parts = [("embed", lambda: {"embedding": io.pad_rows(get("model.embeddings.tok_embeddings.weight"),
                                                       cfg.padded_vocab, None)}),
           ("embed_norm", lambda: _norm(get, "model.embeddings.norm", cfg)),
           ("final_norm", lambda: _norm(get, "model.final_norm", cfg)),
           ("head_transform", lambda: {"kernel": get("head.dense.weight").T}),
           ("head_norm", lambda: _norm(get, "head.norm", cfg))]
  if cfg.head_bias:
    parts.append(("head_bias", lambda: io.pad_rows(get("decoder.bias"), cfg.padded_vocab, None)))
  if not cfg.tie_embeddings:
    parts.append(("head", lambda: {"kernel": io.pad_rows(get("decoder.weight"), cfg.padded_vocab, None).T.copy()}))
  return parts + [(f"block_{i}", functools.partial(_block, get, cfg, i)) for i in range(cfg.num_layers)]


def _block(get, cfg: ModelConfig, i: int) -> dict:
  d, h, hd, m = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  p = f"model.layers.{i}."
  qkv = get(p + "attn.Wqkv.weight").T.reshape(d, 3, h, hd)  # output rows are (q | k | v) x heads x head_dim
  wi = get(p + "mlp.Wi.weight")  # rows: the activated half, then the gate
  block = {"query": qkv[:, 0], "key": qkv[:, 1], "value": qkv[:, 2],
           "out": get(p + "attn.Wo.weight").T.reshape(h, hd, d),
           "mlp_norm": _norm(get, p + "mlp_norm", cfg),
           "wi_gate": {"kernel": wi[:m].T}, "wi_up": {"kernel": wi[m:].T},
           "wo": {"kernel": get(p + "mlp.Wo.weight").T}}
  if i > 0:
    block["attn_norm"] = _norm(get, p + "attn_norm", cfg)
  return block


def writes(cfg: ModelConfig) -> bool:
  return (cfg.mlp == "geglu" and cfg.norm in ("layernorm", "layernorm_nobias") and cfg.norm_position == "pre"
          and cfg.embed_norm and not cfg.first_attn_norm and cfg.head_transform and cfg.position == "rope"
          and not cfg.rope_scaling and not cfg.qkv_bias and not cfg.linear_bias and not cfg.token_types
          and cfg.kv_heads == cfg.num_heads and not cfg.time_conditioning and not cfg.causal and not cfg.block_size)


def tensors_of(params, cfg: ModelConfig):
  """(name, ModernBERT tensor) pairs of a Transformer parameter tree; `params` may be any mapping of
  top-level parts (export reads one part at a time)."""
  d = cfg.d_model

  def norm(name, tree):
    return [(name + ".weight", tree["scale"])] + ([(name + ".bias", tree["bias"])] if "bias" in tree else [])

  yield "model.embeddings.tok_embeddings.weight", params["embed"]["embedding"]
  yield from norm("model.embeddings.norm", params["embed_norm"])
  yield from norm("model.final_norm", params["final_norm"])
  yield "head.dense.weight", params["head_transform"]["kernel"].T
  yield from norm("head.norm", params["head_norm"])
  if cfg.head_bias:
    yield "decoder.bias", params["head_bias"]
  if not cfg.tie_embeddings:
    yield "decoder.weight", params["head"]["kernel"].T
  for i in range(cfg.num_layers):
    b, q = params[f"block_{i}"], f"model.layers.{i}."
    qkv = np.stack([b["query"], b["key"], b["value"]], axis=1).reshape(d, 3 * d)
    yield q + "attn.Wqkv.weight", qkv.T
    yield q + "attn.Wo.weight", b["out"].reshape(d, d).T
    yield from norm(q + "mlp_norm", b["mlp_norm"])
    yield q + "mlp.Wi.weight", np.concatenate([b["wi_gate"]["kernel"], b["wi_up"]["kernel"]], axis=1).T
    yield q + "mlp.Wo.weight", b["wo"]["kernel"].T
    if i > 0:
      yield from norm(q + "attn_norm", b["attn_norm"])


def export_config(cfg: ModelConfig, tokenizer) -> dict:
  local_base = cfg.local_rope_base or cfg.rope_base
  every = cfg.global_every if cfg.local_window else 1  # no sliding layer
  vocab = tokenizer.tok.get_vocab(with_added_tokens=True) if tokenizer.kind == "hf" else {}
  return {"architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert", "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "intermediate_size": cfg.mlp_dim, "hidden_activation": "gelu", "classifier_activation": "gelu",
          "max_position_embeddings": cfg.max_len, "norm_eps": cfg.norm_eps, "norm_bias": cfg.norm == "layernorm",
          "attention_bias": False, "mlp_bias": False, "classifier_bias": False, "decoder_bias": cfg.head_bias,
          "tie_word_embeddings": cfg.tie_embeddings, "vocab_size": cfg.padded_vocab,
          # A window wider than every sequence, where the model has none.
          "local_attention": cfg.local_window or 2 * cfg.max_len + 2, "global_attn_every_n_layers": every,
          "global_rope_theta": cfg.rope_base, "local_rope_theta": local_base,
          "layer_types": ["sliding_attention" if cfg.is_local(i) else "full_attention" for i in range(cfg.num_layers)],
          "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base},
                              "sliding_attention": {"rope_type": "default", "rope_theta": local_base}},
          "pad_token_id": vocab.get("[PAD]", 0), "cls_token_id": vocab.get("[CLS]", tokenizer.eos_id),
          "sep_token_id": tokenizer.eos_id, "bos_token_id": vocab.get("[CLS]", tokenizer.eos_id),
          "eos_token_id": tokenizer.eos_id, "mask_token_id": tokenizer.mask_id, "torch_dtype": "float32",
          "embedding_dropout": 0.0, "attention_dropout": 0.0, "mlp_dropout": 0.0}
