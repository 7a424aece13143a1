"""MD4's character-level model at small width, for side-by-side speed comparisons with MD4's own code.

Mirrors MD4's text8 setting (character vocabulary, sequences of 256, linear schedule, no time
conditioning, float32) at the width of its small CPU runs: 4 layers x 256, 4 heads, gated MLP 704,
batch 32, about 3.27M parameters (with the 96-symbol stand-in vocabulary `bench` uses for char configs).

  python -m diffusion_lm.bench --config=configs/md4_char.py --parts=train,sampling --train_steps=10 \
      --batches=32 --seq_len=256 --steps=256 --samplers=ancestral
  python -m diffusion_lm.train --config=configs/md4_char.py --workdir=runs/md4_char   # on the bundled corpus
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.tokenizer.kind = "char"
  config.data.seq_len = 256
  config.model.update(num_layers=4, d_model=256, num_heads=4, mlp_dim=704, max_len=256, dtype="float32",
                      time_conditioning=False)
  config.diffusion.name = "linear"
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2000, ema_decay=0.9999)
  config.training.batch_size = 32
  config.sampling.update(name="ancestral", steps=256)
  return config
