"""Instruction fine-tuning (LLaDA SFT) of a trained or converted workdir on prompt/response pairs.

  python -m diffusion_lm.convert --from_hf=path/to/LLaDA-8B-Base --workdir=runs/llada
  python -m diffusion_lm.train --config=configs/sft.py:runs/llada --config.data.path=pairs.jsonl \\
      --workdir=runs/llada_sft
  python -m diffusion_lm.sample --workdir=runs/llada_sft --prompt="..." --sampler=confidence

The argument is the source workdir: its model settings and tokenizer are copied (config.init_from
starts the new workdir from its EMA parameters), the objective is sft, the data a JSONL file of
{"prompt": ..., "response": ...} lines (data.path), or {"messages": [...]} conversations rendered by the
source's chat template (one row per assistant turn). Other fields are this file's fine-tuning defaults
and take --config.* overrides as usual.
"""

import json
import os

import ml_collections

from configs import default


def get_config(arg=None):
  config = default.get_config()
  if not arg:
    raise ValueError("configs/sft.py needs the source workdir: --config=configs/sft.py:SOURCE_WORKDIR")
  with open(os.path.join(arg, "config.json")) as f:
    source = json.load(f)
  config.init_from = arg
  config.objective = "sft"
  config.model = ml_collections.ConfigDict(source["model"])  # the source's network, exactly
  config.tokenizer = ml_collections.ConfigDict(source["tokenizer"])
  config.data.update(source="jsonl", path="", seq_len=source["data"]["seq_len"], validation_percent=5.0)
  config.optimizer.update(learning_rate=1e-4, warmup_steps=50, decay="constant", ema_decay=0.0, weight_decay=0.0)
  config.training.update(batch_size=16, num_steps=500, log_every=25, eval_every=0, sample_every=0,
                         checkpoint_every=250)
  config.evaluation.update(batch_size=16, max_batches=8)
  config.sampling.update(name="confidence", temperature=0.0)
  return config
