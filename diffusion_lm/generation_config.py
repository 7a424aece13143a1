"""Sampler defaults carried through Hugging Face folders (generation_config.json) and chosen per family.

Import: a model from LLaDA or Dream samples with its authors' decoder by default (samplers/published.py);
a folder's generation_config.json overrides that: this project's own section when the folder was exported
here (every sampler setting, so export -> import keeps the workdir's defaults), else Dream's keys (steps,
alg, alg_temp, eps, temperature, top_p, top_k). Export writes both.
"""

import dataclasses
import json
import os

from diffusion_lm import paths
from diffusion_lm.errors import UserError
from diffusion_lm.samplers.config import CONFIDENCE_ALIASES, SamplerConfig

FILE = "generation_config.json"
SECTION = "diffusion_lm_sampling"
FIELDS = tuple(f.name for f in dataclasses.fields(SamplerConfig))
# Dream's alg names for the confidences, both ways.
_DREAM_ALG = {"max_prob": "maskgit_plus", "margin": "topk_margin", "entropy": "entropy", "random": "origin"}

# The authors' documented settings: LLaDA's generate (steps = gen_length, blocks of 32, temperature 0,
# low_confidence); Dream's diffusion_generate examples (entropy, temperature 0.2 / top_p 0.95 in its README;
# deterministic here: temperature 0).
FAMILY_DEFAULTS = {
    "llada": {"name": "llada", "steps": 128, "block_length": 32, "temperature": 0.0, "confidence": "max_prob"},
    "dream": {"name": "dream", "steps": 128, "block_length": 0, "temperature": 0.0, "confidence": "entropy"},
}


def sampling_defaults(folder: str, family: str) -> dict:
  """config.sampling values for a model imported from `folder` of this family (may be empty)."""
  values = dict(FAMILY_DEFAULTS.get(family, {}))
  path = os.path.join(folder, FILE)
  if not os.path.isfile(path):
    return values
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is not valid JSON ({e}); allowed: a generation_config.json file, or none") from e
  if not isinstance(raw, dict):
    raise UserError(f"{path} holds {type(raw).__name__}, not a JSON object; allowed: a generation_config.json")
  if isinstance(raw.get(SECTION), dict):
    own = {k: v for k, v in raw[SECTION].items() if k in FIELDS}
    return {**values, **own}
  if family == "dream":
    for key in ("steps", "eps", "alg_temp", "temperature", "top_p", "top_k"):
      if raw.get(key) is not None:
        values[key] = raw[key]
    if raw.get("alg") is not None:
      alg = CONFIDENCE_ALIASES.get(raw["alg"], raw["alg"])
      if alg not in _DREAM_ALG:
        raise UserError(f"{path}: alg={raw['alg']!r}; allowed: {', '.join(_DREAM_ALG.values())}")
      values["confidence"] = alg
  return values


def apply_defaults(config, values: dict) -> None:
  """Writes `values` into config.sampling (checked as one SamplerConfig first)."""
  current = {k: config.sampling[k] for k in FIELDS if k in config.sampling}
  SamplerConfig(**{**current, **values})  # one-line errors for bad values
  for key, value in values.items():
    config.sampling[key] = value


def write(folder: str, sampling_config, mask_id: int) -> str:
  """Writes generation_config.json from a workdir's config.sampling; returns the file name."""
  cfg = SamplerConfig(**{k: sampling_config[k] for k in FIELDS if k in sampling_config})
  own = dataclasses.asdict(cfg)
  out = {SECTION: own, "mask_token_id": mask_id, "steps": cfg.steps, "temperature": cfg.temperature,
         "top_p": cfg.top_p if cfg.top_p < 1 else None, "top_k": cfg.top_k or None,
         "alg": _DREAM_ALG[cfg.confidence], "alg_temp": cfg.alg_temp or None, "eps": cfg.eps}
  paths.write_bytes(paths.join(folder, FILE), json.dumps(out, indent=2).encode())
  return FILE
