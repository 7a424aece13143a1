"""LM1B as BD3-LM trains and scores it (its `data=lm1b-wrap`), so perplexities land in its LM1B table's units.

The data, as the MDLM / BD3-LM code builds them: LM1B sentences (tfds lm1b: the same sentences as the Hub's
lm1b) with the spaced punctuation undone (data.detokenize=lm1b), tokenized by bert-base-uncased's WordPiece
without special tokens, each followed by an end-of-sentence id, packed, and cut into windows of
126 tokens framed by that id at both ends (128 in all). That id is [CLS]: their code takes the id of the
first token of `tokenizer.encode(eos_token)`, which a BERT tokenizer starts with [CLS]. Validation is the
test split, scored whole; position 0 (always [CLS]) is never masked in training and is left out of the
per-token average (their ignore_bos; data.ignore_bos, on by default for framed windows). Optimizer and schedule follow theirs: AdamW 3e-4, betas (0.9, 0.999), no weight
decay, 2,500 warmup steps then constant, gradient clip 1, EMA 0.9999, batch 512, 1M steps; the denoiser
is this project's Transformer at their "small" width and depth (12 x 768, 12 heads).
Not the MDLM paper's LM1B table: that one pads each sentence to 128 tokens ([CLS] s [SEP] [PAD]...).

The tokenizer file, downloaded once (nothing downloads it at run time):
  curl -L -o bert-base-uncased.json https://huggingface.co/bert-base-uncased/resolve/main/tokenizer.json
Sized for a TPU v5e 4x4 slice (16 chips); check it fits without a TPU:
  python -m diffusion_lm.aot --config=configs/lm1b.py --topology=v5e:4x4
Train (the same command on every worker of the slice):
  python -m diffusion_lm.train --config=configs/lm1b.py --workdir=gs://BUCKET/runs/lm1b --distributed \\
    --config.tokenizer.hf_path=bert-base-uncased.json
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.update(source="tfds", tfds_name="lm1b", text_key="text", train_split="train",
                     eval_split="test", seq_len=128, detokenize="lm1b", frame_windows=True)
  config.tokenizer.update(kind="hf", hf_path="", hf_eos_token="[CLS]", vocab_size=30_522)
  config.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, max_len=128, dtype="bfloat16")
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2500, decay="constant", b1=0.9, b2=0.999,
                          weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999)
  config.training.update(batch_size=512, num_steps=1_000_000, log_every=100, eval_every=10_000,
                         sample_every=10_000, checkpoint_every=5_000)
  config.evaluation.update(batch_size=512, max_batches=0)
  config.sampling.update(steps=128, num_samples=8)
  return config
