"""Python API for notebooks and scripts: open a trained workdir, generate, evaluate, read its metrics.

  import diffusion_lm
  run = diffusion_lm.load("runs/demo")  # or gs://bucket/run
  run.generate(prompt="ROMEO.", num_samples=2, sampler="confidence", steps=32)  # -> list of str
  run.generate(infill="To be, [MASK*8] the question.")
  run.evaluate()  # -> dict: bits_per_char, perplexity bound, ...
  run.metrics()  # -> Table of metrics.jsonl, one row per logged step

The command lines call the same functions: `python -m diffusion_lm.sample` is `generate` plus
printing, `python -m diffusion_lm.evaluate` is `evaluate` plus the generated-sample figures.
"""

import dataclasses
import json
import math
import os

import ml_collections
import numpy as np

from diffusion_lm import experiment, objectives, paths, sampling
from diffusion_lm.errors import UserError, check_seed
from diffusion_lm.generation import Generator, sampler_config

# Sampler settings a caller may override (the fields of sampling.SamplerConfig but its name).
SAMPLER_SETTINGS = tuple(f.name for f in dataclasses.fields(sampling.SamplerConfig) if f.name != "name")


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass
class Generation:
  """What one `generate_tokens` call made."""

  texts: list  # decoded samples, each cut after its end-of-document token (AR / block models)
  output: sampling.SampleOutput  # host arrays: tokens int32[B, L], trajectory int32[S, B, L], ...
  template: np.ndarray  # the initial tokens int32[B, L] ([MASK] where generated)
  sampler: sampling.SamplerConfig
  seq_len: int
  seed: int
  step: int  # checkpoint step of the parameters
  block_size: int  # tokens per block of a block-diffusion model (its steps count per block), else 0
  mask_id: int = -1  # the [MASK] id of the template

  def describe(self) -> str:
    per = f" per {self.block_size}-token block" if self.block_size else ""
    cfg = self.sampler
    cache = f" with the approximate {cfg.approx_cache} cache" if cfg.approx_cache != "none" else ""
    if cfg.name == "fast_dllm" and cfg.factor > 0:
      steps = f"factor {cfg.factor:g} (no step budget)"
    elif cfg.name == "fast_dllm" and cfg.threshold_decoding:
      steps = f"threshold {cfg.threshold:g} (no step budget)"
    else:
      steps = f"{cfg.steps} steps{per}{' (max)' if cfg.name == 'threshold' else ''}"
    return (f"{len(self.texts)} samples, {self.seq_len} tokens, {cfg.name} sampler{cache}, {steps}, seed {self.seed}, "
            f"checkpoint step {self.step}")

  def forward_summary(self) -> str:
    """Forward passes of the run and generated tokens per forward pass (per sequence)."""
    generated = float(np.mean(np.sum(self.template == self.mask_id, axis=1)))
    calls = int(self.output.num_calls)
    return f"forward passes {calls}, {generated / max(calls, 1):.2f} tokens per forward"


