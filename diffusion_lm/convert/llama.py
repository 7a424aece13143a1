"""LLaMA (LlamaForCausalLM): RMSNorm, RoPE (theta; linear or llama3 scaling), SwiGLU, grouped-query
attention, tied or untied head; imported as an autoregressive model. Also the layout every other
pre-norm model of this project exports to (Qwen2's where it has q/k/v biases, see export_config)."""

import functools


from diffusion_lm.convert import io
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig

NAME = "llama"


def matches(hf: dict) -> bool:
  return str(hf.get("model_type", "")).lower() == "llama"


def rope_settings(hf: dict) -> dict:
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


def decoder_settings(hf: dict, qkv_bias: bool) -> dict:
  """ModelConfig fields of a LLaMA-style config.json (llama, qwen2, dream)."""
  io.require(hf, "hidden_act", ("silu",), "not a SwiGLU MLP")
  io.require(hf, "mlp_bias", (False,), "MLP biases")
  if not qkv_bias:
    io.require(hf, "attention_bias", (False,), "biases on all four attention projections")
  d_model, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  if hf.get("head_dim") not in (None, d_model // heads):
    raise UserError(f"config.json head_dim={hf['head_dim']} with hidden_size={d_model} and {heads} heads; allowed: "
                    "head_dim = hidden_size / num_attention_heads")
  kv_heads = int(hf.get("num_key_value_heads") or heads)
  return dict(d_model=d_model, num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
              num_kv_heads=kv_heads if kv_heads != heads else 0, mlp_dim=int(hf["intermediate_size"]),
              max_len=int(hf.get("max_position_embeddings", 4096)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              qkv_bias=qkv_bias, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              vocab_size=int(hf["vocab_size"]), causal=True, **rope_settings(hf))


def eos_of(hf: dict):
  eos = hf.get("eos_token_id")
  return eos[0] if isinstance(eos, list) else eos


def settings(folder: str, hf: dict) -> tuple[dict, str, dict]:
  del folder
  fields = decoder_settings(hf, qkv_bias=False)
  return fields, "ar", {"eos_id": eos_of(hf), "mask_id": -1}


def param_parts(tensors, cfg: ModelConfig) -> list:
  """(top-level name, make) parts of the Transformer parameter tree from LLaMA-layout tensors (HF Linear
  weights are [out, in]); each part reads its tensors when made."""
  get = io.getter(tensors)
  mask_row = cfg.vocab_size if cfg.mask_token_id < 0 else None
  parts = [("embed", lambda: {"embedding": io.pad_rows(get("model.embed_tokens.weight"), cfg.padded_vocab,
                                                       mask_row)}),
           ("final_norm", lambda: {"scale": get("model.norm.weight")})]
  if not cfg.tie_embeddings:
    parts.append(("head", lambda: {"kernel": io.pad_rows(get("lm_head.weight"), cfg.padded_vocab, None).T.copy()}))
  return parts + [(f"block_{i}", functools.partial(_block, get, cfg, f"model.layers.{i}."))
                  for i in range(cfg.num_layers)]


def _block(get, cfg: ModelConfig, p: str) -> dict:
  d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
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
  return block


def writes(cfg: ModelConfig) -> bool:
  """Whether the LLaMA layout holds this model (RMSNorm, RoPE, SwiGLU, pre-norm, nothing more)."""
  return (not cfg.time_conditioning and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.position == "rope"
          and not cfg.linear_bias and cfg.norm_position == "pre" and not cfg.embed_norm and not cfg.token_types
          and cfg.first_attn_norm and not cfg.local_window and not cfg.head_transform and not cfg.head_bias)


def tensors_of(params, cfg: ModelConfig):
  """(name, LLaMA-layout tensor) pairs (HF Linear [out, in]) of a Transformer parameter tree, every table
  row kept; `params` may be any mapping of top-level parts (export reads one part at a time)."""
  d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  yield "model.embed_tokens.weight", params["embed"]["embedding"]
  yield "model.norm.weight", params["final_norm"]["scale"]
  if not cfg.tie_embeddings:
    yield "lm_head.weight", params["head"]["kernel"].T
  for i in range(cfg.num_layers):
    b, q = params[f"block_{i}"], f"model.layers.{i}."
    yield q + "input_layernorm.weight", b["attn_norm"]["scale"]
    yield q + "post_attention_layernorm.weight", b["mlp_norm"]["scale"]
    yield q + "self_attn.q_proj.weight", b["query"].reshape(d, h * hd).T
    yield q + "self_attn.k_proj.weight", b["key"].reshape(d, kv * hd).T
    yield q + "self_attn.v_proj.weight", b["value"].reshape(d, kv * hd).T
    yield q + "self_attn.o_proj.weight", b["out"].reshape(h * hd, d).T
    yield q + "mlp.gate_proj.weight", b["wi_gate"]["kernel"].T
    yield q + "mlp.up_proj.weight", b["wi_up"]["kernel"].T
    yield q + "mlp.down_proj.weight", b["wo"]["kernel"].T
    if cfg.qkv_bias:
      for n, name in (("q", "query"), ("k", "key"), ("v", "value")):
        yield q + f"self_attn.{n}_proj.bias", b[f"{name}_bias"].reshape(-1)


def export_config(cfg: ModelConfig, tokenizer) -> dict:
  """config.json of the LLaMA layout (Qwen2's where the model has q/k/v biases)."""
  hf = {
      "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
      "model_type": "qwen2" if cfg.qkv_bias else "llama",
      "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_embeddings, "vocab_size": cfg.padded_vocab,
      "attention_bias": False, "mlp_bias": False, "eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.eos_id,
      "mask_token_id": tokenizer.mask_id, "torch_dtype": "float32",
      # Attention of the exported network: a bidirectional (masked diffusion) model needs a full mask.
      "is_causal": bool(cfg.causal),
  }
  if cfg.rope_scaling:
    hf["rope_scaling"] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling == "llama3":
      hf["rope_scaling"].update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                                original_max_position_embeddings=cfg.rope_original_max_len)
  return hf
