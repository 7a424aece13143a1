"""text8, character level, in MD4's setting: 12 layers x 768, sequences of 256, bits per character.

Sized for a TPU v5e 4x4 slice (16 chips, global batch 512):
  python -m diffusion_lm.train --config=configs/text8.py --workdir=/gcs/BUCKET/runs/text8
Offline, point at a local copy: --config.data.path=/path/to/text8.zip
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.update(source="text8", path="", seq_len=256, eval_split="validation")
  config.tokenizer.kind = "char"  # 27 symbols + end-of-document
  config.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, max_len=256,
                      dtype="bfloat16")
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2000, weight_decay=0.03, ema_decay=0.9999)
  config.training.update(batch_size=512, num_steps=1_000_000, log_every=100, eval_every=10_000,
                         sample_every=10_000, checkpoint_every=5_000)
  config.evaluation.update(batch_size=512, max_batches=0, num_t_samples=4)
  config.sampling.update(steps=256)
  return config