def generation_length(trained, seq_len=None, max_new_tokens=None, prompt="", suffix="", infill="") -> int:
  """Tokens per sample: seq_len, or the prompt's length plus max_new_tokens (rounded up to whole blocks
  for block-diffusion models), or the training length."""
  model_config = trained.model.config
  length = trained.config.data.seq_len if seq_len is None else seq_len
  if max_new_tokens is not None:
    if seq_len is not None or suffix or infill:
      raise UserError("max_new_tokens sets the length after the prompt; allowed: with a prompt only (no "
                      "seq_len, suffix or infill)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise UserError(f"max_new_tokens={max_new_tokens}; allowed: an integer >= 1")
    length = len(trained.tokenizer.encode(prompt)) + max_new_tokens if prompt else max_new_tokens
    if model_config.block_size:
      length = -(-length // model_config.block_size) * model_config.block_size
  # Causal and block-diffusion models decode with a sliding key/value cache: any length, unless their
  # positions are a learned table of max_len rows (GPT-2 style), which has no row past it.
  cached = (model_config.causal or model_config.block_size) and model_config.position != "learned"
  if not isinstance(length, int) or length < 1 or (length > model_config.max_len and not cached):
    what = f"seq_len={length}" if max_new_tokens is None else f"prompt + max_new_tokens = {length}"
    raise UserError(f"{what}; allowed: 1 to the model's max_len={model_config.max_len} (only AR and "
                    "block-diffusion models with rotary positions generate past it)")
  return length


class _Generators:
  """Compiled generators of one trained model, one per (sampler settings, trajectory or not)."""

  def __init__(self, trained):
    self.trained = trained
    self._cache = {}

  def get(self, cfg: sampling.SamplerConfig, return_trajectory: bool) -> Generator:
    key = (cfg, return_trajectory)
    if key not in self._cache:
      t = self.trained
      self._cache[key] = Generator(t.model, t.schedule, t.tokenizer, t.mesh, t.param_shardings, cfg,
                                   return_trajectory=return_trajectory)
    return self._cache[key]


def generate_tokens(trained, *, prompt: str = "", suffix: str = "", infill: str = "", num_samples: int = 1,
                    seq_len: int | None = None, max_new_tokens: int | None = None, seed: int = 0,
                    sampler: str | None = None, return_trajectory: bool = False, generators=None,
                    **settings) -> Generation:
  """Samples `num_samples` sequences from a loaded workdir (experiment.Trained).

  sampler: a name in sampling.SAMPLERS (default: the checkpoint config's); settings: any of
  SAMPLER_SETTINGS (steps, temperature, top_k, ...), None keeps the config's value. Sequence i uses the
  key stream fold_in(key(seed), i), so the same call gives the same text.
  """
  unknown = sorted(set(settings) - set(SAMPLER_SETTINGS))
  if unknown:
    raise UserError(f"unknown sampler setting {unknown[0]!r}; allowed: {', '.join(SAMPLER_SETTINGS)}")
  for name, text in (("prompt", prompt), ("suffix", suffix), ("infill", infill)):
    if not isinstance(text, str):
      raise UserError(f"{name}={text!r}; allowed: a string")
  seed = check_seed(seed, "seed")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise UserError(f"num_samples={num_samples}; allowed: an integer >= 1")
  cfg = sampler_config(trained.config.sampling, name=sampler, **settings)
  length = generation_length(trained, seq_len, max_new_tokens, prompt, suffix, infill)
  generators = generators or _Generators(trained)
  generator = generators.get(cfg, return_trajectory)
  template = generator.template(length, num_samples, prompt=prompt, suffix=suffix, infill=infill)
  out = generator(trained.params, template, seed)
  texts = generator.decode([row[:n] for row, n in zip(out.tokens, out.lengths)])
  return Generation(texts, out, template, cfg, length, seed, trained.step, trained.model.config.block_size,
                    trained.tokenizer.mask_id)


# ----------------------------------------------------------------------------- evaluation

EVALUATE_SETTINGS = ("max_batches", "num_t_samples", "seed", "discrete_steps")


def evaluate(trained, workdir: str, *, split: str | None = None, max_batches: int | None = None,
             num_t_samples: int | None = None, seed: int | None = None, discrete_steps: int | None = None,
             raw_params: bool = False, cache: dict | None = None) -> dict:
  """The likelihood bound of a split (default: the config's data.eval_split), as one record.

  Keys: nll_per_token (nats), bits_per_token, perplexity (a bound), bits_per_char, the subset counts
  (capped, windows_scored, windows_in_split, tokens_scored, chars_scored), and what was scored
  (split, checkpoint_step, params, objective, bound, schedule, num_t_samples, seed). Arguments left
  None take the config's evaluation.* values; the same arguments give the same figures. `cache` (a
  dict kept by the caller) holds the windows and the compiled evaluator between calls.
  """
  config = trained.config
  split = split or config.data.eval_split
  eval_config = ml_collections.ConfigDict(config.evaluation.to_dict())
  for name, value in (("max_batches", max_batches), ("num_t_samples", num_t_samples), ("seed", seed),
                      ("discrete_steps", discrete_steps)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
      raise UserError(f"{name}={value!r}; allowed: an integer")
    if name == "seed" and value is not None:
      check_seed(value, "seed")
    if value is not None:
      eval_config[name] = value
  cache = {} if cache is None else cache
  key = (split, eval_config.to_json())
  if key not in cache:
    windows, _ = experiment.load_windows(config, workdir, trained.tokenizer, split)
    cache[key] = windows, experiment.Evaluator(trained.model, trained.schedule, trained.tokenizer.mask_id,
                                               trained.mesh, trained.param_shardings, eval_config, config.objective,
                                               trained.tokenizer.eos_id, ignore_bos=experiment.ignores_bos(config))
  windows, evaluator = cache[key]
  result = evaluator(trained.params, windows)
  return {
      **result,
      "split": split,
      "checkpoint_step": trained.step,
      "params": "raw" if raw_params else "ema",
      "objective": config.objective,
      "bound": objectives.get(config.objective).bound,
      "schedule": trained.schedule.bound_schedule.name,
      "num_t_samples": eval_config.num_t_samples,
      "seed": eval_config.seed,
  }


def append_eval_record(workdir: str, record: dict) -> None:
  """Appends the record as one JSON line to WORKDIR/eval.jsonl."""
  paths.append_text(paths.join(workdir, "eval.jsonl"), json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- metrics


class Table:
  """Columns of equal length (numpy arrays; NaN where a row has no value), one row per step.

  table["train/loss"] is a column, table.columns the names, table.rows() dicts; printing shows the
  table; to_pandas() gives a DataFrame where pandas is installed.
  """

  def __init__(self, columns: dict):
    self._columns = columns

  @property
  def columns(self) -> list:
    return list(self._columns)

  def __len__(self) -> int:
    return len(self._columns.get("step", ()))

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._columns:
      raise KeyError(f"no column {name!r}; columns: {', '.join(self._columns)}")
    return self._columns[name]

  def __contains__(self, name: str) -> bool:
    return name in self._columns

  def rows(self) -> list:
    return [{k: v[i].item() for k, v in self._columns.items() if not (isinstance(v[i].item(), float)
                                                                      and math.isnan(v[i].item()))}
            for i in range(len(self))]

  def to_pandas(self):
    import pandas as pd  # pylint: disable=g-import-not-at-top
    return pd.DataFrame(self._columns)

  def __repr__(self) -> str:
    names = self.columns
    cells = [[_cell(self._columns[n][i]) for n in names] for i in range(len(self))]
    widths = [max([len(n)] + [len(row[j]) for row in cells]) for j, n in enumerate(names)]
    lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
  if isinstance(value, (np.integer, int)):
    return str(int(value))
  return "" if math.isnan(value) else f"{value:.5g}"


def read_metrics(workdir: str) -> Table:
  """WORKDIR/metrics.jsonl as a Table: the lines of one step (train and eval scalars) merged into one
  row, the last value winning (a resumed run logs the steps after its checkpoint again), rows by step."""
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    raise UserError(f"workdir {workdir!r} has no metrics.jsonl; allowed: a workdir a training run has logged to")
  by_step = {}
  lines = paths.read_text(path).splitlines()
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError):
      if number == len(lines):  # a record cut by a kill mid-write: the next training run drops it
        continue
      raise UserError(f"{path}: line {number} is not a metrics record ({line[:60]!r}); allowed: one JSON object "
                      "with a 'step' per line (remove or fix that line)") from None
    by_step.setdefault(step, {}).update(record)
  steps = sorted(by_step)
  names = ["step"] + sorted({k for r in by_step.values() for k in r} - {"step", "time"}) + ["time"]
  columns = {"step": np.array(steps, dtype=np.int64)}
  for name in names[1:]:
    columns[name] = np.array([float(by_step[s].get(name, math.nan)) for s in steps], dtype=np.float64)
  return Table(columns)


# ----------------------------------------------------------------------------- the Run object


class Run:
  """A trained workdir, loaded: generate text, evaluate, read the training curves."""

  def __init__(self, workdir: str, trained, use_ema: bool = True):
    self.workdir = workdir
    self.trained = trained
    self.use_ema = use_ema
    self._generators = _Generators(trained)
    self._evaluators = {}

  @property
  def config(self):
    return self.trained.config

  @property
  def tokenizer(self):
    return self.trained.tokenizer

  @property
  def step(self) -> int:
    return self.trained.step

  def sample(self, prompt: str = "", num_samples: int = 1, sampler: str | None = None, steps: int | None = None,
             **kwargs) -> Generation:
    """Like `generate`, but returns the whole Generation (tokens, trajectory, sampler settings)."""
    return generate_tokens(self.trained, prompt=prompt, num_samples=num_samples, sampler=sampler, steps=steps,
                           generators=self._generators, **kwargs)

  def generate(self, prompt: str = "", num_samples: int = 1, sampler: str | None = None, steps: int | None = None,
               **kwargs) -> list:
    """Generated texts. kwargs: suffix, infill ("To be, [MASK*8] the question."), seq_len,
    max_new_tokens, seed, and sampler settings (temperature, top_k, confidence, ...)."""
    return self.sample(prompt, num_samples, sampler, steps, **kwargs).texts

  def chat(self, messages, max_new_tokens: int = 128, seed: int = 0, **settings) -> str:
    """The model's answer to a conversation [{"role": "user", "content": ...}, ...], rendered by its chat
    template (an imported instruct model's) and cut at the end-of-turn token; settings as `generate`."""
    from diffusion_lm import chat  # pylint: disable=g-import-not-at-top
    template = chat.load_template(experiment.tokenizer_dir(self.workdir))
    answer, _ = chat.reply(self.trained, template, messages, max_new_tokens=max_new_tokens, seed=seed,
                           generators=self._generators, **settings)
    return answer

  def evaluate(self, split: str | None = None, **kwargs) -> dict:
    """The likelihood bound on a split; kwargs: max_batches, num_t_samples, seed, discrete_steps."""
    unknown = sorted(set(kwargs) - set(EVALUATE_SETTINGS))
    if unknown:
      raise UserError(f"unknown evaluate setting {unknown[0]!r}; allowed: split, {', '.join(EVALUATE_SETTINGS)}")
    return evaluate(self.trained, self.workdir, split=split, raw_params=not self.use_ema, cache=self._evaluators,
                    **kwargs)

  def metrics(self) -> Table:
    return read_metrics(self.workdir)

  def __repr__(self) -> str:
    return (f"Run({self.workdir!r}: {self.config.objective}, step {self.step}, "
            f"{self.tokenizer.kind} tokenizer of {self.tokenizer.vocab_size} tokens)")


def load(workdir: str, use_ema: bool = True, dtype: str | None = None) -> Run:
  """Opens a trained or converted workdir (local or gs://): its config, tokenizer and latest (EMA) parameters,
  only those read, onto the workdir's mesh, in `dtype` ("float32" or "bfloat16"; None: float32)."""
  if not isinstance(workdir, (str, os.PathLike)) or not str(workdir):
    raise UserError(f"workdir={workdir!r}; allowed: the path of a trained workdir (a str or os.PathLike, local or "
                    "gs://)")
  workdir = paths.resolve(workdir)
  return Run(workdir, experiment.load_trained(workdir, use_ema=use_ema, dtype=dtype), use_ema)
