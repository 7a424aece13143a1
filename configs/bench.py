"""Benchmark config: a model wide enough that its matmuls dominate the train step on a CPU.

  python -m diffusion_lm.bench --config=configs/bench.py --parts=train
"""

from configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.data.seq_len = 256
  config.model.update(num_layers=4, d_model=1024, num_heads=8, mlp_dim=2816, max_len=256)
  config.training.batch_size = 8
  return config
