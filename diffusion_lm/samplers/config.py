"""SamplerConfig: what every strategy reads, checked once with one-line errors."""

import dataclasses

import numpy as np

from diffusion_lm.errors import UserError

SAMPLERS = ("ancestral", "confidence", "blocks", "threshold", "remdm", "llada", "fast_dllm", "dream")
PUBLISHED = ("llada", "fast_dllm", "dream")  # the authors' decoders, token for token (samplers/published.py)
CONFIDENCES = ("max_prob", "margin", "entropy", "random")
# The references' names for the same confidences (LLaDA remasking=, Dream alg=).
CONFIDENCE_ALIASES = {"low_confidence": "max_prob", "maskgit_plus": "max_prob", "topk_margin": "margin",
                      "origin": "random"}
COMMIT_SCHEDULES = ("linear", "cosine")
TIME_GRIDS = ("uniform", "cosine")
REMASK_SCHEDULES = ("cap", "rescale", "conf", "loop")
APPROX_CACHES = ("none", "prefix", "dual")
FINAL_STEPS = ("auto", "argmax", "sample")
TOP_P_RULES = ("auto", "within", "reach")
# Where MDLM's and ReMDM's time grid ends (their sampling eps) when the last step is followed by an argmax.
FINAL_T = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to sample; built from `config.sampling` and command-line flags."""

  name: str = "ancestral"
  steps: int = 64  # denoiser steps T (threshold: the most it may take; it stops early when done)
  temperature: float = 1.0  # 0 = argmax
  top_k: int = 0  # keep the k most likely tokens (0 = all)
  top_p: float = 1.0  # nucleus: keep the smallest set with this much probability (1 = all)
  float64: bool = False  # draw categorical samples with float64 Gumbel noise
  time_grid: str = "uniform"  # ancestral/remdm: uniform | cosine
  cache: bool = True  # ancestral/remdm: reuse logits when a step changed nothing (time-independent models)
  confidence: str = "max_prob"  # confidence/blocks/threshold, and remdm's conf schedule: how sure a prediction is
  commit_schedule: str = "linear"  # confidence/blocks: how many to commit per step
  block_length: int = 32  # blocks: tokens per block
  approx_cache: str = "none"  # blocks on a bidirectional model: none | prefix | dual (Fast-dLLM; approximate)
  threshold: float = 0.9  # threshold, fast_dllm: commit predictions at least this confident (fast_dllm: 0 = off)
  factor: float = 0.0  # fast_dllm: factor-based parallel decoding (0 = off)
  eps: float = 1e-3  # dream: the time grid ends at eps (linspace(1, eps, steps + 1))
  alg_temp: float = 0.0  # dream: > 0 samples the positions to reveal from softmax(confidence / alg_temp)
  logits_eos_inf: bool = False  # llada, fast_dllm: never draw the end-of-text token (LLaDA's option)
  confidence_eos_eot_inf: bool = False  # llada, fast_dllm: end-of-text / end-of-turn drafts get no confidence
  confidence_rounding: int = 0  # confidence, blocks, threshold: round confidences to 2^-n before ranking (0 = exact)
  remask_schedule: str = "cap"  # remdm: cap | rescale | conf | loop (Wang et al. 2025)
  remask_eta: float = 0.05  # remdm: eta of cap / rescale / loop (unused by conf)
  remask_t_on: float = 1.0  # remdm: remasking only while t_off < t <= t_on (switch); loop: its window
  remask_t_off: float = 0.0
  remask_alpha_on: float = 0.9  # remdm loop: alpha held inside the loop window
  guidance: float = 0.0  # classifier-free guidance weight on the given tokens (0 = off)
  # ancestral/remdm: argmax = MDLM's / ReMDM's noise_removal (the grid ends at t = FINAL_T, then positions
  # still masked take the argmax of one more denoiser pass); sample = the grid ends at 0 and the last step
  # reveals every position by a draw. auto: argmax, except inside block decoding (BD3-LM has no such pass).
  final_step: str = "auto"
  # within = ReMDM's / BD3-LM's nucleus (tokens whose cumulative mass, their own included, is <= top_p; the top
  # one always); reach = the smallest set whose mass reaches top_p (transformers). auto: within for ancestral
  # and remdm, reach for the others.
  top_p_rule: str = "auto"

  @property
  def threshold_decoding(self) -> bool:
    """fast_dllm: whether steps commit by threshold (else by factor, else by LLaDA's counts)."""
    return self.threshold > 0 and self.factor == 0

  def __post_init__(self):
    if self.confidence in CONFIDENCE_ALIASES:
      object.__setattr__(self, "confidence", CONFIDENCE_ALIASES[self.confidence])
    _choice("sampler", self.name, SAMPLERS)
    _choice("confidence", self.confidence, CONFIDENCES)
    _choice("commit_schedule", self.commit_schedule, COMMIT_SCHEDULES)
    _choice("time_grid", self.time_grid, TIME_GRIDS)
    _choice("remask_schedule", self.remask_schedule, REMASK_SCHEDULES)
    _choice("approx_cache", self.approx_cache, APPROX_CACHES)
    _choice("final_step", self.final_step, FINAL_STEPS)
    _choice("top_p_rule", self.top_p_rule, TOP_P_RULES)
    if self.approx_cache != "none" and self.name not in ("blocks", "fast_dllm"):
      raise UserError(f"approx_cache={self.approx_cache!r} with sampler={self.name!r}; allowed: the blocks or "
                      "fast_dllm sampler (or approx_cache='none')")
    if self.approx_cache != "none" and self.guidance > 0:
      raise UserError(f"approx_cache={self.approx_cache!r} with guidance={self.guidance}; allowed: one of the two")
    check_steps(self.steps)
    if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
      raise UserError(f"temperature={self.temperature}; allowed: a number >= 0")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise UserError(f"top_k={self.top_k}; allowed: an integer >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p}; allowed: 0 < top_p <= 1")
    off_allowed = self.name == "fast_dllm"
    if not (0 < self.threshold <= 1 or (off_allowed and self.threshold == 0)):
      raise UserError(f"threshold={self.threshold}; allowed: 0 < threshold <= 1" +
                      (" (0 = off)" if off_allowed else ""))
    if not 0 <= self.factor:
      raise UserError(f"factor={self.factor}; allowed: a number >= 0 (0 = off)")
    if not 0 < self.eps < 1:
      raise UserError(f"eps={self.eps}; allowed: 0 < eps < 1")
    if not self.alg_temp >= 0:
      raise UserError(f"alg_temp={self.alg_temp}; allowed: a number >= 0 (0 = off)")
    if not (isinstance(self.confidence_rounding, int) and 0 <= self.confidence_rounding <= 24):
      raise UserError(f"confidence_rounding={self.confidence_rounding}; allowed: an integer 0..24 (0 = exact)")
    if self.name in PUBLISHED and self.confidence == "margin" and self.name != "dream":
      raise UserError(f"confidence='margin' with sampler={self.name!r}; allowed: max_prob (low_confidence) or "
                      "random")
    if self.name in PUBLISHED and self.confidence == "entropy" and self.name != "dream":
      raise UserError(f"confidence='entropy' with sampler={self.name!r}; allowed: max_prob (low_confidence) or "
                      "random")
    if not 0 <= self.remask_eta <= 1:
      raise UserError(f"remask_eta={self.remask_eta}; allowed: 0 <= remask_eta <= 1")
    if not 0 <= self.remask_t_off <= self.remask_t_on <= 1:
      raise UserError(f"remask_t_on={self.remask_t_on}, remask_t_off={self.remask_t_off}; allowed: "
                      "0 <= t_off <= t_on <= 1")
    if not 0 < self.remask_alpha_on < 1:
      raise UserError(f"remask_alpha_on={self.remask_alpha_on}; allowed: 0 < alpha_on < 1")
    if self.name == "remdm" and self.remask_schedule == "loop":
      # Inside the loop alpha is constant; the posterior stays a distribution only while
      # eta <= (1 - alpha_on) / alpha_on.
      limit = (1.0 - self.remask_alpha_on) / self.remask_alpha_on
      if self.remask_eta > limit:
        raise UserError(f"remask_eta={self.remask_eta} with remask_alpha_on={self.remask_alpha_on}; allowed: "
                        f"eta <= (1 - alpha_on) / alpha_on = {limit:.4g}")
      if not 0 < self.remask_t_off < self.remask_t_on < 1:
        raise UserError(f"remask_t_on={self.remask_t_on}, remask_t_off={self.remask_t_off} for the loop; "
                        "allowed: 0 < t_off < t_on < 1 (e.g. 0.55 and 0.05)")
    low = 0 if self.name in PUBLISHED else 1
    if not (isinstance(self.block_length, int) and self.block_length >= low):
      raise UserError(f"block_length={self.block_length}; allowed: an integer >= {low}" +
                      (" (0 = one block)" if low == 0 else ""))
    if self.guidance < 0:
      raise UserError(f"guidance={self.guidance}; allowed: a number >= 0")

  @property
  def argmax_last(self) -> bool:
    """ancestral/remdm end with MDLM's noise removal (see final_step)."""
    return self.final_step != "sample"

  @property
  def nucleus_rule(self) -> str:
    """within | reach: top_p_rule with auto resolved for this sampler."""
    if self.top_p_rule != "auto":
      return self.top_p_rule
    return "within" if self.name in ("ancestral", "remdm") else "reach"

  def check_length(self, length: int, num_masked: int) -> None:
    """Checks the settings against a sequence of `length` with `num_masked` positions to fill."""
    if self.name == "blocks":
      if length % self.block_length:
        raise UserError(f"block_length={self.block_length} does not divide the sequence length {length};"
                        f" allowed: a divisor of {length}")
      num_blocks = length // self.block_length
      if self.steps % num_blocks:
        raise UserError(f"steps={self.steps} is not a multiple of the {num_blocks} blocks; allowed: a "
                        f"multiple of {num_blocks}")
      if self.steps // num_blocks > self.block_length:
        raise UserError(f"steps={self.steps} gives {self.steps // num_blocks} steps per block of "
                        f"{self.block_length} tokens; allowed: at most {self.block_length * num_blocks}")
    if self.name in PUBLISHED:
      return  # checked against the prompt's end by samplers/published.check
    if self.name == "confidence" and self.steps > num_masked:
      raise UserError(f"steps={self.steps} exceeds the {num_masked} positions to generate; the confidence "
                      f"sampler commits at least one per step: allowed at most {num_masked}")


def _choice(name, value, allowed):
  if value not in allowed:
    raise UserError(f"{name}={value!r}; allowed: {', '.join(allowed)}")


def check_steps(steps) -> None:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise UserError(f"steps={steps!r}; allowed: an integer >= 1")
