"""OpenWebText at GPT-2-small size, as MDLM / BD3-LM train and score it, so perplexities land in their units.

The data, as their `data=openwebtext-split`: OpenWebText's train split minus its last 100,000 documents
to train, those 100,000 to validate; GPT-2's byte-level BPE (50,257 tokens), an <|endoftext|> after each
document, packed into windows of 1,024 tokens. Without frame tokens (BD3-LM's training and likelihood
scripts: insert_*_special=False); MDLM's own evaluation also frames each window with <|endoftext|> at both
ends: --config.data.frame_windows=True for that. Optimizer and schedule follow theirs: AdamW 3e-4, betas
(0.9, 0.999), no weight decay, 2,500 warmup steps then constant, clip 1, EMA 0.9999, batch 512, 1M steps;
the denoiser is this project's Transformer at their "small" size (12 x 768).

Data and tokenizer: the Hub dataset needs `pip install datasets` and downloads on first use (about 40 GB
on disk); or point data.hf_name at a local save_to_disk folder or its parquet files. The tokenizer, once:
  curl -L -o gpt2.json https://huggingface.co/gpt2/resolve/main/tokenizer.json
Sized for a TPU v5p 2x2x2 slice (8 chips, FSDP over 8); check without a TPU:
  python -m diffusion_lm.aot --config=configs/owt_small.py --topology=v5p:2x2x2
  python -m diffusion_lm.train --config=configs/owt_small.py --workdir=gs://BUCKET/runs/owt_small \\
    --config.tokenizer.hf_path=gpt2.json --distributed
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.update(source="hf", hf_name="Skylion007/openwebtext", text_key="text",
                     train_split="train[:-100000]", eval_split="train[-100000:]", seq_len=1024, frame_windows=False)
  config.tokenizer.update(kind="hf", hf_path="", hf_eos_token="<|endoftext|>", vocab_size=50_257)
  config.model.update(num_layers=12, d_model=768, num_heads=12, mlp_dim=3072, max_len=1024, dtype="bfloat16",
                      remat=True)
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2500, decay="constant", b1=0.9, b2=0.999,
                          weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999)
  config.training.update(batch_size=512, num_steps=1_000_000, log_every=100, eval_every=10_000,
                         sample_every=10_000, checkpoint_every=2_000)
  config.evaluation.update(batch_size=256, max_batches=100)
  config.sampling.update(steps=1024, num_samples=4)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
