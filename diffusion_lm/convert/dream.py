"""Dream (model_type Dream): Qwen2 weights under Qwen2's names, bidirectional, the output at i predicting
token i + 1 (model.shift_logits), its own [MASK] id; imported as a masked diffusion model."""

from diffusion_lm.convert import llama

NAME = "dream"
param_parts = llama.param_parts


def matches(hf: dict) -> bool:
  return str(hf.get("model_type", "")).lower() == "dream" or "Dream" in " ".join(hf.get("architectures") or [])


def settings(folder: str, hf: dict) -> tuple[dict, str, dict]:
  del folder
  fields = llama.decoder_settings(hf, qkv_bias=True)
  fields.update(causal=False, shift_logits=True, mask_token_id=int(hf["mask_token_id"]))
  return fields, "diffusion", {"eos_id": llama.eos_of(hf), "mask_id": fields["mask_token_id"]}
