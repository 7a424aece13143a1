"""Runs the published decoders' own code once on tiny random checkpoints: tests/fixtures/decoders.

The project's decoders (LLaDA `generate`, Fast-dLLM's cached and parallel decoding, Dream's
`diffusion_generate`) are tested token for token against what the authors' code produced here. This
script makes those references; the project never imports torch or the authors' code.

Reproduce (Python 3.11, CPU):

  python -m venv /work/venv-ref
  /work/venv-ref/bin/pip install torch==2.13.0 numpy safetensors tokenizers 'transformers==4.49.0'
  # the reference code, extracted from git (never copied into this repository):
  #   github.com/ML-GSAI/LLaDA       at b7e6c3565f194352da44b38dd12b6970597309f3  -> /tmp/ref19/LLaDA
  #   github.com/hills-code/Fast-dLLM at 6a7ab2f9573bb5721e88ff0411bb020aade1b1a0 -> /tmp/ref19/Fast-dLLM
  #     (the fork of Fast-dLLM's first author, Chengyue Wu; it continues NVlabs/Fast-dLLM main
  #      24cc59e75f20a6384bae8c905965bb090b96388e with his commit cb3a757 of 2025-07-06 that adds the
  #      `factor` argument, the version published on NVlabs/Fast-dLLM in July 2025)
  git clone https://github.com/ML-GSAI/LLaDA /tmp/ref19/LLaDA && git -C /tmp/ref19/LLaDA checkout b7e6c35
  git clone https://github.com/hills-code/Fast-dLLM /tmp/ref19/Fast-dLLM && git -C /tmp/ref19/Fast-dLLM checkout 6a7ab2f
  /work/venv-ref/bin/python tools/make_decoder_fixtures.py --llada=/tmp/ref19/LLaDA --fast_dllm=/tmp/ref19/Fast-dLLM

It rewrites tests/fixtures/decoders/{llada_gen,dream_gen,cases.json}; the run is deterministic (fixed
seeds, CPU float32) and takes a minute or two.

The reference functions (`reference` in cases.json names repository:file:function):
  LLaDA:generate.py:generate                         LLaDA's semi-autoregressive low-confidence remasking,
                                                      with classifier-free guidance and its two EOS options.
  Fast-dLLM:llada/generate.py:generate               Fast-dLLM on LLaDA, no cache; step-count schedule,
                                                      `threshold` (commit every masked token of the block
                                                      whose confidence >= threshold, at least one) or
                                                      `factor` (get_transfer_index_dynamic: commit the n most
                                                      confident while the n-th confidence >= 1 - factor/(n+1)).
  Fast-dLLM:llada/generate.py:generate_with_prefix_cache / generate_with_dual_cache
                                                      the same with the prefix (or prefix and suffix) keys and
                                                      values cached once per block by Fast-dLLM's LLaDA model
                                                      (llada/model/modeling_llada.py).
  Fast-dLLM:dream/model/generation_utils.py:DreamGenerationMixin.diffusion_generate
                                                      Fast-dLLM's copy of Dream's generation_utils.py: Dream's
                                                      algorithms origin / maskgit_plus / topk_margin / entropy,
                                                      plus Fast-dLLM's `confidence_threshold` (no cache).
  Fast-dLLM:dream/model/generation_utils_block.py:DreamGenerationMixin.diffusion_generate
                                                      Fast-dLLM on Dream with blocks and a prefix cache, or a
                                                      dual cache (`dual_cache=True`); `alg="confidence_threshold"`
                                                      decodes by threshold, any other alg by the entropy schedule.
  Both Dream functions run on Fast-dLLM's cache-capable dream/model/modeling_dream.py.

The checkpoints (every weight drawn at random, norm scales included) are in the layouts that
`python -m diffusion_lm.convert --from_hf=DIR` imports: llada_gen in LLaDA's names and config.json,
dream_gen in Qwen2's names with model_type "Dream". The head is scaled up so the logits are peaky
enough for rankings to be far from ties. Each folder holds reference.npz = {"tokens", "logits"}: the
reference model's float32 logits on a masked input, raw (Dream's unshifted), for checking the import.

Two things the reference runs do to the models' logits, both recorded in cases.json:
  * The [MASK] column is set to -1e9, as the project's imported model does (diffusion_lm.model.MASK_LOGIT):
    real LLaDA and Dream never predict [MASK]; a random tiny head would, and the softmax confidences would
    then differ from the project's. A forward hook does this; the decoders themselves run unchanged.
  * LLaDA's EOS options name token ids 126081 (<|endoftext|>) and 126348 (<|eot_id|>), outside a tiny
    vocabulary. Those cases run a copy of LLaDA's `generate` made at run time from its source with just
    these two literals replaced: 126081 -> 74 and 126348 -> 73 (EOS_STAND_IN, EOT_STAND_IN below),
    ids the tiny model often predicts; each such case is checked to differ from the run without its options.

Robustness: every case is also run in float64 and with N(0, 1e-4^2) noise added to the logits (about three
times the float32 difference measured between these models and the project's import); a case whose tokens
change is redrawn with another prompt (its `attempt` counts the prompts drawn before it). A case that
turns an option on (classifier-free guidance, an EOS option) must also differ from the same run with the
option off (`ablation`), else it would test nothing and is redrawn too. Per case,
`forward_passes` counts the model's calls (a batch with classifier-free guidance is one call),
`commit_counts` the masked positions committed after each call (per batch row), and
`min_top2_logit_gap` the smallest top-1 minus top-2 logit over all masked positions the model saw.

Randomness-dependent settings (LLaDA remasking="random", temperature > 0, Dream's origin with more
than one step, alg_temp > 0) draw from torch's generator and cannot be matched token for token; instead
`filters` records Dream's own top_p_logits / top_k_logits on fixed random rows.
"""

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "decoders")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "hf", "llada", "tokenizer.json")
VOCAB, EOS_ID, MASK_ID = 96, 0, 2  # EOS and [MASK] as in the tokenizer of tests/fixtures/hf
# LLaDA's EOS options name ids 126081 (<|endoftext|>) and 126348 (<|eot_id|>); here two ordinary ids that the
# tiny LLaDA-layout model often predicts stand in for them, so that the options change what is generated.
EOS_STAND_IN, EOT_STAND_IN = 74, 73
PROMPT_IDS = (3, 60)  # prompts draw ordinary tokens of the tokenizer, never a special one
MASK_LOGIT = -1e9  # diffusion_lm.model.MASK_LOGIT
HEAD_SCALE = 3.0
PERTURBATION = 1e-4  # about three times the float32 logit difference between torch and the JAX import
COMMITS = {"LLaDA": "b7e6c3565f194352da44b38dd12b6970597309f3",
           "Fast-dLLM": "6a7ab2f9573bb5721e88ff0411bb020aade1b1a0"}


