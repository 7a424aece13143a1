"""RoBERTa (RobertaForMaskedLM): BERT's network (convert/bert.py) under RoBERTa's names, one token type,
and positions numbered from padding_idx + 1 (model.position_offset; the table's first rows are kept for
export). A padding token inside a sequence is not renumbered as transformers does (this project pads
with end-of-text, never with <pad>)."""

from diffusion_lm.convert import bert
from diffusion_lm.model import ModelConfig

NAME = "roberta"
DATA = bert.DATA
NAMES = bert.Names(body="roberta.", transform="lm_head.dense", transform_norm="lm_head.layer_norm",
                   bias="lm_head.bias", decoder="lm_head.decoder.weight", architecture="RobertaForMaskedLM",
                   model_type="roberta")


def matches(hf: dict) -> bool:
  return str(hf.get("model_type", "")).lower() in ("roberta", "xlm-roberta")


def settings(folder: str, hf: dict) -> tuple[dict, str, dict]:
  return bert.encoder_settings(folder, hf, position_offset=int(hf.get("pad_token_id", 1)) + 1)


def param_parts(tensors, cfg: ModelConfig) -> list:
  return bert.encoder_parts(tensors, cfg, NAMES)


def writes(cfg: ModelConfig) -> bool:
  return bert.is_encoder(cfg) and cfg.position_offset > 0


def tensors_of(params, cfg: ModelConfig):
  return bert.encoder_tensors(params, cfg, NAMES)


def export_config(cfg: ModelConfig, tokenizer) -> dict:
  return bert.encoder_config(cfg, tokenizer, NAMES, pad_id=cfg.position_offset - 1)
