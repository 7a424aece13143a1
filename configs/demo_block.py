"""Block diffusion twin of the demo (BD3-LM): the same network, data and budget, blocks of 4 tokens.

Inside a block tokens are masked and denoised bidirectionally; blocks are generated left to right
with an exact key/value cache, so each denoising step runs the network on 4 positions only.

  python -m diffusion_lm.train --config=configs/demo_block.py --workdir=runs/demo_block
  python -m diffusion_lm.sample --workdir=runs/demo_block --sampler=threshold --steps=4 --max_new_tokens=256
  python -m diffusion_lm.evaluate --workdir=runs/demo_block   # block-diffusion ELBO, bits/char
  python -m diffusion_lm.train --config=configs/demo_block.py:8 --workdir=runs/demo_block8   # blocks of 8
"""

from configs import demo


def get_config(arg=None):
  config = demo.get_config()
  config.objective = "block"
  config.model.block_size = int(arg) if arg else 4
  # Steps per block: an ancestral sampler with as many steps as block tokens reveals about one per step.
  config.sampling.update(steps=config.model.block_size)
  return config