# ----------------------------------------------------------------------------- loading the reference code

def load_module(name, path, aliases=None):
  """Imports the file at `path` as module `name`; `aliases` maps names in sys.modules while it loads."""
  saved = {}
  for alias, module in (aliases or {}).items():
    saved[alias] = sys.modules.get(alias)
    sys.modules[alias] = module
  try:
    is_package = os.path.basename(path) == "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[os.path.dirname(path)] if is_package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  finally:
    for alias, previous in saved.items():
      if previous is None:
        sys.modules.pop(alias, None)
      else:
        sys.modules[alias] = previous
  return module


def load_reference(llada_dir, fast_dir):
  ref = types.SimpleNamespace()
  ref.llada = load_module("ref_llada_generate", os.path.join(llada_dir, "generate.py"))
  with open(os.path.join(llada_dir, "generate.py")) as f:
    source = f.read()
  assert source.count("126081") == 2 and source.count("126348") == 1, "LLaDA's EOS literals moved"
  ref.llada_eos = types.ModuleType("ref_llada_generate_eos")
  source = source.replace("126081", str(EOS_STAND_IN)).replace("126348", str(EOT_STAND_IN))
  code = compile(source, "LLaDA/generate.py (EOS ids replaced)", "exec")
  exec(code, ref.llada_eos.__dict__)  # pylint: disable=exec-used
  ref.llada_model = load_module("ref_fast_llada_model", os.path.join(fast_dir, "llada", "model", "__init__.py"))
  ref.fast_llada = load_module("ref_fast_llada_generate", os.path.join(fast_dir, "llada", "generate.py"),
                               aliases={"model": ref.llada_model,
                                        "model.modeling_llada": ref.llada_model.modeling_llada})
  ref.dream_model = load_module("ref_fast_dream_model", os.path.join(fast_dir, "dream", "model", "__init__.py"))
  ref.dream_block = load_module("ref_fast_dream_model.generation_utils_block",
                                os.path.join(fast_dir, "dream", "model", "generation_utils_block.py"))
  ref.dream_plain = sys.modules["ref_fast_dream_model.generation_utils"]
  return ref


