"""LM1B in MDLM's setting: sequences of 128 tokens, a 12 x 768 denoiser, batch 512.

Sized for a TPU v5e 4x4 slice (16 chips); check it fits without a TPU:
  python -m diffusion_lm.aot --config=configs/lm1b.py --topology=v5e:4x4
Train (the same command on every worker of the slice):
  python -m diffusion_lm.train --config=configs/lm1b.py --workdir=/gcs/BUCKET/runs/lm1b --distributed
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.update(source="tfds", tfds_name="lm1b", text_key="text", train_split="train",
                     eval_split="test", seq_len=128)
  config.tokenizer.update(kind="sentencepiece", vocab_size=32_000, max_sentences=2_000_000)
  config.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, max_len=128, dtype="bfloat16")
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2500, weight_decay=0.0, ema_decay=0.9999)
  config.training.update(batch_size=512, num_steps=1_000_000, log_every=100, eval_every=10_000,
                         sample_every=10_000, checkpoint_every=5_000)
  config.evaluation.update(batch_size=512, max_batches=0)
  config.sampling.update(steps=128, num_samples=8)
  return config
