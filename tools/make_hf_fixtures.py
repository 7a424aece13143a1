"""Makes the tiny Hugging Face checkpoints of tests/fixtures/hf and their reference logits.

  pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install transformers
  python tools/make_hf_fixtures.py  # rewrites tests/fixtures/hf/<family>/

Needs torch and transformers, which the project itself never imports: the committed folders let the
tests compare imported logits with these PyTorch references without either installed. Each folder is
what a user would point `--from_hf` at (config.json, safetensors, tokenizer.json) plus
reference.npz = {"tokens": int32[B, L], "logits": float32[B, L, V]}, computed in float32 by
transformers' eager attention. Every weight (norm scales and biases included) is drawn at random, so a
mis-mapped tensor cannot hide behind an initialisation of ones or zeros.

Families:
  llama  LlamaForCausalLM: grouped-query attention, llama3 rope scaling, untied head; sharded safetensors
         with an index; config.json in the older rope_theta / rope_scaling layout.
  qwen2  Qwen2ForCausalLM: q/k/v biases, tied embeddings; config.json in transformers' current layout.
  gpt2   GPT2LMHeadModel: learned positions, LayerNorm with biases, GELU (tanh), tied embeddings.
  llada  LLaDA (not in transformers): LlamaForCausalLM run with a full bidirectional attention mask, its
         weights saved under LLaDA's names and config.json in LLaDA's layout. The mapping follows LLaDA's
         public modeling_llada.py (LLaDALlamaBlock): wte = embed_tokens, blocks.i.{q,k,v}_proj,
         attn_out = o_proj, attn_norm = input_layernorm, ff_norm = post_attention_layernorm,
         ff_proj = gate_proj (the SiLU branch), up_proj = up_proj, ff_out = down_proj, ln_f = norm,
         transformer.ff_out = lm_head; its RMSNorm, rotate-half RoPE and non-causal SDPA are Llama's.
  dream  Dream (not in transformers): Qwen2ForCausalLM run with a full bidirectional mask (Dream is
         Qwen2 with non-causal attention, the same parameter names); config.json says model_type
         "Dream" and its mask_token_id. The reference is the raw output, in which position i predicts
         token i + 1.
"""

import json
import os
import shutil

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hf")
VOCAB = 64  # model vocabulary (embedding rows); the tokenizer uses ids below it
BATCH, LENGTH = 2, 12
EOS, MASK = "<|endoftext|>", "<|mask|>"
TEXT = ("the quick brown fox jumps over the lazy dog. a tiny model reads a tiny story, "
        "and the story says: to be, or not to be, that is the question.\n") * 4


def make_tokenizer() -> Tokenizer:
  """A small BPE over characters (Metaspace words) with the end-of-text and mask tokens as specials."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 4, special_tokens=[EOS, "<unk>", MASK], show_progress=False)
  tok.train_from_iterator([TEXT], trainer)
  return tok


def randomize(model, seed: int) -> None:
  """Every parameter drawn: matrices N(0, 0.3^2), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim == 1 and ("norm" in name.lower() or "ln_" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.3 * noise)


def reference_logits(model, tokens: np.ndarray, bidirectional: bool) -> np.ndarray:
  ids = torch.tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    if bidirectional:
      # A 4-D additive mask is used as given: zeros let every position attend to every position.
      mask = torch.zeros((ids.shape[0], 1, ids.shape[1], ids.shape[1]), dtype=torch.float32)
      for layer in model.model.layers:
        layer.self_attn.is_causal = False
      out = model(input_ids=ids, attention_mask=mask).logits
    else:
      out = model(input_ids=ids).logits
  return out.numpy().astype(np.float32)


def check_bidirectional(model, tokens: np.ndarray, logits: np.ndarray) -> None:
  """The first position's logits must depend on the last token, else the mask was ignored."""
  changed = tokens.copy()
  changed[:, -1] = (changed[:, -1] + 1) % VOCAB
  other = reference_logits(model, changed, bidirectional=True)
  assert np.abs(other[:, 0] - logits[:, 0]).max() > 1e-3, "bidirectional mask ignored"


def write(folder: str, tok: Tokenizer, tokens: np.ndarray, logits: np.ndarray) -> None:
  if os.path.exists(os.path.join(folder, "generation_config.json")):
    os.remove(os.path.join(folder, "generation_config.json"))  # sampling defaults of transformers: not read
  tok.save(os.path.join(folder, "tokenizer.json"))
  np.savez_compressed(os.path.join(folder, "reference.npz"), tokens=tokens, logits=logits)


