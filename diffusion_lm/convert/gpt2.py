"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm with biases, GELU, tied head; imported as an
autoregressive model (import only)."""

import functools

import numpy as np

from diffusion_lm.convert import io, llama
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig

NAME = "gpt2"


def matches(hf: dict) -> bool:
  return str(hf.get("model_type", "")).lower() == "gpt2"


def settings(folder: str, hf: dict) -> tuple[dict, str, dict]:
  del folder
  for key, allowed, what in (("scale_attn_by_inverse_layer_idx", (False,), "per-layer attention scaling"),
                             ("reorder_and_upcast_attn", (False,), "reordered attention"),
                             ("scale_attn_weights", (True,), "unscaled attention"),
                             ("activation_function", ("gelu_new", "gelu", "gelu_pytorch_tanh"), "activation")):
    io.require(hf, key, allowed, what)
  d_model = int(hf["n_embd"])
  fields = dict(d_model=d_model, num_layers=int(hf["n_layer"]), num_heads=int(hf["n_head"]),
                mlp_dim=int(hf.get("n_inner") or 4 * d_model), max_len=int(hf.get("n_positions", 1024)),
                norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                mlp="gelu" if hf.get("activation_function") == "gelu" else "gelu_tanh", position="learned",
                qkv_bias=True, linear_bias=True, tie_embeddings=True, vocab_size=int(hf["vocab_size"]),
                causal=True)
  return fields, "ar", {"eos_id": llama.eos_of(hf), "mask_id": -1}


def param_parts(tensors: io.Tensors, cfg: ModelConfig) -> list:
  """(top-level name, make) parts of the Transformer parameter tree from GPT-2 tensors (its Conv1D weights
  are [in, out]); each part reads its tensors when made."""
  get = io.getter(tensors.renamed({name.removeprefix("transformer."): name for name in tensors}))

  def pos_embed():
    wpe = get("wpe.weight")
    if wpe.shape[0] < cfg.max_len:
      raise UserError(f"model.max_len={cfg.max_len} exceeds the checkpoint's {wpe.shape[0]} learned positions")
    return wpe[:cfg.max_len].copy()

  return [("embed", lambda: {"embedding": io.pad_rows(get("wte.weight"), cfg.padded_vocab, cfg.vocab_size)}),
          ("pos_embed", pos_embed),
          ("final_norm", lambda: {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")})] + [
              (f"block_{i}", functools.partial(_block, get, cfg, f"h.{i}.")) for i in range(cfg.num_layers)]


def _block(get, cfg: ModelConfig, p: str) -> dict:
  d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
  w_qkv = np.split(get(p + "attn.c_attn.weight"), 3, axis=1)
  b_qkv = np.split(get(p + "attn.c_attn.bias"), 3)
  return {
      "attn_norm": {"scale": get(p + "ln_1.weight"), "bias": get(p + "ln_1.bias")},
      "mlp_norm": {"scale": get(p + "ln_2.weight"), "bias": get(p + "ln_2.bias")},
      **{name: w.reshape(d, h, hd) for name, w in zip(("query", "key", "value"), w_qkv)},
      **{f"{name}_bias": b.reshape(h, hd) for name, b in zip(("query", "key", "value"), b_qkv)},
      "out": get(p + "attn.c_proj.weight").reshape(h, hd, d),
      "out_bias": get(p + "attn.c_proj.bias"),
      "wi": {"kernel": get(p + "mlp.c_fc.weight"), "bias": get(p + "mlp.c_fc.bias")},
      "wo": {"kernel": get(p + "mlp.c_proj.weight"), "bias": get(p + "mlp.c_proj.bias")},
  }
