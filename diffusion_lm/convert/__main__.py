"""python -m diffusion_lm.convert: see diffusion_lm/convert/__init__.py."""

from absl import app

from diffusion_lm.convert import define_flags, main
from diffusion_lm.errors import parse_flags

if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
