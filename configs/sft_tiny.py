"""Instruction fine-tuning (LLaDA SFT) on a synthetic task learnable in a minute on a CPU: the prompt
"abcd=" asks for its letters reversed, "dcba". Makes its own data (a JSONL of prompt/response pairs).

  python tools/make_reverse_task.py /tmp/reverse.jsonl
  python -m diffusion_lm.train --config=configs/sft_tiny.py:/tmp/reverse.jsonl --workdir=runs/sft_tiny
  python -m diffusion_lm.sample --workdir=runs/sft_tiny --prompt="cafe=" --num_samples=1
"""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.objective = "sft"
  config.tokenizer.kind = "char"
  config.data.update(source="jsonl", path=arg or "", seq_len=12, validation_percent=10.0)
  config.model.update(num_layers=2, d_model=64, num_heads=4, mlp_dim=128, max_len=12)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=20, ema_decay=0.9, weight_decay=0.0)
  config.training.update(batch_size=64, num_steps=400, log_every=50, eval_every=0, sample_every=0,
                         checkpoint_every=400)
  config.evaluation.update(batch_size=64, max_batches=2, num_t_samples=2)
  config.sampling.update(name="confidence", steps=4, temperature=0.0, num_samples=2, prompt="abcd=")
  return config
