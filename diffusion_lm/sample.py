"""Generate text from a trained workdir by iterative unmasking.

  python -m diffusion_lm.sample --workdir=runs/demo --num_samples=4 --steps=64 --prompt="ROMEO."
"""

import sys

from absl import app, flags

from diffusion_lm.errors import UserError, cli_main
from diffusion_lm.generation import Generator


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints and the tokenizer.")
flags.DEFINE_integer("num_samples", 4, "Number of sequences to generate.")
flags.DEFINE_integer("steps", None, "Denoising steps T (default: the config's sampling.steps).")
flags.DEFINE_integer("seq_len", None, "Length of each sequence in tokens (default: data.seq_len).")
flags.DEFINE_integer("seed", 0, "Random seed; sequence i uses fold_in(key(seed), i).")
flags.DEFINE_string("prompt", "", "Text held fixed at the start of every sample.")
flags.DEFINE_float("temperature", None, "Softmax temperature (0 = argmax; default: the config's).")
flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA parameters.")
flags.DEFINE_bool("verbose", False, "Show tracebacks for input errors.")


@cli_main
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; allowed: flags only")
  if not FLAGS.workdir:
    raise UserError("--workdir is required: the training workdir to sample from")
  if FLAGS.num_samples < 1:
    raise UserError(f"--num_samples={FLAGS.num_samples}; allowed: an integer >= 1")
  from diffusion_lm import experiment  # pylint: disable=g-import-not-at-top
  trained = experiment.load_trained(FLAGS.workdir, use_ema=not FLAGS.raw_params)
  cfg = trained.config
  steps = cfg.sampling.steps if FLAGS.steps is None else FLAGS.steps
  seq_len = cfg.data.seq_len if FLAGS.seq_len is None else FLAGS.seq_len
  if seq_len < 1 or seq_len > cfg.model.max_len:
    raise UserError(f"--seq_len={seq_len}; allowed: 1 to the model's max_len={cfg.model.max_len}")
  temperature = cfg.sampling.temperature if FLAGS.temperature is None else FLAGS.temperature
  generator = Generator(trained.model, trained.schedule, trained.tokenizer, trained.mesh,
                        trained.param_shardings, steps=steps, temperature=temperature)
  tokens = generator.token_batch(FLAGS.prompt, seq_len, FLAGS.num_samples)
  samples, _ = generator(trained.params, tokens, FLAGS.seed)
  print(f"# {FLAGS.num_samples} samples, {seq_len} tokens, {steps} steps, seed {FLAGS.seed}, "
        f"checkpoint step {trained.step}", flush=True)
  for i, text in enumerate(generator.decode(samples)):
    print(f"--- sample {i} ---\n{text}", flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
