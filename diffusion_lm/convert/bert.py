"""BERT (BertForMaskedLM): learned absolute positions and token types, post-LayerNorm blocks with biases,
GELU, the masked-LM transform (dense, GELU, LayerNorm) and the decoder tied to the embeddings with its own
bias; [MASK] inside the vocabulary. Imported as a masked diffusion model (BERT's MLM is its one-step case).

RoBERTa (convert/roberta.py) is this network under other names with its positions offset; the mapping
here serves both through `Names`.
"""

import dataclasses
import functools

from diffusion_lm.convert import io
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig

NAME = "bert"
# The workdir's data: windows framed as the encoder reads text, [CLS] ... [SEP] (<s> ... </s>).
DATA = {"frame_windows": True, "frame_open": "bos"}
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class Names:
  """Where a BERT-style checkpoint keeps its tensors."""
  body: str = "bert."  # embeddings.* and encoder.layer.<i>.*
  transform: str = "cls.predictions.transform.dense"
  transform_norm: str = "cls.predictions.transform.LayerNorm"
  bias: str = "cls.predictions.bias"
  decoder: str = "cls.predictions.decoder.weight"  # only where the head is untied
  architecture: str = "BertForMaskedLM"
  model_type: str = "bert"


NAMES = Names()
MASK_TOKENS = ("[MASK]", "<mask>")
EOS_TOKENS = ("[SEP]", "</s>")


def matches(hf: dict) -> bool:
  return str(hf.get("model_type", "")).lower() == "bert"


def encoder_settings(folder: str, hf: dict, position_offset: int) -> tuple[dict, str, dict]:
  """ModelConfig fields of a BERT-style config.json, its objective and ids."""
  io.require(hf, "position_embedding_type", ("absolute",), "relative position embeddings")
  io.require(hf, "is_decoder", (False,), "a causal BERT")
  act = hf.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    raise UserError(f"config.json hidden_act={act!r}: not a GELU MLP; allowed: {', '.join(map(repr, ACTIVATIONS))}")
  mask_id = io.token_id(folder, *MASK_TOKENS)
  if mask_id is None:
    raise UserError(f"--from_hf={folder!r}: the tokenizer.json has none of {', '.join(MASK_TOKENS)}; allowed: "
                    "the masked language model's own tokenizer")
  fields = dict(d_model=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]), mlp_dim=int(hf["intermediate_size"]),
                max_len=int(hf.get("max_position_embeddings", 512)) - position_offset, norm="layernorm",
                norm_eps=float(hf.get("layer_norm_eps", 1e-12)), norm_position="post", mlp=ACTIVATIONS[act],
                position="learned", position_offset=position_offset, token_types=int(hf.get("type_vocab_size", 2)),
                embed_norm=True, qkv_bias=True, linear_bias=True, head_transform=True, head_bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)), vocab_size=int(hf["vocab_size"]),
                causal=False, mask_token_id=mask_id)
  return fields, "diffusion", {"eos_id": io.token_id(folder, *EOS_TOKENS), "mask_id": mask_id}


def settings(folder: str, hf: dict) -> tuple[dict, str, dict]:
  return encoder_settings(folder, hf, position_offset=0)


def _layer_norm(get, name: str) -> dict:
  # Checkpoints from TensorFlow days call the LayerNorm parameters gamma and beta.
  try:
    return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}
  except UserError:
    return {"scale": get(name + ".gamma"), "bias": get(name + ".beta")}


def encoder_parts(tensors, cfg: ModelConfig, names: Names) -> list:
  """(top-level name, make) parts of the Transformer parameter tree from BERT-style tensors (HF Linear
  weights are [out, in]); each part reads its tensors when made."""
  get = io.getter(tensors)
  e = names.body + "embeddings."

  def pos_embed():
    table = get(e + "position_embeddings.weight")
    if table.shape[0] < cfg.max_len + cfg.position_offset:
      raise UserError(f"model.max_len={cfg.max_len} exceeds the checkpoint's "
                      f"{table.shape[0] - cfg.position_offset} learned positions")
    return table[:cfg.max_len + cfg.position_offset].copy()

  parts = [("embed", lambda: {"embedding": io.pad_rows(get(e + "word_embeddings.weight"), cfg.padded_vocab, None)}),
           ("pos_embed", pos_embed),
           ("type_embed", lambda: get(e + "token_type_embeddings.weight")),
           ("embed_norm", lambda: _layer_norm(get, e + "LayerNorm")),
           ("head_transform", lambda: {"kernel": get(names.transform + ".weight").T,
                                       "bias": get(names.transform + ".bias")}),
           ("head_norm", lambda: _layer_norm(get, names.transform_norm)),
           ("head_bias", lambda: io.pad_rows(get(names.bias), cfg.padded_vocab, None))]
  if not cfg.tie_embeddings:
    parts.append(("head", lambda: {"kernel": io.pad_rows(get(names.decoder), cfg.padded_vocab, None).T.copy()}))
  return parts + [(f"block_{i}", functools.partial(_encoder_block, get, cfg, f"{names.body}encoder.layer.{i}."))
                  for i in range(cfg.num_layers)]