# ----------------------------------------------------------------------------- tiny random checkpoints

def randomize(model, seed):
  """Every parameter drawn: matrices N(0, 0.3^2), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.3 * noise)
    model.lm_head.weight.mul_(HEAD_SCALE)


def bidirectional_logits(model, tokens):
  """transformers' Llama/Qwen2 with an all-zero additive 4-D mask: the plain, cache-free forward."""
  for layer in model.model.layers:
    layer.self_attn.is_causal = False
  ids = torch.tensor(tokens, dtype=torch.long)
  mask = torch.zeros((ids.shape[0], 1, ids.shape[1], ids.shape[1]), dtype=torch.float32)
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask).logits.numpy()


def save_safetensors(tensors, folder):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"),
            metadata={"format": "pt"})


def make_llada(folder, ref, tokens):
  """LLaDA layout: LlamaForCausalLM weights under LLaDA's names, loaded into Fast-dLLM's LLaDAModelLM."""
  config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                    rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False,
                                    attn_implementation="eager")
  plain = transformers.LlamaForCausalLM(config).eval()
  randomize(plain, 11)
  names = {"model.embed_tokens.weight": "model.transformer.wte.weight",
           "model.norm.weight": "model.transformer.ln_f.weight", "lm_head.weight": "model.transformer.ff_out.weight"}
  per_layer = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
               "self_attn.o_proj": "attn_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
               "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
  tensors = {}
  for name, p in plain.state_dict().items():
    if name in names:
      tensors[names[name]] = p
    elif "rotary" not in name:
      _, _, index, rest = name.split(".", 3)
      module, kind = rest.rsplit(".", 1)
      tensors[f"model.transformer.blocks.{index}.{per_layer[module]}.{kind}"] = p
  c = config
  llada_config = {
      "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": c.hidden_size,
      "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers,
      "mlp_hidden_size": c.intermediate_size,
      "mlp_ratio": 4, "vocab_size": VOCAB, "embedding_size": VOCAB, "max_sequence_length": c.max_position_embeddings,
      "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps, "mask_token_id": MASK_ID, "eos_token_id": EOS_ID,
      "pad_token_id": EOS_ID, "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
      "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
      "input_emb_norm": False, "scale_logits": False, "block_group_size": 1}
  os.makedirs(folder)
  save_safetensors(tensors, folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(llada_config, f, indent=2)
  shutil.copy(TOKENIZER, os.path.join(folder, "tokenizer.json"))

  model = ref.llada_model.modeling_llada.LLaDAModelLM(
      ref.llada_model.configuration_llada.LLaDAConfig(**llada_config), init_params=False).eval()
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
  with torch.no_grad():
    got = model(torch.tensor(tokens)).logits.numpy()
  want = bidirectional_logits(plain, tokens)
  np.savez_compressed(os.path.join(folder, "reference.npz"), tokens=tokens.astype(np.int32), logits=got)
  return model, float(np.abs(got - want).max())


def make_dream(folder, ref, tokens):
  """Dream layout: Qwen2ForCausalLM weights and names, config model_type "Dream"; Fast-dLLM's DreamModel."""
  config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    rms_norm_eps=1e-6, rope_theta=1000.0, tie_word_embeddings=False,
                                    eos_token_id=EOS_ID, bos_token_id=EOS_ID, attn_implementation="eager")
  plain = transformers.Qwen2ForCausalLM(config).eval()
  randomize(plain, 12)
  tensors = {k: v for k, v in plain.state_dict().items() if "rotary" not in k}
  dream_config = {
      "architectures": ["DreamModel"], "model_type": "Dream", "vocab_size": VOCAB, "hidden_size": 32,
      "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 1000.0,
      "rope_scaling": None, "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
      "max_window_layers": 2, "attention_dropout": 0.0, "mask_token_id": MASK_ID, "pad_token_id": EOS_ID,
      "eos_token_id": EOS_ID, "bos_token_id": EOS_ID, "torch_dtype": "float32"}
  os.makedirs(folder)
  save_safetensors(tensors, folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dream_config, f, indent=2)
  shutil.copy(TOKENIZER, os.path.join(folder, "tokenizer.json"))

  model_config = ref.dream_model.DreamConfig(**dream_config)
  model_config._attn_implementation = "sdpa"  # pylint: disable=protected-access
  model = ref.dream_model.DreamModel(model_config).eval()
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
  with torch.no_grad():
    got = model(torch.tensor(tokens), "full").logits.numpy()
  want = bidirectional_logits(plain, tokens)
  np.savez_compressed(os.path.join(folder, "reference.npz"), tokens=tokens.astype(np.int32), logits=got)
  return model, float(np.abs(got - want).max())


