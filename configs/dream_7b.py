"""Dream-v0-Base-7B's shapes (Dream-org/Dream-v0-Base-7B config.json: Qwen2.5-7B's layout) for ahead-of-time
checks and fine-tuning runs.

  python -m diffusion_lm.aot --config=configs/dream_7b.py --topology=v5e:2x4 --only=sample \
      --param_dtype=bfloat16 --sample_batch=1,8 --config.mesh.fsdp=2 --config.mesh.tensor=4
  python -m diffusion_lm.convert --from_hf=path/to/Dream-v0-Base-7B --workdir=runs/dream   # the weights

A converted workdir carries these settings itself (diffusion_lm/convert/dream.py reads them from config.json);
this file states them for a slice that has no checkpoint yet. Qwen2.5-7B's network: grouped-query attention
(28 query heads, 4 key/value heads) with biases on the query, key and value projections, untied input and
output embeddings, the output at i predicting token i + 1 (shift_logits), and Dream's own in-vocabulary
[MASK]. 28 heads shard over a tensor axis of 1, 2, 4, 7, 14 or 28 chips (not 8).
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.tokenizer.update(kind="hf", vocab_size=152064)  # embedding rows (Qwen2.5's vocab_size)
  config.model.update(num_layers=28, d_model=3584, num_heads=28, num_kv_heads=4, mlp_dim=18944,
                      max_len=131072,  # max_position_embeddings, as convert reads it
                      rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True, tie_embeddings=False,
                      shift_logits=True, mask_token_id=151666, dtype="bfloat16", remat=True)
  config.data.seq_len = 2048
  config.optimizer.update(learning_rate=2e-5, warmup_steps=50, weight_decay=0.1)
  config.training.update(batch_size=8, num_steps=1000)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  # Dream's diffusion_generate (samplers/published.py): maskgit_plus confidence, time grid to eps 1e-3
  config.sampling.update(name="dream", steps=64, temperature=0.0, confidence="max_prob", eps=1e-3)
  return config
