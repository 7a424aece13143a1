"""Tiny config for tests and smoke runs: seconds on a CPU.

  python -m diffusion_lm.train --config=configs/tiny.py --workdir=/tmp/tiny
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.tokenizer.kind = "char"
  config.data.seq_len = 32
  config.model.update(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_len=32)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=2, ema_decay=0.9)
  config.training.update(batch_size=8, num_steps=6, log_every=2, eval_every=0, sample_every=0,
                         checkpoint_every=3)
  config.evaluation.update(batch_size=8, max_batches=2, num_t_samples=2)
  config.sampling.update(steps=8, num_samples=2)
  return config
