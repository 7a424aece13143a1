"""CPU demo: a small masked diffusion LM on the bundled Shakespeare corpus, in about 15 minutes on 2 CPU cores.

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
  # Sized for ~7 minutes on 2 CPU cores: at this budget a smaller model on more tokens beats a
  # wider one (d_model 256, batch 32: 3.19 vs 3.04 validation bits/char at equal wall time).
  # max_len only bounds the sequence length (RoPE has no per-position parameters): samples and
  # benchmarks may use sequences longer than the 64 tokens trained on.
  config.model.update(num_layers=4, d_model=192, num_heads=4, mlp_dim=576, max_len=256)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=100, ema_decay=0.99)
  config.training.update(batch_size=64, num_steps=700, log_every=25, eval_every=350, sample_every=350,
                         checkpoint_every=100)
  config.evaluation.update(batch_size=64, max_batches=16)
  config.sampling.update(steps=64, num_samples=3)
  return config