# ----------------------------------------------------------------------------- instrumented runs

class Probe:
  """Forward hooks on the reference model: counts calls, records masked counts, edits the logits."""

  def __init__(self, model, batch, perturb=None):
    self.batch, self.perturb, self.calls, self.masked, self.min_gap = batch, perturb, 0, [], float("inf")
    self.handles = [model.register_forward_pre_hook(self.before, with_kwargs=True),
                    model.register_forward_hook(self.after, with_kwargs=True)]

  def before(self, module, args, kwargs):
    del module
    ids = args[0] if args else kwargs["input_ids"]
    full = ids._base if ids._base is not None else ids  # cached calls see a slice of the whole sequence
    self.masked.append((full[:self.batch] == MASK_ID).sum(-1).tolist())
    self.calls += 1
    self.ids = ids

  def after(self, module, args, kwargs, output):
    del module, args, kwargs
    logits = output.logits
    logits[..., MASK_ID] = MASK_LOGIT
    if self.perturb is not None:
      logits.add_(PERTURBATION * torch.randn(logits.shape, generator=self.perturb, dtype=torch.float64)
                  .to(logits.dtype))
    masked = self.ids == MASK_ID
    if masked.any():
      top2 = torch.topk(logits[masked].double(), 2, dim=-1).values
      self.min_gap = min(self.min_gap, float((top2[:, 0] - top2[:, 1]).min()))
    return output

  def close(self, final):
    for h in self.handles:
      h.remove()
    after = self.masked[1:] + [(final == MASK_ID).sum(-1).tolist()]
    return [[b - a for b, a in zip(before, later)] for before, later in zip(self.masked, after)]


def run_case(case, models, ref, mode="float32"):
  """Runs one case; returns (output ids, forward passes, commit counts, min gap, extra)."""
  model = models[case["model"]]
  dtype = torch.float64 if mode == "float64" else torch.float32
  model.to(dtype)
  prompt = torch.tensor(case["prompt"], dtype=torch.long)
  perturb = torch.Generator().manual_seed(1234) if mode == "perturbed" else None
  probe = Probe(model, prompt.shape[0], perturb)
  kwargs = dict(case["kwargs"])
  extra = {}
  fn = case["reference"]
  try:
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
      if fn.startswith("LLaDA:"):
        module = ref.llada_eos if (kwargs.get("logits_eos_inf") or kwargs.get("confidence_eos_eot_inf")) else ref.llada
        attention_mask = kwargs.pop("attention_mask", None)
        mask = None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
        out = module.generate(model, prompt, mask, **kwargs)
      elif fn.startswith("Fast-dLLM:llada/"):
        name = fn.rsplit(":", 1)[1]
        out, nfe = getattr(ref.fast_llada, name)(model, prompt, **kwargs)
        extra["nfe_reported"] = int(nfe)
      else:
        utils = ref.dream_block if "generation_utils_block" in fn else ref.dream_plain
        model.diffusion_generate = types.MethodType(utils.DreamGenerationMixin.diffusion_generate, model)
        model._sample = types.MethodType(utils.DreamGenerationMixin._sample, model)  # pylint: disable=protected-access
        out = model.diffusion_generate(prompt, **kwargs)
  finally:
    model.to(torch.float32)
  commits = probe.close(out)
  return out.tolist(), probe.calls, commits, probe.min_gap, extra