def save_llada(model, folder: str, mask_id: int, eos_id: int) -> None:
  """Saves a LlamaForCausalLM's weights under LLaDA's names with LLaDA's config.json."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  c = model.config
  names = {"model.embed_tokens.weight": "model.transformer.wte.weight",
           "model.norm.weight": "model.transformer.ln_f.weight", "lm_head.weight": "model.transformer.ff_out.weight"}
  per_layer = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
               "self_attn.o_proj": "attn_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
               "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
  tensors = {}
  for name, p in model.state_dict().items():
    if name in names:
      tensors[names[name]] = p.numpy()
      continue
    _, _, index, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    tensors[f"model.transformer.blocks.{index}.{per_layer[module]}.{kind}"] = p.numpy()
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"),
            metadata={"format": "pt"})
  config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": c.hidden_size,
            "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers,
            "mlp_hidden_size": c.intermediate_size, "mlp_ratio": 4, "vocab_size": c.vocab_size,
            "embedding_size": c.vocab_size, "max_sequence_length": c.max_position_embeddings,
            "rope_theta": c.rope_parameters["rope_theta"], "rms_norm_eps": c.rms_norm_eps, "mask_token_id": mask_id,
            "eos_token_id": eos_id, "pad_token_id": eos_id, "weight_tying": False, "include_bias": False,
            "include_qkv_bias": False, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
            "rope": True, "alibi": False, "input_emb_norm": False, "scale_logits": False, "block_group_size": 1}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def main():
  torch.manual_seed(0)
  tok = make_tokenizer()
  vocab = tok.get_vocab()
  eos_id, mask_id = vocab[EOS], vocab[MASK]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  masked_tokens = np.where(rng.random((BATCH, LENGTH)) < 0.4, mask_id, tokens).astype(np.int32)
  shutil.rmtree(OUT, ignore_errors=True)
  common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, rms_norm_eps=1e-5, eos_token_id=eos_id, bos_token_id=eos_id,
                attn_implementation="eager")

  # llama: GQA, llama3 rope scaling (original context 8 so that short test sequences feel it), untied.
  folder = os.path.join(OUT, "llama")
  os.makedirs(folder)
  config = transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8})
  model = transformers.LlamaForCausalLM(config).eval()
  randomize(model, 1)
  model.save_pretrained(folder, max_shard_size="20KB")
  with open(os.path.join(folder, "config.json")) as f:
    payload = json.load(f)
  rope = payload.pop("rope_parameters")
  payload["rope_theta"] = rope.pop("rope_theta")
  payload["rope_scaling"] = rope
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(payload, f, indent=2)
  write(folder, tok, tokens, reference_logits(model, tokens, bidirectional=False))

  # qwen2: q/k/v biases, tied embeddings.
  folder = os.path.join(OUT, "qwen2")
  config = transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
  model = transformers.Qwen2ForCausalLM(config).eval()
  randomize(model, 2)
  model.save_pretrained(folder)
  write(folder, tok, tokens, reference_logits(model, tokens, bidirectional=False))

  # gpt2: learned positions, LayerNorm, GELU (tanh), tied.
  folder = os.path.join(OUT, "gpt2")
  config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                   activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=eos_id,
                                   eos_token_id=eos_id, attn_implementation="eager")
  model = transformers.GPT2LMHeadModel(config).eval()
  randomize(model, 3)
  model.save_pretrained(folder)
  write(folder, tok, tokens, reference_logits(model, tokens, bidirectional=False))

  # llada: Llama with bidirectional attention, LLaDA's names and config; inputs hold [MASK]s.
  folder = os.path.join(OUT, "llada")
  os.makedirs(folder)
  config = transformers.LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0})
  model = transformers.LlamaForCausalLM(config).eval()
  randomize(model, 4)
  save_llada(model, folder, mask_id, eos_id)
  logits = reference_logits(model, masked_tokens, bidirectional=True)
  check_bidirectional(model, masked_tokens, logits)
  write(folder, tok, masked_tokens, logits)

  # dream: Qwen2 with bidirectional attention and shifted prediction; inputs hold [MASK]s.
  folder = os.path.join(OUT, "dream")
  config = transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
  model = transformers.Qwen2ForCausalLM(config).eval()
  randomize(model, 5)
  model.save_pretrained(folder)
  logits = reference_logits(model, masked_tokens, bidirectional=True)
  check_bidirectional(model, masked_tokens, logits)
  with open(os.path.join(folder, "config.json")) as f:
    payload = json.load(f)
  payload.update({"model_type": "Dream", "architectures": ["DreamModel"], "mask_token_id": mask_id,
                  "pad_token_id": eos_id})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(payload, f, indent=2)
  write(folder, tok, masked_tokens, logits)
  for family in sorted(os.listdir(OUT)):
    files = sorted(os.listdir(os.path.join(OUT, family)))
    size = sum(os.path.getsize(os.path.join(OUT, family, f)) for f in files)
    print(f"{family}: {size / 1024:.1f} KiB ({', '.join(files)})")


if __name__ == "__main__":
  main()
