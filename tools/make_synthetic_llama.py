"""Writes a synthetic LLaMA-shaped Hugging Face folder (random weights) for measuring import and loading.

  python tools/make_synthetic_llama.py --out=/tmp/llama1b              # ~1.1B parameters (TinyLlama's shape)
  python tools/make_synthetic_llama.py --out=/tmp/llama_tiny --size=tiny

The folder is what `python -m diffusion_lm.convert --from_hf=` reads: config.json, bfloat16 safetensors
shards with model.safetensors.index.json (as LLaMA checkpoints come), and a small BPE tokenizer.json
(its ids lie below the model's vocabulary, as in tests/fixtures/hf). numpy + safetensors + tokenizers
only (no torch); each tensor is drawn and written shard by shard, so the tool holds one shard at a time.
"""

import argparse
import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SIZES = {
    # TinyLlama-1.1B's shape: 22 layers, d_model 2048, 32 heads / 4 kv heads, SwiGLU 5632, vocab 32000.
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=256),
}
TEXT = ("the quick brown fox jumps over the lazy dog. a tiny model reads a tiny story, "
        "and the story says: to be, or not to be, that is the question.\n") * 4


def tensor_shapes(hf: dict) -> dict[str, tuple[int, int] | tuple[int]]:
  """{name: shape} of LlamaForCausalLM's weights (Linear weights are [out, in])."""
  d, v, m = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
  kv = hf["num_key_value_heads"] * d // hf["num_attention_heads"]
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d),
                   p + "mlp.down_proj.weight": (d, m)})
  return shapes


def draw(rng: np.random.Generator, name: str, shape) -> np.ndarray:
  """Norm scales 1 + N(0, 0.02^2), matrices N(0, 0.02^2), in bfloat16."""
  x = rng.standard_normal(shape, dtype=np.float32) * 0.02
  if len(shape) == 1:
    x += 1.0
  return x.astype(ml_dtypes.bfloat16)


def write_tokenizer(folder: str) -> None:
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=60, special_tokens=["</s>", "<unk>", "<s>"],
                                                      show_progress=False))
  tok.save(os.path.join(folder, "tokenizer.json"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the folder to write (must not hold a config.json)")
  parser.add_argument("--size", default="1b", choices=sorted(SIZES))
  parser.add_argument("--shard_gib", type=float, default=1.0, help="bytes per safetensors shard, in GiB")
  parser.add_argument("--num_layers", type=int, default=0, help="override the size's layer count (0: keep)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if os.path.exists(os.path.join(args.out, "config.json")):
    raise SystemExit(f"error: --out={args.out!r} already holds a config.json; allowed: a new or empty folder")
  os.makedirs(args.out, exist_ok=True)
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 2, "eos_token_id": 0, "torch_dtype": "bfloat16",
        **SIZES[args.size]}
  if args.num_layers:
    hf["num_hidden_layers"] = args.num_layers
  with open(os.path.join(args.out, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  write_tokenizer(args.out)
  shapes = tensor_shapes(hf)
  limit = int(args.shard_gib * (1 << 30))
  groups, current, size = [], [], 0
  for name, shape in shapes.items():
    nbytes = 2 * int(np.prod(shape))
    if current and size + nbytes > limit:
      groups.append(current)
      current, size = [], 0
    current.append(name)
    size += nbytes
  groups.append(current)
  rng = np.random.default_rng(args.seed)
  files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  for file, names in zip(files, groups):
    save_file({name: draw(rng, name, shapes[name]) for name in names}, os.path.join(args.out, file),
              metadata={"format": "pt"})
  index = {"metadata": {"total_size": 2 * sum(int(np.prod(s)) for s in shapes.values())},
           "weight_map": {name: file for file, names in zip(files, groups) for name in names}}
  with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  count = sum(int(np.prod(s)) for s in shapes.values())
  largest = max(int(np.prod(s)) for s in shapes.values())
  print(f"wrote {args.out}: {count:,} parameters in {len(files)} bfloat16 shards; largest tensor {largest:,} "
        f"values ({2 * largest / 2**20:.0f} MiB bfloat16, {4 * largest / 2**20:.0f} MiB float32)")


if __name__ == "__main__":
  main()