# ----------------------------------------------------------------------------- the grid

def cases():
  """(id, model, reference, kwargs, prompt length, batch) for every case."""
  grid = []
  llada = "LLaDA:generate.py:generate"
  for p, g, b, s in [(5, 32, 8, 12), (6, 32, 8, 32), (8, 32, 16, 12), (13, 32, 16, 8), (5, 24, 8, 9),
                     (13, 24, 8, 24), (6, 24, 24, 9), (8, 32, 32, 12), (13, 32, 8, 16)]:
    grid.append((f"llada-lowconf-p{p}-g{g}-b{b}-s{s}", "llada_gen", llada,
                 dict(steps=s, gen_length=g, block_length=b, temperature=0.0, cfg_scale=0.0,
                      remasking="low_confidence", mask_id=MASK_ID, attention_mask=None), p, 1))
  for p, g, b, s in [(6, 32, 8, 12), (13, 24, 8, 9)]:
    grid.append((f"llada-cfg1.5-p{p}-g{g}-b{b}-s{s}", "llada_gen", llada,
                 dict(steps=s, gen_length=g, block_length=b, temperature=0.0, cfg_scale=1.5,
                      remasking="low_confidence", mask_id=MASK_ID), p, 1))
  for tag, eos in [("eosinf", dict(logits_eos_inf=True)), ("confeosinf", dict(confidence_eos_eot_inf=True)),
                   ("botheos", dict(logits_eos_inf=True, confidence_eos_eot_inf=True))]:
    grid.append((f"llada-{tag}-p5-g32-b8-s12", "llada_gen", llada,
                 dict(steps=12, gen_length=32, block_length=8, temperature=0.0, cfg_scale=0.0,
                      remasking="low_confidence", mask_id=MASK_ID, attention_mask=None, **eos), 5, 1))
  grid.append(("llada-lowconf-batch2-p6-g32-b8-s12", "llada_gen", llada,
               dict(steps=12, gen_length=32, block_length=8, temperature=0.0, cfg_scale=0.0,
                    remasking="low_confidence", mask_id=MASK_ID, attention_mask=None), 6, 2))
  grid.append(("llada-cfg1.5-batch2-p6-g24-b8-s9", "llada_gen", llada,
               dict(steps=9, gen_length=24, block_length=8, temperature=0.0, cfg_scale=1.5,
                    remasking="low_confidence", mask_id=MASK_ID), 6, 2))

  fast = "Fast-dLLM:llada/generate.py:"
  caches = [("nocache", "generate"), ("prefix", "generate_with_prefix_cache"), ("dual", "generate_with_dual_cache")]
  for cache, fn in caches:
    grid.append((f"fastllada-{cache}-steps-p5-g32-b8-s12", "llada_gen", fast + fn,
                 dict(steps=12, gen_length=32, block_length=8, temperature=0.0, remasking="low_confidence",
                      mask_id=MASK_ID, threshold=None, factor=None), 5, 1))
    for threshold, p in [(0.5, 5), (0.9, 13)]:
      grid.append((f"fastllada-{cache}-thr{threshold}-p{p}-g32-b8", "llada_gen", fast + fn,
                   dict(steps=32, gen_length=32, block_length=8, temperature=0.0, remasking="low_confidence",
                        mask_id=MASK_ID, threshold=threshold, factor=None), p, 1))
    for factor, p, b in [(1.0, 6, 8), (2.0, 13, 16)]:
      grid.append((f"fastllada-{cache}-factor{factor}-p{p}-g32-b{b}", "llada_gen", fast + fn,
                   dict(steps=32, gen_length=32, block_length=b, temperature=0.0, remasking="low_confidence",
                        mask_id=MASK_ID, threshold=None, factor=factor), p, 1))

  dream = "Fast-dLLM:dream/model/generation_utils.py:DreamGenerationMixin.diffusion_generate"
  for alg in ("maskgit_plus", "topk_margin", "entropy"):
    for steps in (8, 32):
      for p in (5, 8):
        grid.append((f"dream-{alg}-p{p}-n32-s{steps}", "dream_gen", dream,
                     dict(max_new_tokens=32, eps=1e-3, steps=steps, alg=alg, alg_temp=0.0, temperature=0.0, top_p=None,
                          top_k=None, output_history=False, return_dict_in_generate=False), p, 1))
  grid.append(("dream-entropy-p5-n32-s12", "dream_gen", dream,
               dict(max_new_tokens=32, eps=1e-3, steps=12, alg="entropy", alg_temp=0.0, temperature=0.0, top_p=None,
                    top_k=None, output_history=False, return_dict_in_generate=False), 5, 1))
  grid.append(("dream-maskgit_plus-batch2-p8-n32-s8", "dream_gen", dream,
               dict(max_new_tokens=32, eps=1e-3, steps=8, alg="maskgit_plus", alg_temp=0.0, temperature=0.0, top_p=None,
                    top_k=None, output_history=False, return_dict_in_generate=False), 8, 2))
  grid.append(("dream-origin-p5-n32-s1", "dream_gen", dream,
               dict(max_new_tokens=32, eps=1e-3, steps=1, alg="origin", alg_temp=0.0, temperature=0.0, top_p=None,
                    top_k=None, output_history=False, return_dict_in_generate=False), 5, 1))
  for threshold, p in [(0.5, 5), (0.9, 5), (0.9, 8)]:
    grid.append((f"fastdream-nocache-thr{threshold}-p{p}-n32-s8", "dream_gen", dream,
                 dict(max_new_tokens=32, eps=1e-3, steps=8, alg="confidence_threshold", alg_temp=0.0, temperature=0.0,
                      top_p=None, top_k=None, threshold=threshold, output_history=False,
                      return_dict_in_generate=False), p, 1))
  block = "Fast-dLLM:dream/model/generation_utils_block.py:DreamGenerationMixin.diffusion_generate"
  for dual in (False, True):
    cache = "dual" if dual else "prefix"
    for threshold, p in [(0.5, 5), (0.9, 8)]:
      grid.append((f"fastdream-{cache}-thr{threshold}-p{p}-n32-b8", "dream_gen", block,
                   dict(max_new_tokens=32, eps=1e-3, steps=32, alg="confidence_threshold", alg_temp=0.0,
                        temperature=0.0, top_p=None, top_k=None, threshold=threshold, block_length=8, dual_cache=dual,
                        output_history=False, return_dict_in_generate=False), p, 1))
    grid.append((f"fastdream-{cache}-entropy-p5-n32-b8-s16", "dream_gen", block,
                 dict(max_new_tokens=32, eps=1e-3, steps=16, alg="entropy", alg_temp=0.0, temperature=0.0,
                      top_p=None, top_k=None, block_length=8, dual_cache=dual, output_history=False,
                      return_dict_in_generate=False), 5, 1))
  return grid


