"""Default configuration: every field, each commented. Other configs start from this one.

  python -m diffusion_lm.train --config=configs/default.py --workdir=runs/default
"""

import ml_collections


def get_config(arg=None):
  if arg is not None:  # configs that take one (sft, sft_tiny, demo_adapt, demo_block) do not pass it here
    raise ValueError(f"config argument {arg!r} (after ':' in --config) is not used by this config; allowed: the "
                     "config path without it (configs/sft.py:WORKDIR, sft_tiny.py:FILE, demo_adapt.py:WORKDIR and "
                     "demo_block.py:BLOCK_SIZE take one)")
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds init, data order, masking and periodic samples
  # diffusion (masked diffusion ELBO) | ar (the causal baseline, same network) | block (block diffusion,
  # BD3-LM: masked diffusion inside blocks of model.block_size tokens, autoregressive across blocks)
  # | sft (instruction fine-tuning of masked diffusion, LLaDA's: the response given the prompt; data.source=jsonl)
  config.objective = "diffusion"
  # Fine-tuning: a workdir (trained here, or converted with diffusion_lm.convert) whose EMA parameters and
  # tokenizer a new workdir starts from; config.model must be the source's (configs/sft.py copies it).
  config.init_from = ""
  # True: training takes config.model and config.tokenizer from init_from's config.json (whatever network it
  # holds), so that --config.init_from=WORKDIR alone names the source (configs/encoder_diffusion.py)
  config.model_from_init = False

  config.data = data = ml_collections.ConfigDict()
  # bundled (Shakespeare shipped in the package) | local (data.path) | tfds | hf (Hugging Face datasets:
  # data.hf_name) | jsonl (prompt/response pairs in data.path, one {"prompt": ..., "response": ...} a line, for
  # objective=sft; validation_percent of them held out)
  data.source = "bundled"
  data.path = ""  # for source=local: a text file or a folder of .txt/.txt.gz/.txt.xz/.txt.bz2 files; jsonl: the file
  data.tfds_name = ""  # for source=tfds: a tfds dataset name, e.g. "lm1b"
  data.text_key = "text"  # for source=tfds / hf: the feature (column) holding the text
  # for source=hf: a Hub dataset name (needs pip install datasets) or a local save_to_disk folder / parquet /
  # JSON-lines files (read without it); splits may carry a row range: train[:-100000] (see diffusion_lm/hf_data.py)
  data.hf_name = ""
  data.hf_config = ""  # for source=hf from the Hub: the dataset's configuration name, if it has several
  data.detokenize = ""  # rewrite each text before tokenizing: "" | lm1b (undo LM1B's spaced punctuation, as MDLM)
  # each window = end-of-document id + seq_len - 2 tokens + end-of-document id (MDLM / BD3-LM wrapped data);
  # False: seq_len tokens of the stream
  data.frame_windows = False
  data.frame_open = ""  # framed windows open with: "" the end-of-document id, "bos" [CLS] / <s> (BERT-style)
  # with frame_windows, masked and block diffusion: position 0 (always the frame id) is never masked and is left
  # out of evaluation's per-token average (BD3-LM's ignore_bos); False scores it as any other position
  data.ignore_bos = True
  data.train_split = "train"  # split to train on (and to train the tokenizer on)
  data.eval_split = "validation"  # split for the validation ELBO
  data.validation_percent = 5.0  # local text: share of passages held out for validation
  data.passage_chars = 4096  # local text: passages of about this many characters are the split unit
  data.seq_len = 128  # tokens per training sequence
  data.cache_dir = ""  # prepared data and token caches; default WORKDIR/data
  # processes that tokenize a split into the token cache (once per split and tokenizer): 0 = one per CPU core
  # (at most 16) for splits of 20,000 texts or more, else in-process; 1 = in-process; N = N processes
  data.tokenize_processes = 0

  config.tokenizer = tok = ml_collections.ConfigDict()
  # char | sentencepiece (both trained on the train split on first use) | hf (a Hugging Face tokenizer.json
  # read from tokenizer.hf_path, e.g. bert-base-uncased's or gpt2's; copied into the workdir)
  tok.kind = "sentencepiece"
  # sentencepiece: pieces in the vocabulary ([MASK] comes on top); hf: the file's size, which only aot and bench
  # read (they size a model without the file)
  tok.vocab_size = 2048
  tok.model_type = "unigram"  # sentencepiece only: unigram | bpe
  tok.max_sentences = 300_000  # sentencepiece only: lines sampled for training it
  tok.hf_path = ""  # hf only: path of the tokenizer.json (needed on the first run; later runs use the workdir's copy)
  tok.hf_eos_token = ""  # hf only: end-of-document token; "" picks <|endoftext|>, [SEP], </s>, ... whichever exists

  config.model = model = ml_collections.ConfigDict()
  model.num_layers = 6  # Transformer blocks
  model.d_model = 384  # residual width
  model.num_heads = 6  # attention heads (d_model / num_heads must be even)
  model.mlp_dim = 1536  # SwiGLU hidden width
  model.max_len = 128  # longest sequence the model accepts
  model.block_size = 0  # objective=block: tokens per block (divides data.seq_len); 0 for other objectives
  model.time_conditioning = False  # adaLN on t; masked diffusion works without it (MD4, MDLM)
  model.dtype = "float32"  # compute dtype: float32 on CPU, bfloat16 on TPU; params stay float32
  model.remat = False  # rematerialise each block in the backward pass (saves memory)
  # Attention kernel; results agree to float tolerance and checkpoints load under any choice. einsum: the
  # project's heads-major einsums (the fastest measured on CPUs); xla: jax.nn's XLA path (the fewest HBM
  # bytes on TPUs); cudnn: jax.nn's fused cuDNN kernel (NVIDIA GPUs, bfloat16 only); auto: einsum on CPUs,
  # jax.nn's own choice elsewhere.
  model.attention_impl = "auto"

  config.diffusion = diff = ml_collections.ConfigDict()
  diff.name = "linear"  # masking schedule: linear | cosine | polynomial | geometric | mlm
  diff.power = 1.0  # polynomial schedule exponent
  diff.sigma_min = 1e-4  # geometric schedule rate at t=0
  diff.sigma_max = 20.0  # geometric schedule rate at t=1
  diff.mask_rate = 0.15  # mlm only: the fixed mask rate (BERT)

  config.optimizer = opt = ml_collections.ConfigDict()
  opt.learning_rate = 1e-3  # peak learning rate (AdamW)
  opt.warmup_steps = 200  # linear warmup from 0
  opt.decay = "cosine"  # after warmup: cosine | linear | constant
  opt.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
  opt.b1 = 0.9  # Adam beta1
  opt.b2 = 0.98  # Adam beta2
  opt.weight_decay = 0.03  # decoupled weight decay on matrices
  opt.grad_clip = 1.0  # global gradient-norm clip
  opt.ema_decay = 0.999  # EMA of parameters, used for evaluation and sampling

  config.training = tr = ml_collections.ConfigDict()
  tr.batch_size = 64  # global batch in sequences (divisible by the mesh's data x fsdp size)
  tr.num_steps = 20_000  # total optimizer steps
  tr.log_every = 50  # steps between metric writes
  tr.eval_every = 1000  # steps between validation ELBOs (0: only at the end)
  tr.sample_every = 1000  # steps between printed samples (and at the end; 0: never)
  tr.checkpoint_every = 500  # steps between checkpoints (and always at the end / on SIGTERM)
  tr.keep_checkpoints = 3  # newest checkpoints kept
  # AR -> diffusion adaptation (configs/demo_adapt.py): over the first N steps each position sees a linearly
  # growing random share of the later positions, from causal to bidirectional (DiffuLLaMA); 0 = off
  tr.attention_anneal_steps = 0
  # Forward and backward pass in this many microbatches per step, gradients summed (the same loss and update up
  # to float summation order): 0 = auto (CPUs: microbatches of ~512 tokens per device, which keep activations in
  # the caches; accelerators: 1); set N to fit a batch in memory (N divides the per-device batch)
  tr.microbatches = 0
  tr.on_nonfinite = "stop"  # a NaN/inf loss or gradient: stop (naming the last good checkpoint) | skip the update
  # jax.profiler traces of these steps (1 = the first step), one trace per run of consecutive steps, into
  # WORKDIR/profile (TensorBoard's profile tab, ui.perfetto.dev); e.g. --config.training.profile_steps="(10,11,12)"
  tr.profile_steps = ()
  # LoRA fine-tuning (diffusion_lm/lora.py) of config.init_from: the base frozen, low-rank adapters beside the
  # named projections trained (they alone get an optimizer state and an EMA); sample/evaluate/convert see the merged
  # weights. e.g. --config=configs/sft.py:WORKDIR --config.training.lora.rank=16
  tr.lora = lora = ml_collections.ConfigDict()
  lora.rank = 0  # adapter rank r; 0 = off (every parameter trains)
  lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank (as the LoRA paper and peft)
  # comma-separated projections: query, key, value, out (attention); wi_gate, wi_up, wo (gated MLP) or wi, wo (GELU)
  lora.targets = "query,key,value,out,wi_gate,wi_up,wo"
  lora.base_dtype = "float32"  # storage of the frozen base weights: float32 | bfloat16 (half the memory)
  tr.wandb_project = ""  # also log the scalars to this Weights & Biases project (needs pip install wandb); "" off

  config.evaluation = ev = ml_collections.ConfigDict()
  ev.batch_size = 64  # sequences per evaluation batch
  ev.max_batches = 0  # cap N: a seeded subset of N x batch_size windows spread over the split (0: all windows)
  ev.num_t_samples = 4  # stratified time draws per sequence for the ELBO
  ev.discrete_steps = 0  # also report the exact T-step discrete-time bound for this T (0 = off)
  ev.seed = 0  # fixed (>= 0): the capped subset and the time draws, so evaluation numbers are reproducible

  config.sampling = smp = ml_collections.ConfigDict()
  # ancestral | confidence | blocks | threshold | remdm, or the published decoders token for token: llada |
  # fast_dllm | dream (see diffusion_lm/samplers/__init__.py)
  smp.name = "ancestral"
  smp.steps = 128  # denoising steps T (threshold: the most it may take; it stops when nothing is masked)
  smp.temperature = 1.0  # softmax temperature (0 = argmax)
  smp.top_k = 0  # keep only the k most likely tokens (0 = off)
  smp.top_p = 1.0  # nucleus sampling mass (1 = off)
  smp.float64 = False  # float64 Gumbel noise for the categorical draws
  smp.time_grid = "uniform"  # ancestral/remdm time grid: uniform | cosine
  smp.cache = True  # ancestral/remdm: reuse logits after a step that changed nothing (time-independent models)
  smp.confidence = "max_prob"  # confidence/blocks/threshold/remdm-conf: max_prob | margin | entropy | random
  smp.commit_schedule = "linear"  # confidence/blocks: tokens committed per step, linear | cosine
  smp.approx_cache = "none"  # blocks on a masked-diffusion model: none | prefix | dual (Fast-dLLM, approximate)
  smp.block_length = 32  # blocks: tokens per semi-autoregressive block
  smp.threshold = 0.9  # threshold, fast_dllm: commit every prediction at least this confident (fast_dllm: 0 = off)
  smp.factor = 0.0  # fast_dllm: factor-based parallel decoding (0 = off)
  smp.eps = 1e-3  # dream: the time grid linspace(1, eps, steps + 1)
  smp.alg_temp = 0.0  # dream: > 0 samples the positions to reveal from softmax(confidence / alg_temp)
  smp.logits_eos_inf = False  # llada, fast_dllm: never draw the end-of-text token
  smp.confidence_eos_eot_inf = False  # llada, fast_dllm: end-of-text / end-of-turn drafts get no confidence
  smp.confidence_rounding = 0  # confidence/blocks/threshold/remdm: round confidences to 2^-n to rank (0 = exact)
  smp.remask_schedule = "cap"  # remdm (Wang et al. 2025): cap | rescale | conf | loop
  smp.remask_eta = 0.05  # remdm: eta of cap (sigma <= eta), rescale (sigma = eta sigma_max) and loop
  smp.remask_t_on = 1.0  # remdm: remask only while t_off < t <= t_on; loop: the window alpha is held in
  smp.remask_t_off = 0.0  # (the paper's OWT loop: t_on 0.55, t_off 0.05, alpha_on 0.9, eta 0.02)
  smp.remask_alpha_on = 0.9  # remdm loop: alpha held inside the window
  smp.guidance = 0.0  # classifier-free guidance weight on given tokens (0 = off)
  smp.final_step = "auto"  # ancestral/remdm: argmax (MDLM/ReMDM noise removal) | sample; auto: argmax, sample in blocks
  smp.top_p_rule = "auto"  # within (ReMDM/BD3-LM) | reach (transformers); auto: within for ancestral/remdm
  smp.num_samples = 4  # samples printed during training
  smp.prompt = ""  # prefix held fixed in training-time samples
  smp.seed = 0  # seed of training-time samples (the same every time, to watch progress)

  config.block = blk = ml_collections.ConfigDict()  # objective="block" (BD3-LM)
  # clipped noise schedules (BD3-LM's var_min): t drawn on a range [lo, hi] chosen at every evaluation as the one
  # of the grid below whose per-block losses vary least on the validation split (the ELBO is still reported on
  # [1e-4, 1]); False: t on [1e-4, 1] throughout
  blk.clip_search = True
  blk.clip_search_widths = (0.5, 0.6, 0.7, 0.8, 0.9)  # range widths searched (BD3-LM's LM1B / OWT scripts)
  blk.clip_search_delta = 0.05  # step between the starts of ranges of one width
  blk.clip_search_batches = 8  # validation batches per search (a seeded subset; BD3-LM: 100 of 512 rows)
  blk.resample = True  # redraw a block's masks until its masked share lies in the range (their training.resample)

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data-parallel axis (-1: all devices not used by the others)
  mesh.fsdp = 1  # parameter/optimizer sharding axis
  mesh.tensor = 1  # tensor-parallel axis
  return config
