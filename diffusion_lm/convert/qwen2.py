"""Qwen2 (Qwen2ForCausalLM): the LLaMA layout plus q/k/v biases; imported as an autoregressive model.
Exported through convert/llama.py, whose config.json says qwen2 where the model has q/k/v biases."""

from diffusion_lm.convert import llama

NAME = "qwen2"
param_parts = llama.param_parts


def matches(hf: dict) -> bool:
  return str(hf.get("model_type", "")).lower() == "qwen2"


def settings(folder: str, hf: dict) -> tuple[dict, str, dict]:
  del folder
  return llama.decoder_settings(hf, qkv_bias=True), "ar", {"eos_id": llama.eos_of(hf), "mask_id": -1}
