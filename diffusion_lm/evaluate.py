"""Evaluate a trained workdir: the ELBO likelihood bound on a split, as one JSON line.

  python -m diffusion_lm.evaluate --workdir=runs/demo [--split=validation --max_batches=0]

Prints nll_per_token (nats), bits_per_token, perplexity (an upper bound: exp of the negative ELBO per
token) and bits_per_char (total bits over the total characters of the scored windows), from a fixed
seed; the line is also appended to WORKDIR/eval.jsonl. With a cap (--max_batches=N > 0, or the
config's evaluation.max_batches) a split of more than N * batch_size windows is scored on a seeded
stratified subset of that many windows spread over the whole split; the line says so: capped,
windows_scored, windows_in_split, tokens_scored, chars_scored.
"""

import json
import math
import sys

from absl import app, flags
import jax

from diffusion_lm import sampling
from diffusion_lm.errors import UserError, cli_main, parse_flags

FLAGS = flags.FLAGS


def define_flags():
  """Defines this command's flags (only when run as a command, so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints and the tokenizer.")
  flags.DEFINE_string("split", None, "Split to evaluate (default: the config's data.eval_split).")
  flags.DEFINE_integer("max_batches", None, "Cap on batches: N > 0 scores a seeded subset of N x batch_size "
                       "windows spread over the split (default: the config's; 0 = whole split).")
  flags.DEFINE_integer("num_t_samples", None, "Stratified time draws per sequence (default: the config's).")
  flags.DEFINE_integer("seed", None, "Evaluation seed (default: the config's evaluation.seed).")
  flags.DEFINE_integer("discrete_steps", None, "Also report the exact T-step discrete bound for this T (0 = off).")
  flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "Restore the parameters in this dtype "
                    "(default: float32, as trained; bfloat16 halves their memory).")
  flags.DEFINE_string("judge_workdir", None, "AR checkpoint scoring generated samples (generative perplexity).")
  flags.DEFINE_integer("num_gen_samples", 0, "Samples to generate for generative perplexity and entropy (0 = none).")
  flags.DEFINE_enum("sampler", None, list(sampling.SAMPLERS),
                    "Sampler for the generated samples (default: the config's).")
  flags.DEFINE_integer("gen_steps", None, "Denoising steps for the generated samples (default: the config's).")
  flags.DEFINE_integer("gen_seed", 0, "Seed of the generated samples.")
  flags.DEFINE_bool("raw_params", False, "Evaluate the raw parameters instead of the EMA parameters.")
  flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  if not FLAGS.workdir:
    raise UserError("--workdir is required: the training workdir to evaluate")
  _check_flags()
  from diffusion_lm import api, experiment  # pylint: disable=g-import-not-at-top
  trained = experiment.load_trained(FLAGS.workdir, use_ema=not FLAGS.raw_params, dtype=FLAGS.param_dtype)
  config = trained.config
  judge = _load_judge(trained) if FLAGS.judge_workdir else None  # before the evaluation pass, not after it
  record = api.evaluate(trained, FLAGS.workdir, split=FLAGS.split, max_batches=FLAGS.max_batches,
                        num_t_samples=FLAGS.num_t_samples, seed=FLAGS.seed, discrete_steps=FLAGS.discrete_steps,
                        raw_params=FLAGS.raw_params)
  if FLAGS.num_gen_samples:
    record.update(_generated_sample_metrics(trained, config, judge))
  line = json.dumps(record)
  if jax.process_index() == 0:
    print(line, flush=True)  # first: a workdir that cannot take eval.jsonl still gets its result
    try:
      api.append_eval_record(FLAGS.workdir, record)
    except OSError as e:
      print(f"warning: could not append the result to {FLAGS.workdir}/eval.jsonl ({e.strerror or e}); it is "
            "printed above only", file=sys.stderr, flush=True)
  sys.stdout.flush()


def _check_flags() -> None:
  """The flags as the user typed them, each with a one-line error, before anything is loaded."""
  from diffusion_lm.errors import check_seed  # pylint: disable=g-import-not-at-top
  for name, least in (("max_batches", 0), ("num_t_samples", 1), ("discrete_steps", 0), ("num_gen_samples", 0),
                      ("gen_steps", 1)):
    value = FLAGS[name].value
    if value is not None and value < least:
      raise UserError(f"--{name}={value}; allowed: an integer >= {least}"
                      + (" (0: the whole split)" if name == "max_batches" else "")
                      + (" (0: off)" if name in ("discrete_steps", "num_gen_samples") else ""))
  if FLAGS.seed is not None:
    check_seed(FLAGS.seed, "--seed")
  check_seed(FLAGS.gen_seed, "--gen_seed")
  if FLAGS.judge_workdir and not FLAGS.num_gen_samples:
    raise UserError("--judge_workdir needs --num_gen_samples=N (N >= 1) samples to score")
  if FLAGS.gen_steps is not None and not FLAGS.num_gen_samples:
    raise UserError("--gen_steps sets the steps of generated samples; allowed: with --num_gen_samples=N (N >= 1)")


def _load_judge(trained):
  """The AR judge, checked against the model's tokenizer."""
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  judge = experiment.load_trained(FLAGS.judge_workdir)
  if judge.tokenizer.fingerprint() != trained.tokenizer.fingerprint():
    raise UserError(f"--judge_workdir={FLAGS.judge_workdir!r} has another vocabulary ({judge.tokenizer.kind}, "
                    f"{judge.tokenizer.vocab_size} tokens) than the model ({trained.tokenizer.kind}, "
                    f"{trained.tokenizer.vocab_size} tokens); allowed: a judge trained with the same tokenizer")
  experiment.ar_scorer(judge)  # refuses a diffusion judge (nothing is compiled yet)
  return judge


def _generated_sample_metrics(trained, config, judge=None) -> dict:
  """Unigram entropy of N samples (per sequence, averaged; and pooled) and, with a judge, their
  generative perplexity under it."""
  from diffusion_lm import api, experiment  # pylint: disable=g-import-not-at-top
  generation = api.generate_tokens(trained, num_samples=FLAGS.num_gen_samples, seq_len=config.data.seq_len,
                                   seed=FLAGS.gen_seed, sampler=FLAGS.sampler, steps=FLAGS.gen_steps)
  cfg, samples = generation.sampler, generation.output.tokens
  out = {
      "num_gen_samples": FLAGS.num_gen_samples,
      "sampler": "ar" if trained.model.config.causal else cfg.name,
      "gen_steps": config.data.seq_len if trained.model.config.causal else cfg.steps,
      "gen_seed": FLAGS.gen_seed,
      "sample_entropy_bits": experiment.unigram_entropy_bits(samples),  # per sequence, mean (MDLM / ReMDM)
      "pooled_entropy_bits": experiment.pooled_unigram_entropy_bits(samples),
  }
  if judge is not None:
    nll = experiment.ar_scorer(judge)(samples)
    out.update({"gen_perplexity": math.exp(nll), "gen_nll_per_token": nll, "judge_workdir": FLAGS.judge_workdir,
                "judge_step": judge.step})
  return out


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
