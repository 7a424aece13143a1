"""CPU demo: a small masked diffusion LM on the bundled Shakespeare corpus, in under 10 minutes.

  pip install -r requirements.txt
  python -m diffusion_lm.train --config=configs/demo.py --workdir=runs/demo
  python -m diffusion_lm.sample --workdir=runs/demo --num_samples=4 --prompt="ROMEO."
  python -m diffusion_lm.evaluate --workdir=runs/demo
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.tokenizer.vocab_size = 1024
  config.data.seq_len = 64
  config.model.update(num_layers=4, d_model=256, num_heads=4, mlp_dim=768, max_len=64)
  config.optimizer.update(learning_rate=2e-3, warmup_steps=100, ema_decay=0.99)
  config.training.update(batch_size=32, num_steps=1500, log_every=25, eval_every=500, sample_every=500,
                         checkpoint_every=250)
  config.evaluation.update(batch_size=64, max_batches=16)
  config.sampling.update(steps=64, num_samples=3)
  return config
