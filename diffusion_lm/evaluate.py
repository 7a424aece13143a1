"""Evaluate a trained workdir: the ELBO likelihood bound on a split, as one JSON line.

  python -m diffusion_lm.evaluate --workdir=runs/demo [--split=validation --max_batches=0]

Prints nll_per_token (nats), bits_per_token, perplexity (an upper bound: exp of the negative ELBO per
token) and bits_per_char, from a fixed seed; the line is also appended to WORKDIR/eval.jsonl.
"""

import json
import os
import sys

from absl import app, flags
import jax

from diffusion_lm.errors import UserError, cli_main

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints and the tokenizer.")
flags.DEFINE_string("split", None, "Split to evaluate (default: the config's data.eval_split).")
flags.DEFINE_integer("max_batches", None, "Cap on batches (default: the config's; 0 = whole split).")
flags.DEFINE_integer("num_t_samples", None, "Stratified time draws per sequence (default: the config's).")
flags.DEFINE_integer("seed", None, "Evaluation seed (default: the config's evaluation.seed).")
flags.DEFINE_bool("raw_params", False, "Evaluate the raw parameters instead of the EMA parameters.")
flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  if not FLAGS.workdir:
    raise UserError("--workdir is required: the training workdir to evaluate")
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  trained = experiment.load_trained(FLAGS.workdir, use_ema=not FLAGS.raw_params)
  config = trained.config
  split = FLAGS.split or config.data.eval_split
  eval_config = config.evaluation
  for name in ("max_batches", "num_t_samples", "seed"):
    if getattr(FLAGS, name) is not None:
      eval_config[name] = getattr(FLAGS, name)
  windows, tokenized = experiment.load_windows(config, FLAGS.workdir, trained.tokenizer, split)
  evaluator = experiment.Evaluator(trained.model, trained.schedule, trained.tokenizer.mask_id, trained.mesh,
                                   trained.param_shardings, eval_config)
  result = evaluator(trained.params, windows, tokenized.chars_per_token)
  record = {
      **result,
      "split": split,
      "checkpoint_step": trained.step,
      "params": "raw" if FLAGS.raw_params else "ema",
      "bound": "continuous-time ELBO",
      "schedule": trained.schedule.bound_schedule.name,
      "num_t_samples": eval_config.num_t_samples,
      "seed": eval_config.seed,
  }
  line = json.dumps(record)
  if jax.process_index() == 0:
    with open(os.path.join(FLAGS.workdir, "eval.jsonl"), "a", encoding="utf-8") as f:
      f.write(line + "\n")
    print(line, flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
