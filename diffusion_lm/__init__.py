"""diffusion_lm: masked discrete diffusion language models in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
  """`diffusion_lm.load(workdir)` and friends, imported on first use (the command lines stay quick)."""
  if name in ("load", "Run", "Table", "read_metrics"):
    from diffusion_lm import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'diffusion_lm' has no attribute {name!r}")
