"""LLaDA (model_type llada): the LLaMA network under its own parameter names (modeling_llada.py,
LLaDALlamaBlock), bidirectional, a [MASK] token inside the vocabulary; imported as a masked diffusion model."""

from diffusion_lm.convert import io, llama
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig

NAME = "llada"
_TOP = {"model.transformer.wte.weight": "model.embed_tokens.weight",
        "model.transformer.ln_f.weight": "model.norm.weight",
        "model.transformer.ff_out.weight": "lm_head.weight"}
_BLOCK = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
          "attn_out": "self_attn.o_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
          "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}


def matches(hf: dict) -> bool:
  return str(hf.get("model_type", "")).lower() == "llada" or "LLaDA" in " ".join(hf.get("architectures") or [])


def settings(folder: str, hf: dict) -> tuple[dict, str, dict]:
  del folder
  for key, allowed in (("include_bias", (False,)), ("input_emb_norm", (False,)), ("scale_logits", (False,)),
                       ("alibi", (False,)), ("block_type", ("llama",)), ("layer_norm_type", ("rms",)),
                       ("activation_type", ("silu", "swiglu"))):
    io.require(hf, key, allowed, "not the LLaMA-style block this importer reads")
  heads = int(hf["n_heads"])
  fields = dict(d_model=int(hf["d_model"]), num_layers=int(hf["n_layers"]), num_heads=heads,
                num_kv_heads=int(hf.get("n_kv_heads") or heads), mlp_dim=int(hf["mlp_hidden_size"]),
                max_len=int(hf.get("max_sequence_length", 4096)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                rope_base=float(hf.get("rope_theta", 10000.0)), qkv_bias=bool(hf.get("include_qkv_bias", False)),
                tie_embeddings=bool(hf.get("weight_tying", False)),
                vocab_size=int(hf.get("embedding_size") or hf["vocab_size"]), causal=False,
                mask_token_id=int(hf["mask_token_id"]))
  return fields, "diffusion", {"eos_id": llama.eos_of(hf), "mask_id": fields["mask_token_id"]}


def to_llama_names(tensors: io.Tensors) -> io.Tensors:
  """The tensors under the LLaMA layout's names (a view: nothing is read)."""
  renamed = {}
  for name in tensors:
    if name in _TOP:
      renamed[_TOP[name]] = name
      continue
    parts = name.split(".")  # model.transformer.blocks.<i>.<module>.<weight|bias>
    if parts[:3] != ["model", "transformer", "blocks"] or parts[4] not in _BLOCK:
      raise UserError(f"LLaDA checkpoint tensor {name!r} is not one this importer maps; allowed: the "
                      "LLaDALlamaBlock names (q_proj, k_proj, v_proj, attn_out, attn_norm, ff_norm, ff_proj, "
                      "up_proj, ff_out)")
    renamed[f"model.layers.{parts[3]}.{_BLOCK[parts[4]]}.{parts[5]}"] = name
  return tensors.renamed(renamed)


def param_parts(tensors: io.Tensors, cfg: ModelConfig) -> list:
  return llama.param_parts(to_llama_names(tensors), cfg)
