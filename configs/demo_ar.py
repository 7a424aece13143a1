"""The autoregressive baseline of the demo: the same network and budget with causal attention.

  python -m diffusion_lm.train --config=configs/demo_ar.py --workdir=runs/demo_ar
  python -m diffusion_lm.evaluate --workdir=runs/demo_ar   # exact bits/char, to compare with the demo's bound
"""

from configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.objective = "ar"
  return config
