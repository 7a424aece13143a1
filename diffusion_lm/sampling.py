"""The sampling entry point: `sample`, `SamplerConfig` and the conditioning helpers.

The strategies live in `diffusion_lm.samplers` (one module each); this module is the stable name
that the generator, the CLIs and user code import.
"""

from diffusion_lm.samplers import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
from diffusion_lm.samplers import __all__  # noqa: F401
