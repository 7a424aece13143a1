"""LoRA (diffusion_lm/lora.py, training.lora): zero adapters are the base network, only adapters train, the
merged kernels compute what the adapters do, and a LoRA-tuned imported LLaDA chats, exports merged and
imports back identically."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import import_llada_instruct, write_word_pairs

from diffusion_lm import chat, convert, experiment, lora, sharding
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig, Transformer

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}" \
           "{% if add_generation_prompt %}[assistant]{% endif %}"
# LLaMA-like with grouped-query attention and q/k/v biases (Qwen2), and GPT-2-like (GELU MLP wi/wo with biases,
# learned positions, LayerNorm): every projection kind and bias path of the blocks.
SHAPES = {
    "gated_gqa": dict(num_kv_heads=2, qkv_bias=True),
    "gelu": dict(mlp="gelu", linear_bias=True, qkv_bias=True, norm="layernorm", position="learned"),
}


def _configs(shape: str, rank=4, alpha=8.0):
  """(base ModelConfig, the same network with adapters on all its projections)."""
  base = ModelConfig(vocab_size=29, num_layers=2, d_model=32, num_heads=4, mlp_dim=48, max_len=16, **SHAPES[shape])
  targets = lora.ATTENTION_TARGETS + (lora.GATED_MLP_TARGETS if base.mlp == "swiglu" else lora.PLAIN_MLP_TARGETS)
  return base, dataclasses.replace(base, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)


def _tokens(seed=1, length=16):
  return jax.random.randint(jax.random.key(seed), (2, length), 0, 30)


def _init(cfg, seed=0):
  return nn.unbox(Transformer(cfg).init(jax.random.key(seed), _tokens())["params"])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_zero_adapters_reproduce_the_base_model_exactly(shape):
  base_cfg, lora_cfg = _configs(shape)
  base = _init(base_cfg, seed=3)
  _, adapters = lora.split(_init(lora_cfg))
  assert all(not np.any(np.asarray(v)) for k, v in _flat(adapters).items() if k.endswith("/b"))  # B starts at 0
  full = lora.combine(base, adapters)
  tokens, at = _tokens(), jnp.asarray([[0, 5, 9], [2, 3, 15]])
  for kwargs in ({}, {"outputs_at": at}):
    want = Transformer(base_cfg).apply({"params": base}, tokens, **kwargs)
    got = Transformer(lora_cfg).apply({"params": full}, tokens, **kwargs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _flat(tree, prefix=""):
  out = {}
  for name, value in tree.items():
    out.update(_flat(value, f"{prefix}{name}/") if isinstance(value, dict) else {f"{prefix}{name}": value})
  return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_merged_kernels_compute_the_adapter_forward(shape):
  """W + (alpha / r) A B in the base network equals x W + (alpha / r) (x A) B beside it: nonzero B, a scale of 2."""
  base_cfg, lora_cfg = _configs(shape, rank=4, alpha=8.0)
  base, adapters = lora.split(_init(lora_cfg))
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  adapters = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  full = lora.combine(base, adapters)
  merged = lora.merge(full, lora_cfg.lora_alpha / lora_cfg.lora_rank)
  assert jax.tree.structure(merged) == jax.tree.structure(base)  # the base's layout: no adapters left
  tokens, at = _tokens(), jnp.asarray([[0, 5, 9], [2, 3, 15]])
  for kwargs in ({}, {"outputs_at": at}):
    adapted = np.asarray(Transformer(lora_cfg).apply({"params": full}, tokens, **kwargs))
    folded = np.asarray(Transformer(base_cfg).apply({"params": merged}, tokens, **kwargs))
    plain = np.asarray(Transformer(base_cfg).apply({"params": base}, tokens, **kwargs))
    assert np.abs(adapted - plain).max() > 0.1  # the adapters do change the output
    np.testing.assert_allclose(folded, adapted, atol=2e-5, rtol=1e-5)


def _sft_tiny_lora(rank=4, base_dtype="bfloat16"):
  from configs import sft_tiny  # pylint: disable=g-import-not-at-top
  config = sft_tiny.get_config("unused.jsonl")
  config.training.update(batch_size=8, microbatches=1)
  config.training.lora.update(rank=rank, alpha=8.0, base_dtype=base_dtype)
  config.optimizer.update(warmup_steps=0, learning_rate=1e-2, weight_decay=0.1, ema_decay=0.5)
  return config


@pytest.mark.parametrize("microbatches", [1, 2])
def test_train_steps_move_only_the_adapters(microbatches):
  """The base (stored in bfloat16) stays bit for bit; the adapters, their Adam moments and EMA move; no optimizer
  state or EMA exists for the base."""
  config = _sft_tiny_lora()
  config.training.microbatches = microbatches
  vocab, length = 9, config.data.seq_len
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  model = Transformer(experiment.model_config(config, vocab))
  tx, _ = experiment.make_optimizer(config)
  _, shardings = experiment.state_shardings(model, tx, mesh, length, "bfloat16")
  state = experiment.init_state(model, tx, mesh, jax.random.key(0), length, shardings, "bfloat16")
  assert isinstance(state, experiment.LoraTrainState)
  assert {x.dtype for x in jax.tree.leaves(state.base)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  adapter_leaves = len(jax.tree.leaves(state.params))
  assert adapter_leaves == 2 * 7 * config.model.num_layers  # a and b of 7 projections per block
  assert all(lora.is_adapter(path[-2].key) for path, _ in jax.tree_util.tree_leaves_with_path(state.params))
  # Adam's two moments of the adapters (plus scalar counts), nothing of the base.
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert len(moments) == 2 * adapter_leaves
  base_before = jax.tree.map(np.asarray, state.base)
  adapters_before = jax.tree.map(np.asarray, state.params)
  rows = np.random.default_rng(0).integers(0, vocab, (8, length)).astype(np.int32)
  rows[:, :3] = ~rows[:, :3]
  step = experiment.jit_train_step(config, model, tx, mesh, shardings, vocab, 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    for _ in range(3):
      state, metrics = step(state, sharding.put_global(rows, mesh), jax.random.key(3))
  assert int(state.step) == 3 and float(metrics["finite"]) == 1.0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.base, base_before)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, adapters_before)
  assert min(jax.tree.leaves(moved)) > 0  # every A and B (B from zero)
  ema_moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.ema_params, adapters_before)
  assert min(jax.tree.leaves(ema_moved)) > 0


def test_bad_lora_settings_are_one_line_errors():
  from configs import sft_tiny  # pylint: disable=g-import-not-at-top
  cases = [({"rank": -1}, r"training.lora.rank=-1; allowed: an integer >= 0"),
           ({"rank": 4, "targets": ""}, r"training.lora.targets=''; allowed: distinct comma-separated names"),
           ({"rank": 4, "targets": "query,q_proj"}, r"training.lora.targets='query,q_proj'; allowed: .*wi_gate"),
           ({"rank": 4, "alpha": 0}, r"training.lora.alpha=0.0; allowed: a number > 0"),
           ({"rank": 4, "base_dtype": "float16"}, r"training.lora.base_dtype='float16'; allowed: float32, bfloat16")]
  for settings, message in cases:
    config = sft_tiny.get_config("pairs.jsonl")
    config.training.lora.update(settings)
    with pytest.raises(UserError, match=message) as error:
      experiment.check_config(config)
    assert "\n" not in str(error.value)
  config = sft_tiny.get_config("pairs.jsonl")  # a swiglu network has no wi
  config.training.lora.update(rank=4, targets="query,wi")
  with pytest.raises(UserError, match=r"names wi, which this model's blocks do not have; allowed: .*wi_gate"):
    experiment.model_config(config, 9)


def test_lora_without_init_from_is_refused(tmp_path):
  from diffusion_lm import train  # pylint: disable=g-import-not-at-top
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps({"prompt": "ab=", "response": "ba"}) for _ in range(20)) + "\n")
  config = _sft_tiny_lora()
  config.data.path = str(path)
  with pytest.raises(UserError, match="training.lora.rank=4 without init_from"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
  """The tiny LLaDA fixture with a chat template, imported."""
  return import_llada_instruct(tmp_path_factory.mktemp("lora"), TEMPLATE, max_len=32)


def test_lora_tune_an_imported_llada_chat_export_merged_and_import_back(instruct, tmp_path):
  """SFT with LoRA from the imported workdir (interrupted and resumed), then: the workdir opens as the merged
  network (chat works through its template), export writes merged kernels only, and importing the export
  gives exactly those parameters."""
  from configs import sft  # pylint: disable=g-import-not-at-top
  from diffusion_lm import train  # pylint: disable=g-import-not-at-top
  path = write_word_pairs(tmp_path / "pairs.jsonl")
  config = sft.get_config(instruct)
  config.data.update(path=str(path), validation_percent=30.0)
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  config.training.update(batch_size=8, num_steps=3, checkpoint_every=1, log_every=1)
  config.training.lora.update(rank=2, alpha=4.0)
  config.evaluation.update(batch_size=8, max_batches=1)
  tuned_dir = str(tmp_path / "tuned")
  train.train_and_evaluate(config, tuned_dir, stop_after=2)  # preempted after 2 steps
  train.train_and_evaluate(config, tuned_dir)  # rerun: resumes at step 2 and finishes
  source = experiment.load_trained(instruct)
  tuned = experiment.load_trained(tuned_dir)
  assert tuned.step == 3 and tuned.model.config == source.model.config  # the base network, no adapters
  assert jax.tree.structure(tuned.params) == jax.tree.structure(source.params)
  # The merged kernels moved off the base; everything the adapters do not reach (norms, embedding, head) did not.
  flat_tuned, flat_source = _flat(jax.device_get(tuned.params)), _flat(jax.device_get(source.params))
  for name, value in flat_tuned.items():
    gap = float(np.abs(np.asarray(value) - np.asarray(flat_source[name])).max())
    adapted = name.startswith("block_") and name.split("/")[1] in lora.TARGETS
    assert (gap > 0) == adapted, name
  # The raw checkpoint holds the base once, frozen: bit for bit the imported parameters.
  mesh = tuned.mesh
  model = Transformer(experiment.model_config(experiment.config_from_dict(_saved(tuned_dir)), tuned.model.config.vocab_size))
  tx, _ = experiment.make_optimizer(config)
  abstract, _ = experiment.state_shardings(model, tx, mesh, config.data.seq_len)
  from diffusion_lm import checkpointing  # pylint: disable=g-import-not-at-top
  _, state, _, _ = checkpointing.restore_latest(tuned_dir, abstract)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.base, source.params)

  messages = [{"role": "user", "content": "hi"}]
  template = chat.load_template(tuned_dir)
  assert template == TEMPLATE
  answer, gen = chat.reply(tuned, template, messages, max_new_tokens=4, steps=4, block_length=4)
  prompt = tuned.tokenizer.encode(f"[user]hi{tuned.tokenizer.eos_token}[assistant]")
  np.testing.assert_array_equal(gen.template[0][:len(prompt)], prompt)
  assert gen.template.shape[1] == len(prompt) + 4
  assert answer == tuned.tokenizer.decode(chat.answer_ids(gen.output.tokens[0][len(prompt):], tuned.tokenizer),
                                          show_mask=False)

  folder = str(tmp_path / "tuned_hf")
  convert.export_hf(tuned_dir, folder)
  tensors = convert.read_safetensors(folder)
  assert not [name for name in tensors if "lora" in name.lower()]
  back_dir = str(tmp_path / "back")
  convert.import_hf(folder, back_dir, max_len=32)
  back = experiment.load_trained(back_dir)
  assert back.model.config == tuned.model.config and chat.load_template(back_dir) == TEMPLATE
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, tuned.params)


def _saved(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)
