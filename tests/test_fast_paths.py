"""The faster paths compute what the plain ones do: the last block and head at a few positions
(outputs_at, trunk), samplers that predict only where a step reveals, training in microbatches, and
forward passes in row pieces on CPUs."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import experiment, objectives, samplers, sharding
from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig, Transformer
from diffusion_lm.objectives.base import bind, bind_forward, bind_split, rows_in_pieces
from diffusion_lm.samplers import remdm
from diffusion_lm.samplers.common import SplitDenoiser, gather_width
from diffusion_lm.schedules import Schedule

VOCAB = 30
FAMILIES = {
    "default": {},
    "time conditioned": {"time_conditioning": True},
    "shifted (Dream)": {"shift_logits": True, "mask_token_id": 3},
    "GPT-2 like": {"tie_embeddings": True, "position": "learned", "norm": "layernorm", "mlp": "gelu",
                   "qkv_bias": True, "linear_bias": True},
    "grouped-query": {"num_kv_heads": 2},
    "jax.nn attention": {"attention_impl": "xla"},
    "remat": {"remat": True},
}


def _model(length=32, **fields):
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=3, d_model=64, num_heads=4, mlp_dim=96, max_len=length, **fields)
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (3, length), 0, VOCAB + 1)
  params = model.init(jax.random.key(0), tokens, jnp.full((3,), 0.5))["params"]
  # Away from the initialisation (zero adaLN and the like) so that every part of the network matters.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  params = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  return model, params, tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_at_and_trunk_equal_the_full_forward(family):
  model, params, tokens = _model(**FAMILIES[family])
  t = jnp.array([0.2, 0.5, 0.9])
  apply = functools.partial(model.apply, {"params": params})
  full = apply(tokens, t)
  positions = jnp.array([[0, 5, 31, 7], [3, 2, 1, 30], [30, 0, 11, 12]])
  expected = np.take_along_axis(np.asarray(full), np.asarray(positions)[:, :, None], axis=1)
  scale = float(np.max(np.abs(expected[np.abs(expected) < 1e8])))  # an in-vocabulary [MASK] logit is -1e9
  trunk = apply(tokens, t, return_trunk=True)
  assert trunk.shape == (3, 32, 64)
  np.testing.assert_allclose(apply(tokens, t, outputs_at=positions), expected, atol=2e-6 * scale)
  np.testing.assert_allclose(apply(tokens, t, trunk=trunk, outputs_at=positions), expected, atol=2e-6 * scale)
  np.testing.assert_allclose(apply(tokens, t, trunk=trunk), full, atol=2e-6 * scale)


def test_outputs_at_refuses_causal_and_cached_models():
  model, params, tokens = _model(causal=True)
  with pytest.raises(UserError, match="bidirectional"):
    model.apply({"params": params}, tokens, outputs_at=jnp.zeros((3, 2), jnp.int32))


def _oracle(length, seed=3):
  """A deterministic denoiser whose logits depend on the whole row (position, token counts), split
  exactly: logits_at gathers the full logits. Marks: positions=None adds `full_bias` to token 0, so a
  test can tell which branch of a step ran."""
  table = jax.random.normal(jax.random.key(seed), (length, VOCAB)) * 2.0

  def full(x_BxL, t_B):
    masked_B = jnp.sum(x_BxL == VOCAB, axis=-1).astype(jnp.float32)
    return table[None] + 0.05 * masked_B[:, None, None] * jnp.sin(jnp.arange(VOCAB))[None, None] + 0.0 * t_B[:, None, None]

  def split(full_bias=0.0):
    def logits_at(state, x_BxL, t_B, positions):
      logits = full(state, t_B)
      if positions is None:
        return logits.at[..., 0].add(full_bias)
      return jnp.take_along_axis(logits, positions[:, :, None], axis=1)
    return SplitDenoiser(trunk=lambda x, t: x, logits_at=logits_at)

  return full, split


SAMPLERS = {
    "ancestral T=64": dict(name="ancestral", steps=64),
    "ancestral T=16": dict(name="ancestral", steps=16),
    "ancestral argmax": dict(name="ancestral", steps=32, temperature=0.0),
    "ancestral top-p": dict(name="ancestral", steps=32, top_p=0.8),
    "ancestral cosine grid": dict(name="ancestral", steps=32, time_grid="cosine"),
    "remdm cap": dict(name="remdm", steps=32, remask_schedule="cap", remask_eta=0.05),
    "remdm conf max_prob": dict(name="remdm", steps=32, remask_schedule="conf", confidence="max_prob"),
    "remdm conf random": dict(name="remdm", steps=32, remask_schedule="conf", confidence="random"),
    "remdm loop": dict(name="remdm", steps=32, remask_schedule="loop", remask_t_on=0.55, remask_t_off=0.05,
                       remask_eta=0.05),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_split_sampler_is_the_plain_sampler_draw_for_draw(name):
  length = 64
  full, split = _oracle(length)
  cfg = samplers.SamplerConfig(**SAMPLERS[name])
  assert gather_width(length, cfg.steps)  # the gathered path is on
  tokens = jnp.full((6, length), VOCAB, jnp.int32).at[:, :4].set(7).at[:, -3:].set(9)  # prompt and suffix
  run = lambda s: jax.jit(lambda x: samplers.sample(full, jax.random.key(2), x, jnp.arange(6), cfg,
                                                    schedule=Schedule("linear"), mask_id=VOCAB, split=s,
                                                    return_trajectory=True))(tokens)
  plain, fast = run(None), run(split())
  np.testing.assert_array_equal(fast.tokens, plain.tokens)
  np.testing.assert_array_equal(fast.trajectory, plain.trajectory)
  np.testing.assert_array_equal(fast.num_calls, plain.num_calls)
  np.testing.assert_array_equal(fast.steps_used, plain.steps_used)


def test_a_step_predicts_at_every_position_exactly_when_a_row_reveals_more_than_the_width():
  length, width = 32, 4
  full, split = _oracle(length)
  run = samplers.common.Run(denoiser=full, keys_B=jax.random.split(jax.random.key(0), 2),
                            given_BxL=jnp.zeros((2, length), bool), cfg=samplers.SamplerConfig(name="ancestral", steps=8),
                            schedule=Schedule("linear"), mask_id=VOCAB, record_steps=0, time_independent=True)
  x = jnp.full((2, length), VOCAB, jnp.int32)
  keys = run.step_keys(0)
  # The full branch is marked: token 0 gets +1000, so it is drawn wherever that branch ran.
  marked = split(full_bias=1000.0)
  for counts, expect_full in (((4, 3), False), ((4, 5), True), ((1, 0), False)):
    reveal = jnp.arange(length)[None, :] < jnp.array(counts)[:, None]
    reveal = jnp.roll(reveal, 7, axis=1)  # not the first positions: positions are found, not assumed
    drawn, _ = jax.jit(lambda r: remdm._draw_revealed(run, marked, x, x, jnp.ones(2), keys, r, width, False))(reveal)
    reference, _ = samplers.draw_tokens(keys[:, 0], marked.logits_at(x, x, jnp.ones(2), None) if expect_full
                                        else full(x, jnp.ones(2)), run.cfg)
    np.testing.assert_array_equal(np.where(reveal, drawn, -1), np.where(reveal, reference, -1))


def test_the_model_sampler_with_split_and_pieces_matches_the_plain_one():
  length = 256  # 32 x 256 tokens x d_model 256: rows_in_pieces cuts the batch into pieces of 4 rows
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=256, num_heads=4, mlp_dim=256, max_len=length)
  model = Transformer(cfg)
  tokens = jnp.full((32, length), VOCAB, jnp.int32).at[:, :5].set(3)
  params = model.init(jax.random.key(0), tokens)["params"]
  np.testing.assert_allclose(jax.jit(bind_forward(model, params))(tokens), jax.jit(bind(model, params))(tokens),
                             atol=1e-5)
  sampler = samplers.SamplerConfig(name="ancestral", steps=32)
  run = lambda d, s: jax.jit(lambda x: samplers.sample(d, jax.random.key(1), x, jnp.arange(32), sampler,
                                                       schedule=Schedule("linear"), mask_id=VOCAB, split=s))(tokens)
  plain = run(bind(model, params), None)
  fast = run(bind_forward(model, params), bind_split(model, params))
  # Float rounding may differ between the paths; a flipped draw would show as a mismatch.
  assert float(jnp.mean(plain.tokens == fast.tokens)) > 0.999


def test_rows_in_pieces_keeps_every_row_in_its_place():
  x = jnp.arange(32 * 256, dtype=jnp.float32).reshape(32, 256)  # 32 x 256 x width 256 reaches CPU_CACHE_SPILL
  fn = lambda a, b, c: (a * 2 + jnp.sum(a, axis=-1, keepdims=True), None if b is None else b + c[:, None])
  whole = jax.jit(lambda a, c: fn(a, None, c))(x, jnp.arange(32.0))
  pieces = jax.jit(lambda a, c: rows_in_pieces(fn, a, None, c, width=256))(x, jnp.arange(32.0))
  np.testing.assert_array_equal(pieces[0], whole[0])
  assert pieces[1] is None


def _train_setup(config_name, microbatches):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{config_name}").get_config()
  with config.unlocked():
    config.model.update(num_layers=2, d_model=64, num_heads=4, mlp_dim=128)
    config.data.seq_len = config.model.max_len = 64
    config.training.batch_size = 8
    config.training.microbatches = microbatches
  vocab = 40
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = Transformer(experiment.model_config(config, vocab))
  tx, _ = experiment.make_optimizer(config)
  _, shardings = experiment.state_shardings(model, tx, mesh, 64)
  state = experiment.init_state(model, tx, mesh, jax.random.key(0), 64, shardings)
  return config, vocab, mesh, model, tx, state, shardings


@pytest.mark.parametrize("config_name", ["demo", "demo_ar", "demo_block", "sft_tiny"])
def test_microbatched_step_is_the_one_piece_step(config_name):
  out = {}
  for n in (1, 4):
    config, vocab, mesh, model, tx, state, shardings = _train_setup(config_name, n)
    assert experiment.microbatch_count(config, mesh) == n
    rows = np.random.default_rng(0).integers(0, vocab, (8, 64), dtype=np.int32)
    if config.objective == "sft":  # prompts of 3 to 59 tokens stored as their complement (data.source=jsonl)
      for b, row in enumerate(rows):
        row[:3 + 8 * b] = ~row[:3 + 8 * b]
    step = experiment.jit_train_step(config, model, tx, mesh, shardings, vocab, 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      state, metrics = step(state, jnp.asarray(rows), jax.random.key(3))
      state, metrics2 = step(state, jnp.asarray(rows), jax.random.key(3))
    out[n] = (metrics, metrics2, state.params)
  for name in ("loss", "grad_norm", "mask_rate"):
    np.testing.assert_allclose(float(out[4][0][name]), float(out[1][0][name]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(out[4][1][name]), float(out[1][1][name]), rtol=1e-5, err_msg=name)
  for a, b in zip(jax.tree.leaves(out[4][2]), jax.tree.leaves(out[1][2])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_microbatch_count_auto_and_errors():
  config, *_ = _train_setup("demo", 0)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  # CPU: pieces of about CPU_MICROBATCH_TOKENS tokens (512 // 64 = 8 rows): 8 rows -> 1 microbatch.
  assert experiment.microbatch_count(config, mesh) == 1
  with config.unlocked():
    config.training.batch_size = 32
  assert experiment.microbatch_count(config, mesh) == 1  # 32 x 64 x d_model 64 activations fit the caches
  with config.unlocked():
    config.model.d_model = 1024  # 32 x 64 x 1024 = CPU_CACHE_SPILL
  assert experiment.microbatch_count(config, mesh) == 4
  with config.unlocked():
    config.training.microbatches = 3
  with pytest.raises(UserError, match="training.microbatches=3"):
    experiment.microbatch_count(config, mesh)


def test_attention_annealing_trains_in_one_piece():
  diffusion = objectives.get("diffusion")
  assert diffusion.noise(None, jnp.zeros((2, 8), jnp.int32), jax.random.key(0), schedule=Schedule("linear"),
                         mask_id=5, bos_id=0, visible_future=0.5) is None