def notes_for(case, commits_per_call):
  """What a reader of the case should know about the reference's behaviour in it."""
  kwargs, fn, notes = case["kwargs"], case["reference"], []
  if fn.startswith("LLaDA:"):
    notes.append("attention_mask is generate's third positional argument")
    if kwargs.get("cfg_scale", 0.0) > 0:
      notes.append("with cfg_scale > 0 LLaDA's generate needs an attention_mask (it names attention_mask_ only "
                   "when one is given), so a row of ones is passed; the prompt and its unconditional copy "
                   "(prompt positions set to [MASK]) run as one batch of 2B rows, one forward pass")
    if kwargs.get("logits_eos_inf") or kwargs.get("confidence_eos_eot_inf"):
      notes.append(f"EOS ids replaced: 126081 -> {EOS_STAND_IN}, 126348 -> {EOT_STAND_IN}; at temperature 0 "
                   "logits_with_noise is logits, so confidence_eos_eot_inf sets both ids to -inf in the logits "
                   "after the argmax: a position whose argmax is one of them keeps it but has confidence 0")
  elif fn.startswith("Fast-dLLM:llada/"):
    notes.append("Fast-dLLM's LLaDA decoders build x with batch 1; nfe_reported is the count they return")
    if "cache" in fn:
      notes.append("each block starts with a full forward that also commits tokens; the loop stops as soon as the "
                   "block has no [MASK], before another forward")
  elif "generation_utils_block" in fn:
    notes.append("each block starts with a full forward that commits only the block's first position; the "
                 + ("threshold loop commits the top tokens of the block with confidence >= threshold (at least one)"
                    if kwargs["alg"] == "confidence_threshold" else
                    "step loop always ranks by negative entropy whatever alg says, over steps // num_blocks steps"))
  else:
    if kwargs["alg"] == "origin":
      notes.append("with steps=1 origin transfers every masked position (p_transfer = 1), so its torch.rand "
                   "draws do not matter; with more steps they do and no JAX run can match them")
    elif kwargs["alg"] == "confidence_threshold":
      notes.append("Fast-dLLM's no-cache threshold decoding: steps must divide the masked count; tokens held back "
                   "by the threshold roll over to the next step's quota, and steps grow past the given count "
                   "until all are committed")
    else:
      notes.append("number committed = int(masked * (1 - s / t)) on torch.linspace(1, eps, steps + 1) in float32, "
                   "the last step commits the rest")
  return "; ".join(notes)


