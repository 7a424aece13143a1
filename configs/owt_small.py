"""OpenWebText at GPT-2-small size: 12 x 768, sequences of 1024, a 50k SentencePiece vocabulary.

OpenWebText is not a tfds dataset: point data.path at a folder of its text files.
Sized for a TPU v5p 2x2x2 slice (8 chips, FSDP over 8); check without a TPU:
  python -m diffusion_lm.aot --config=configs/owt_small.py --topology=v5p:2x2x2
  python -m diffusion_lm.train --config=configs/owt_small.py --workdir=/gcs/BUCKET/runs/owt_small \\
    --config.data.path=/data/openwebtext --distributed
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.update(source="local", path="", seq_len=1024, passage_chars=16_384, validation_percent=0.5)
  config.tokenizer.update(kind="sentencepiece", vocab_size=50_000, model_type="bpe", max_sentences=3_000_000)
  config.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, max_len=1024, dtype="bfloat16",
                      remat=True)
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2500, weight_decay=0.03, ema_decay=0.9999)
  config.training.update(batch_size=512, num_steps=1_000_000, log_every=100, eval_every=10_000,
                         sample_every=10_000, checkpoint_every=2_000)
  config.evaluation.update(batch_size=256, max_batches=100)
  config.sampling.update(steps=1024, num_samples=4)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
