"""LLaDA-8B's shapes (GSAI-ML/LLaDA-8B-Base config.json) for ahead-of-time checks and fine-tuning runs.

  python -m diffusion_lm.aot --config=configs/llada_8b.py --topology=v6e:2x4
  python -m diffusion_lm.aot --config=configs/llada_8b.py --topology=v5e:2x4 --only=sample \
      --param_dtype=bfloat16 --sample_batch=1,8 --config.mesh.fsdp=1 --config.mesh.tensor=8   # sampling only
  python -m diffusion_lm.convert --from_hf=path/to/LLaDA-8B-Base --workdir=runs/llada   # the weights

A converted workdir carries these settings itself (configs/sft.py fine-tunes it); this file states them
for a slice that has no checkpoint yet, e.g. to see whether fine-tuning fits: parameters, EMA and Adam
moments in float32 sharded over fsdp, bfloat16 compute, every block rematerialised.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.tokenizer.update(kind="hf", vocab_size=126464)  # embedding rows (LLaDA's embedding_size)
  config.model.update(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=0, mlp_dim=12288, max_len=4096,
                      rope_base=500000.0, norm_eps=1e-5, mask_token_id=126336, dtype="bfloat16", remat=True)
  config.data.seq_len = 2048
  config.optimizer.update(learning_rate=2.5e-5, warmup_steps=50, weight_decay=0.1)
  config.training.update(batch_size=8, num_steps=1000)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.sampling.update(name="confidence", steps=64)
  return config
