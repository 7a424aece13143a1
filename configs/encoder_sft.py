"""Instruction tuning of an imported (or diffusion-tuned) encoder: the SFT objective on prompt/response
pairs, the prompt held clean and never scored, the response (then end-of-text padding) masked at every rate
and scored; dLLM's BERT-Chat / ModernBERT-chat recipe on this project's objective.

  python -m diffusion_lm.convert --from_hf=path/to/ModernBERT-large --workdir=runs/mbert
  python -m diffusion_lm.train --config=configs/encoder_sft.py --config.init_from=runs/mbert \\
      --config.data.path=pairs.jsonl --workdir=runs/mbert_chat
  python -m diffusion_lm.sample --workdir=runs/mbert_chat --prompt="[CLS] What is ...? [SEP]" --sampler=blocks

config.init_from names the source workdir (a converted encoder, or one tuned with
configs/encoder_diffusion.py); its network and tokenizer are taken when training starts
(config.model_from_init). data.path: JSON lines of {"prompt": ..., "response": ...}; each row is framed
as BERT reads a first segment, [CLS] prompt [SEP], then the response and [SEP] padding (data.frame_open).
Sample with the same framing: --prompt="[CLS] question [SEP]".
"""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.init_from = arg or ""  # the source encoder's workdir (or --config.init_from=...)
  config.model_from_init = True
  config.objective = "sft"
  # Each row: [CLS] prompt [SEP] (clean), then the response and [SEP] padding (masked, scored).
  config.data.update(source="jsonl", path="", seq_len=128, validation_percent=5.0, frame_open="bos")
  config.optimizer.update(learning_rate=5e-5, warmup_steps=50, decay="constant", ema_decay=0.0, weight_decay=0.0)
  config.training.update(batch_size=16, num_steps=500, log_every=25, eval_every=0, sample_every=0,
                         checkpoint_every=250)
  config.evaluation.update(batch_size=16, max_batches=8)
  config.sampling.update(name="confidence", steps=64, temperature=0.0)
  return config
