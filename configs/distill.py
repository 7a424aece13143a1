"""Distillation defaults (SDTT): every field of `python -m diffusion_lm.distill`, each commented.

  python -m diffusion_lm.distill --teacher_workdir=runs/demo --workdir=runs/demo_distill \
      [--config=configs/distill.py] [--config.distill.steps_per_round=2000 ...]

The model, tokenizer, data and schedule come from the teacher's workdir; this config holds what the
distillation itself needs: the round plan, the divergence, the optimizer and the loop's cadence.
"""

import ml_collections

from configs import default


def get_config(arg=None):
  base = default.get_config(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds the data order, the noisy inputs and the teacher's draws

  config.distill = d = ml_collections.ConfigDict()
  d.start_steps = 256  # the first round's teacher samples in this many steps (dt = 1 / start_steps)
  d.final_steps = 8  # the last round's student samples in this many (start = final x factor^rounds)
  d.factor = 2  # teacher steps per student step; each round divides the step count by it (SDTT: 2)
  d.steps_per_round = 2000  # optimizer steps per round (SDTT: 10k on OpenWebText)
  d.divergence = "reverse_kl"  # reverse_kl = KL(student || teacher), the paper's default | forward_kl | tvd
  d.teacher_from = "params"  # the next round's teacher: the student's params (the paper) | its ema
  d.eval_each_round = True  # validation ELBO of the student (its EMA) at the end of every round

  # AdamW as in training (experiment.make_optimizer); the schedule spans all rounds.
  config.optimizer = base.optimizer
  config.optimizer.update(learning_rate=3e-4, warmup_steps=50, decay="constant", ema_decay=0.99)

  config.training = tr = ml_collections.ConfigDict()
  tr.batch_size = 64  # global batch in sequences (divisible by the mesh's data x fsdp size)
  tr.log_every = 25  # steps between metric writes
  tr.checkpoint_every = 100  # steps between checkpoints (and always at the end of a round / on SIGTERM)
  tr.keep_checkpoints = 3  # newest checkpoints kept
  tr.on_nonfinite = "stop"  # a NaN/inf loss or gradient: stop | skip the update
  return config
