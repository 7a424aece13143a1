"""Masked-diffusion fine-tuning of an imported encoder (BERT, RoBERTa, ModernBERT): BERT's masked-LM
objective at one mask rate becomes the diffusion ELBO over every mask rate ("RoBERTa diffusion",
DiffusionBERT without its time embedding), which turns the encoder into a text generator.

  python -m diffusion_lm.convert --from_hf=path/to/bert-base-uncased --workdir=runs/bert
  python -m diffusion_lm.train --config=configs/encoder_diffusion.py --config.init_from=runs/bert \\
      --workdir=runs/bert_diffusion
  python -m diffusion_lm.sample --workdir=runs/bert_diffusion --sampler=confidence --steps=64

config.init_from names the converted (or trained) encoder; config.model_from_init takes its network and
tokenizer from it when training starts, so nothing else needs naming (the argument form
--config=configs/encoder_diffusion.py:runs/bert sets init_from too). Data: the bundled corpus in windows
framed as an encoder reads text, [CLS] ... [SEP] (<s> ... </s>). Optimizer: BERT fine-tuning's scale
(AdamW 5e-5 after 100 warmup steps, linear decay); EMA 0.999 as in training from scratch.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.init_from = arg or ""  # the imported encoder's workdir (or --config.init_from=...)
  config.model_from_init = True  # its network and tokenizer, whatever they are
  config.objective = "diffusion"
  config.diffusion.name = "linear"  # every mask rate, t ~ U[0, 1]: the MDLM / MD4 ELBO
  config.data.update(source="bundled", seq_len=128, frame_windows=True, frame_open="bos")
  config.optimizer.update(learning_rate=5e-5, warmup_steps=100, decay="linear", min_lr_ratio=0.0,
                          weight_decay=0.01, ema_decay=0.999)
  config.training.update(batch_size=32, num_steps=2000, log_every=50, eval_every=500, sample_every=500,
                         checkpoint_every=500)
  config.evaluation.update(batch_size=32, max_batches=16)
  config.sampling.update(name="confidence", steps=64, temperature=0.0)
  return config
