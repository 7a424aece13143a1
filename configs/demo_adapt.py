"""AR -> masked diffusion adaptation on the demo budget (DiffuLLaMA, Gong et al. 2025; Dream 2025).

  python -m diffusion_lm.train --config=configs/demo_ar.py --workdir=runs/demo_ar         # 700 AR steps
  python -m diffusion_lm.train --config=configs/demo_adapt.py:runs/demo_ar --workdir=runs/demo_adapt
  python -m diffusion_lm.evaluate --workdir=runs/demo_adapt --max_batches=0 --discrete_steps=64 \\
      --judge_workdir=runs/demo_ar --num_gen_samples=64 --sampler=ancestral --gen_steps=64

Starts a masked-diffusion model from the AR checkpoint (config.init_from: its EMA parameters and
tokenizer; any AR workdir of the same shape, this project's or a converted one) with the published
recipe: the shift operation (model.shift_logits: the output at i keeps predicting token i + 1, as the
AR head was trained to, and the logits are realigned so that position i's prediction comes from
position i - 1) and attention-mask annealing (training.attention_anneal_steps: each position sees a
linearly growing random share of the later positions, from causal to bidirectional). Compare with
configs/demo.py trained for 700 + num_steps steps from scratch (equal total steps).
"""

import json
import os

from configs import demo


def get_config(arg=None):
  config = demo.get_config()
  source = arg or "runs/demo_ar"
  config.init_from = source
  if os.path.isfile(os.path.join(source, "config.json")):
    with open(os.path.join(source, "config.json")) as f:
      config.model.update(json.load(f)["model"])  # the source's network, exactly
  config.objective = "diffusion"
  config.model.shift_logits = True
  # The demo's peak rate and a short anneal: lr 3e-3 / anneal 50 reached 2.706 bits/char, lr 1e-3 / anneal 100
  # 2.724 (README table).
  config.optimizer.update(learning_rate=3e-3, warmup_steps=20, ema_decay=0.99)
  config.training.update(num_steps=300, attention_anneal_steps=50, eval_every=300, sample_every=300,
                         checkpoint_every=100)
  return config
