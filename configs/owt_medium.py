"""OpenWebText at GPT-2-medium size (MDLM's "medium": 24 x 1024, 16 heads), data and optimizer as owt_small.py.

Sized for a TPU v5p 4x4x4 slice (64 chips: data 4 x FSDP 16, each a product of torus axes);
check without a TPU:
  python -m diffusion_lm.aot --config=configs/owt_medium.py --topology=v5p:4x4x4
"""

from configs import owt_small


def get_config(arg=None):
  config = owt_small.get_config(arg)
  config.model.update(num_layers=24, d_model=1024, num_heads=16, mlp_dim=4096)
  config.mesh.update(data=4, fsdp=-1, tensor=1)
  return config
