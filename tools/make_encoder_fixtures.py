"""Makes the tiny encoder checkpoints of tests/fixtures/hf/{bert,roberta,modernbert} and their reference logits.

  python -m venv /work/venv-hf && /work/venv-hf/bin/pip install torch transformers numpy safetensors tokenizers
  /work/venv-hf/bin/python tools/make_encoder_fixtures.py            # rewrites the three folders
  /work/venv-hf/bin/python tools/make_encoder_fixtures.py --check_export=FOLDER --logits=OURS.npz

The sibling of tools/make_hf_fixtures.py (same layout: config.json, model.safetensors, tokenizer.json,
reference.npz = {"tokens": int32[B, L], "logits": float32[B, L, V]} from transformers' eager attention in
float32, every weight drawn at random, norm scales and biases included). The inputs hold the family's
[MASK] token and never its padding token (RoBERTa numbers positions after padding differently).

  bert        BertForMaskedLM: WordPiece with [CLS] [SEP] [MASK]; learned positions, two token types,
              post-LayerNorm blocks, GELU, the MLM transform and the tied decoder with its bias.
  roberta     RobertaForMaskedLM: byte-level BPE with <s> <pad> </s> <mask>; positions numbered from
              padding_idx + 1 = 2.
  modernbert  ModernBertForMaskedLM: BPE with [CLS] [SEP] [MASK]; pre-norm, GeGLU, no biases, three
              layers (global, sliding window, global) with a window of 4 (2 each side) shorter than the
              12 tokens, rotary bases 1000 (global) and 20 (local).

--check_export loads a folder that `diffusion_lm.convert --to_hf` wrote with AutoModelForMaskedLM and
compares its logits on OURS.npz's tokens with OURS.npz's logits (this project's); prints the largest
difference and exits 1 above 1e-4.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_hf_fixtures import OUT, TEXT, randomize, write  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB = 64
BATCH, LENGTH = 2, 12


def wordpiece_tokenizer() -> Tokenizer:
  """bert-base-uncased's pipeline at a tiny size: lower-casing, WordPiece, [CLS] x [SEP] framing."""
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  tok.train_from_iterator([TEXT], trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials,
                                                            show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                     special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tok


def bpe_tokenizer(specials, cls: str, sep: str, byte_level: bool) -> Tokenizer:
  """A BPE (byte level, RoBERTa's; else Metaspace words) with `specials` first and cls x sep framing."""
  tok = Tokenizer(models.BPE())
  if byte_level:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = []
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                initial_alphabet=alphabet[:0])
  tok.train_from_iterator([TEXT], trainer)
  ids = {t: tok.token_to_id(t) for t in (cls, sep)}
  tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
                                                     special_tokens=list(ids.items()))
  return tok


def inputs(mask_id: int, pad_id: int, seed: int) -> np.ndarray:
  """int32[B, L]: random ids (never padding), about 40% of them the family's [MASK]."""
  rng = np.random.default_rng(seed)
  allowed = np.array([i for i in range(VOCAB) if i != pad_id])
  tokens = rng.choice(allowed, (BATCH, LENGTH)).astype(np.int32)
  return np.where(rng.random((BATCH, LENGTH)) < 0.4, mask_id, tokens).astype(np.int32)


def logits_of(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy().astype(np.float32)


def save(model, folder: str, tok: Tokenizer, tokens: np.ndarray) -> np.ndarray:
  model.save_pretrained(folder)
  logits = logits_of(model, tokens)
  write(folder, tok, tokens, logits)
  return logits


def make_bert():
  tok = wordpiece_tokenizer()
  config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=24, max_position_embeddings=32, type_vocab_size=2,
                                   hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
                                   attn_implementation="eager")
  model = transformers.BertForMaskedLM(config).eval()
  randomize(model, 11)
  save(model, os.path.join(OUT, "bert"), tok, inputs(tok.token_to_id("[MASK]"), 0, 11))


def make_roberta():
  tok = bpe_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s>", "</s>", byte_level=True)
  config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=24, max_position_embeddings=34, type_vocab_size=1,
                                      hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                                      eos_token_id=2, attn_implementation="eager")
  model = transformers.RobertaForMaskedLM(config).eval()
  randomize(model, 12)
  with torch.no_grad():  # transformers keeps the padding row of the position table at zero
    model.roberta.embeddings.position_embeddings.weight[1].zero_()
  save(model, os.path.join(OUT, "roberta"), tok, inputs(tok.token_to_id("<mask>"), 1, 12))


def make_modernbert():
  tok = bpe_tokenizer(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"], "[CLS]", "[SEP]", byte_level=False)
  config = transformers.ModernBertConfig(
      vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, intermediate_size=24,
      max_position_embeddings=32, global_attn_every_n_layers=2, local_attention=4, global_rope_theta=1000.0,
      local_rope_theta=20.0, norm_eps=1e-5, pad_token_id=tok.token_to_id("[PAD]"), cls_token_id=1,
      sep_token_id=2, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
  model = transformers.ModernBertForMaskedLM(config).eval()
  randomize(model, 13)
  assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
  tokens = inputs(tok.token_to_id("[MASK]"), tok.token_to_id("[PAD]"), 13)
  logits = save(model, os.path.join(OUT, "modernbert"), tok, tokens)
  # The window must matter: with it opened to the whole sequence, the logits change.
  model.config.local_attention = 2 * LENGTH
  assert np.abs(logits_of(model, tokens) - logits).max() > 1e-3, "the sliding window does not bind"


def check_export(folder: str, ours_path: str) -> int:
  ours = np.load(ours_path)
  model = transformers.AutoModelForMaskedLM.from_pretrained(folder, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
  # The exported tables have this project's padded rows; the columns past the vocabulary are padding.
  theirs = logits_of(model, ours["tokens"])[..., :ours["logits"].shape[-1]]
  keep = np.arange(theirs.shape[-1]) != int(ours["mask_id"])  # [MASK] is never predicted by this project
  gap = float(np.abs(theirs[..., keep] - ours["logits"][..., keep]).max())
  print(f"{type(model).__name__} from {folder}: largest logit difference {gap:.2e}")
  return 0 if gap <= 1e-4 else 1


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--check_export")
  parser.add_argument("--logits")
  args = parser.parse_args()
  if args.check_export:
    sys.exit(check_export(args.check_export, args.logits))
  torch.manual_seed(0)
  for family, make in (("bert", make_bert), ("roberta", make_roberta), ("modernbert", make_modernbert)):
    shutil.rmtree(os.path.join(OUT, family), ignore_errors=True)
    make()
    files = sorted(os.listdir(os.path.join(OUT, family)))
    size = sum(os.path.getsize(os.path.join(OUT, family, f)) for f in files)
    print(f"{family}: {size / 1024:.1f} KiB ({', '.join(files)})")
    print(json.dumps(json.load(open(os.path.join(OUT, family, "config.json"))))[:2000])


if __name__ == "__main__":
  main()