def ablations(kwargs):
  """The settings that switch a case's options off: its output must differ with them."""
  off = {}
  if kwargs.get("cfg_scale", 0.0) > 0:
    off["cfg_scale"] = 0.0
  for option in ("logits_eos_inf", "confidence_eos_eot_inf"):
    if kwargs.get(option):
      off[option] = False
  return off


def draw_prompt(case_id, attempt, length, batch):
  seed = int(hashlib.sha256(f"{case_id}/{attempt}".encode()).hexdigest()[:8], 16)
  rng = np.random.default_rng(seed)
  return rng.integers(*PROMPT_IDS, size=(batch, length)).tolist()


def filters(ref):
  rng = np.random.default_rng(7)
  logits = torch.tensor(rng.normal(0.0, 2.0, size=(3, 16)), dtype=torch.float32)
  out = []
  for name, kwargs in [("top_p_logits", dict(top_p=0.9)), ("top_p_logits", dict(top_p=0.5)),
                       ("top_k_logits", dict(top_k=3))]:
    filtered = getattr(ref.dream_plain, name)(logits.clone(), **kwargs)
    out.append({"reference": f"Fast-dLLM:dream/model/generation_utils.py:{name}", "kwargs": kwargs,
                "logits": logits.tolist(), "filtered": filtered.tolist(),
                "notes": "removed entries are torch.finfo(float32).min"})
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--llada", required=True, help="folder of github.com/ML-GSAI/LLaDA")
  parser.add_argument("--fast_dllm", required=True, help="folder of Fast-dLLM (hills-code/Fast-dLLM)")
  args = parser.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(1)
  ref = load_reference(args.llada, args.fast_dllm)
  commits = dict(COMMITS)
  for name, folder in [("LLaDA", args.llada), ("Fast-dLLM", args.fast_dllm)]:
    if os.path.isdir(os.path.join(folder, ".git")):
      head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
      assert head == commits[name], f"{name} is at {head}, expected {commits[name]}"

  for sub in ("llada_gen", "dream_gen"):
    shutil.rmtree(os.path.join(OUT, sub), ignore_errors=True)
  os.makedirs(OUT, exist_ok=True)
  rng = np.random.default_rng(0)
  tokens = rng.integers(*PROMPT_IDS, size=(2, 24))
  tokens = np.where(rng.random(tokens.shape) < 0.5, MASK_ID, tokens)
  llada, llada_err = make_llada(os.path.join(OUT, "llada_gen"), ref, tokens)
  dream, dream_err = make_dream(os.path.join(OUT, "dream_gen"), ref, tokens)
  print(f"cache-capable reference models vs transformers' plain forward: llada {llada_err:.2e}, dream {dream_err:.2e}")
  assert max(llada_err, dream_err) < 1e-4
  models = {"llada_gen": llada, "dream_gen": dream}

  records = []
  for case_id, model_name, reference, kwargs, length, batch in cases():
    for attempt in range(10):
      prompt = draw_prompt(case_id, attempt, length, batch)
      case = {"id": case_id, "model": model_name, "reference": reference, "kwargs": kwargs, "prompt": prompt}
      if kwargs.get("cfg_scale", 0.0) > 0:
        case["kwargs"] = dict(kwargs, attention_mask=[[1] * length] * batch)  # LLaDA's cfg path needs one
      output, calls, commits_per_call, gap, extra = run_case(case, models, ref)
      same = all(run_case(case, models, ref, mode)[0] == output for mode in ("float64", "perturbed"))
      ablation = ablations(case["kwargs"])
      if ablation:
        ablated = dict(case, kwargs=dict(case["kwargs"], **ablation))
        same = same and run_case(ablated, models, ref)[0] != output
      if same and not any(MASK_ID in row for row in output):
        break
      print(f"  {case_id}: attempt {attempt} is fragile, redrawing the prompt")
    else:
      raise RuntimeError(f"{case_id}: no robust prompt in 10 attempts")
    if ablation:
      case["ablation"] = ablation
    case["notes"] = notes_for(case, commits_per_call)
    case.update(output=output, forward_passes=calls, commit_counts=[list(c) for c in zip(*commits_per_call)],
                min_top2_logit_gap=round(gap, 6), attempt=attempt, **extra)
    for row, counts in zip(output, case["commit_counts"]):  # every generated position committed once
      assert len(counts) == calls and sum(counts) == len(row) - length, (case_id, counts)
    records.append(case)
    print(f"{case_id}: {calls} forward passes, commits {case['commit_counts'][0]}")

  notes = {
      "mask_logit": f"the reference model's logits[..., {MASK_ID}] were set to {MASK_LOGIT} after every forward",
      "eos_ids": f"LLaDA EOS options: 126081 -> {EOS_STAND_IN}, 126348 -> {EOT_STAND_IN} in a run-time copy of "
                 "generate.py; llada_eos_stand_ins gives them as {\"eos\": id, \"eot\": id}",
      "commit_counts": "per batch row, masked positions committed after each forward pass, in call order",
      "robustness": "each case gave the same tokens in float64 and with logits perturbed by "
                    f"N(0, {PERTURBATION}^2)"}
  payload = {"reference_commits": {"ML-GSAI/LLaDA": COMMITS["LLaDA"],
                                   "hills-code/Fast-dLLM (NVlabs/Fast-dLLM + factor)": COMMITS["Fast-dLLM"]},
             "mask_token_id": MASK_ID, "mask_logit": MASK_LOGIT,
             "llada_eos_stand_ins": {"eos": EOS_STAND_IN, "eot": EOT_STAND_IN},
             "torch": torch.__version__, "transformers": transformers.__version__, "notes": notes,
             "cases": records, "filters": filters(ref)}
  with open(os.path.join(OUT, "cases.json"), "w") as f:  # one case or filter a line, for readable diffs
    compact = lambda value: json.dumps(value, separators=(",", ":"))  # pylint: disable=unnecessary-lambda-assignment
    head = {k: v for k, v in payload.items() if k not in ("cases", "filters")}
    f.write(json.dumps(head, indent=1)[:-2] + ",\n")
    for key in ("cases", "filters"):
      rows = ",\n  ".join(compact(row) for row in payload[key])
      f.write(f' "{key}": [\n  {rows}\n ]' + (",\n" if key == "cases" else "\n}\n"))
  for root, _, files in os.walk(OUT):
    for name in sorted(files):
      path = os.path.join(root, name)
      print(f"{os.path.relpath(path, ROOT)}: {os.path.getsize(path) / 1024:.1f} KiB")


if __name__ == "__main__":
  main()