def _encoder_block(get, cfg: ModelConfig, p: str) -> dict:
  d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
  a = p + "attention."
  return {
      **{name: get(f"{a}self.{name}.weight").T.reshape(d, h, hd) for name in ("query", "key", "value")},
      **{f"{name}_bias": get(f"{a}self.{name}.bias").reshape(h, hd) for name in ("query", "key", "value")},
      "out": get(a + "output.dense.weight").T.reshape(h, hd, d),
      "out_bias": get(a + "output.dense.bias"),
      "attn_norm": _layer_norm(get, a + "output.LayerNorm"),
      "wi": {"kernel": get(p + "intermediate.dense.weight").T, "bias": get(p + "intermediate.dense.bias")},
      "wo": {"kernel": get(p + "output.dense.weight").T, "bias": get(p + "output.dense.bias")},
      "mlp_norm": _layer_norm(get, p + "output.LayerNorm"),
  }


def param_parts(tensors, cfg: ModelConfig) -> list:
  return encoder_parts(tensors, cfg, NAMES)


def is_encoder(cfg: ModelConfig) -> bool:
  """Whether the BERT layout holds this model (RoBERTa's too, with a position offset)."""
  return (cfg.norm == "layernorm" and cfg.norm_position == "post" and cfg.mlp in ("gelu", "gelu_tanh")
          and cfg.position == "learned" and cfg.embed_norm and cfg.qkv_bias and cfg.linear_bias
          and cfg.head_transform and cfg.head_bias and cfg.token_types >= 1 and not cfg.time_conditioning
          and cfg.kv_heads == cfg.num_heads and not cfg.local_window and not cfg.causal and not cfg.block_size)


def writes(cfg: ModelConfig) -> bool:
  return is_encoder(cfg) and cfg.position_offset == 0


def encoder_tensors(params, cfg: ModelConfig, names: Names):
  """(name, BERT-style tensor) pairs of a Transformer parameter tree, every table row kept; `params` may be
  any mapping of top-level parts (export reads one part at a time)."""
  d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
  e = names.body + "embeddings."
  norm = lambda name, tree: [(name + ".weight", tree["scale"]), (name + ".bias", tree["bias"])]
  yield e + "word_embeddings.weight", params["embed"]["embedding"]
  yield e + "position_embeddings.weight", params["pos_embed"]
  yield e + "token_type_embeddings.weight", params["type_embed"]
  yield from norm(e + "LayerNorm", params["embed_norm"])
  yield names.transform + ".weight", params["head_transform"]["kernel"].T
  yield names.transform + ".bias", params["head_transform"]["bias"]
  yield from norm(names.transform_norm, params["head_norm"])
  yield names.bias, params["head_bias"]
  if not cfg.tie_embeddings:
    yield names.decoder, params["head"]["kernel"].T
  for i in range(cfg.num_layers):
    b, q = params[f"block_{i}"], f"{names.body}encoder.layer.{i}."
    a = q + "attention."
    for name in ("query", "key", "value"):
      yield f"{a}self.{name}.weight", b[name].reshape(d, h * hd).T
      yield f"{a}self.{name}.bias", b[f"{name}_bias"].reshape(-1)
    yield a + "output.dense.weight", b["out"].reshape(h * hd, d).T
    yield a + "output.dense.bias", b["out_bias"]
    yield from norm(a + "output.LayerNorm", b["attn_norm"])
    yield q + "intermediate.dense.weight", b["wi"]["kernel"].T
    yield q + "intermediate.dense.bias", b["wi"]["bias"]
    yield q + "output.dense.weight", b["wo"]["kernel"].T
    yield q + "output.dense.bias", b["wo"]["bias"]
    yield from norm(q + "output.LayerNorm", b["mlp_norm"])


def tensors_of(params, cfg: ModelConfig):
  return encoder_tensors(params, cfg, NAMES)


def encoder_config(cfg: ModelConfig, tokenizer, names: Names, pad_id: int) -> dict:
  return {"architectures": [names.architecture], "model_type": names.model_type, "hidden_size": cfg.d_model,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "intermediate_size": cfg.mlp_dim, "hidden_act": "gelu" if cfg.mlp == "gelu" else "gelu_pytorch_tanh",
          "max_position_embeddings": cfg.max_len + cfg.position_offset, "type_vocab_size": cfg.token_types,
          "layer_norm_eps": cfg.norm_eps, "vocab_size": cfg.padded_vocab, "pad_token_id": pad_id,
          "tie_word_embeddings": cfg.tie_embeddings, "position_embedding_type": "absolute",
          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "torch_dtype": "float32",
          "mask_token_id": tokenizer.mask_id, "eos_token_id": tokenizer.eos_id}


def export_config(cfg: ModelConfig, tokenizer) -> dict:
  pad = tokenizer.tok.token_to_id("[PAD]") if tokenizer.kind == "hf" else None
  return encoder_config(cfg, tokenizer, NAMES, 0 if pad is None else pad)
