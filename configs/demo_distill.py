"""Distil the CPU demo (configs/demo.py) into an 8-step sampler, on 2 CPU cores in under 10 minutes.

  python -m diffusion_lm.train --config=configs/demo.py --workdir=runs/demo            # the teacher
  python -m diffusion_lm.distill --config=configs/demo_distill.py --teacher_workdir=runs/demo \
      --workdir=runs/demo_distill
  python -m diffusion_lm.sample --workdir=runs/demo_distill --steps=8
  python -m diffusion_lm.evaluate --workdir=runs/demo_distill
"""

from configs import distill


def get_config(arg=None):
  config = distill.get_config(arg)
  # 64 -> 32 -> 16 -> 8: the demo teacher's quality plateaus by T = 64 on 64-token sequences.
  config.distill.update(start_steps=64, final_steps=8, factor=2, steps_per_round=120)
  config.training.update(batch_size=32, log_every=20, checkpoint_every=60)
  config.optimizer.update(learning_rate=3e-4, warmup_steps=20, ema_decay=0.95)
  return config
