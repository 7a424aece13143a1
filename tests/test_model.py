import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm.errors import UserError
from diffusion_lm.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=13, num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_len=16)


def _init(cfg, length=16):
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, length), 0, cfg.vocab_size + 1)
  params = nn.unbox(model.init(jax.random.key(1), tokens, jnp.full((2,), 0.5))["params"])
  return model, params, tokens


def test_logits_over_data_tokens_only():
  model, params, tokens = _init(CFG)
  logits = model.apply({"params": params}, tokens, jnp.full((2,), 0.5))
  assert logits.shape == (2, 16, CFG.vocab_size) and logits.dtype == jnp.float32
  assert params["embed"]["embedding"].shape == (128, CFG.d_model)  # 13 tokens + [MASK], padded


def test_parameters_carry_logical_axis_names():
  model = Transformer(CFG)
  boxed = model.init(jax.random.key(1), jnp.zeros((1, 16), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["block_0"]["query"]) == ("embed", "heads", "kv")
  assert tuple(specs["block_0"]["wi_gate"]["kernel"]) == ("embed", "mlp")
  assert tuple(specs["head"]["kernel"]) == ("embed", "vocab")


def _influence(cfg, position):
  """|d logits[position] / d embedding of every input position|, per position."""
  model, params, tokens = _init(cfg)

  # Gradient w.r.t. per-position additive perturbation of the embedding output.
  def perturbed(delta_LxD):
    logits = model.apply({"params": params}, tokens, jnp.full((2,), 0.5),
                         method=lambda m, x, t: _forward_with_delta(m, x, t, delta_LxD))
    return logits[0, position].sum()

  grad = jax.grad(perturbed)(jnp.zeros((tokens.shape[1], cfg.d_model)))
  return np.abs(np.asarray(grad)).sum(-1)


def _forward_with_delta(module, tokens, t, delta_LxD):
  # Intercept the embedding output and add delta (the gradient probe) to it.
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == "embed" and context.method_name == "__call__":
      out = out + delta_LxD[None]
    return out

  with nn.intercept_methods(interceptor):
    return module(tokens, t)


def test_bidirectional_attention_sees_both_sides():
  influence = _influence(CFG, position=8)
  assert influence[:8].min() > 0 and influence[9:].min() > 0


def test_causal_variant_ignores_later_tokens():
  influence = _influence(ModelConfig(**{**CFG.__dict__, "causal": True}), position=8)
  assert influence[9:].max() == 0 and influence[:9].min() > 0


def test_time_conditioning_only_when_enabled():
  model, params, tokens = _init(CFG)
  a = model.apply({"params": params}, tokens, jnp.full((2,), 0.1))
  b = model.apply({"params": params}, tokens, jnp.full((2,), 0.9))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg = ModelConfig(**{**CFG.__dict__, "time_conditioning": True})
  model, params, tokens = _init(cfg)
  # adaLN starts at zero (= unconditioned); perturb it to check t is wired through.
  params = jax.tree.map(lambda x: x, params)
  params["block_0"]["ada_ln"]["kernel"] = 0.1 * jnp.ones_like(params["block_0"]["ada_ln"]["kernel"])
  a = model.apply({"params": params}, tokens, jnp.full((2,), 0.1))
  b = model.apply({"params": params}, tokens, jnp.full((2,), 0.9))
  assert not np.allclose(np.asarray(a), np.asarray(b))


def test_remat_and_bfloat16_agree_with_reference():
  model, params, tokens = _init(CFG)
  ref = model.apply({"params": params}, tokens)
  remat = Transformer(ModelConfig(**{**CFG.__dict__, "remat": True})).apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(remat), np.asarray(ref), rtol=1e-5, atol=1e-5)
  bf16 = Transformer(ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})).apply({"params": params}, tokens)
  assert bf16.dtype == jnp.float32
  assert np.mean(np.abs(np.asarray(bf16) - np.asarray(ref))) < 0.1 * np.mean(np.abs(np.asarray(ref)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_layers=0), "model.num_layers=0"),
    (dict(d_model=30, num_heads=4), "d_model=30"),
    (dict(dtype="float16"), "model.dtype='float16'"),
])
def test_bad_model_config(kwargs, message):
  with pytest.raises(UserError, match=message):
    ModelConfig(**{**CFG.__dict__, **kwargs})


def test_sequence_longer_than_max_len():
  model, params, _ = _init(CFG)
  with pytest.raises(UserError, match="exceeds model.max_len=16"):
    model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def _dot_flops(jaxpr) -> float:
  """FLOPs of every dot_general in a jaxpr (2 per multiply-add), nested jaxprs included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      rhs_free = [n for i, n in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
      total += 2.0 * np.prod(lhs) * np.prod(rhs_free)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _dot_flops(inner)
  return total


def test_flops_per_token_by_hand():
  # CFG: 2 layers, d 32, MLP 64, 13 data tokens, 16 positions. Per layer q, k, v, out: 4 x 32 x 32 and
  # gate, up, down: 3 x 32 x 64 weights; the head 32 x 13 (its padding rows are not model FLOPs), so
  # N = 2 x 10240 + 416 = 20896. Attention per token and layer: scores 2 x 16 x 32 + values 2 x 16 x 32.
  forward = 2 * 20896 + 2 * 2048
  assert CFG.flops_per_token(16, training=False) == forward == 45888
  assert CFG.flops_per_token(16) == 3 * forward


@pytest.mark.parametrize("causal", [False, True])
def test_flops_per_token_counts_the_network_matmuls_less_the_padding(causal):
  cfg = ModelConfig(**{**CFG.__dict__, "causal": causal})
  model, params, tokens = _init(cfg)
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, tokens).jaxpr
  per_token = _dot_flops(jaxpr) / tokens.size
  # The network multiplies by all padded_vocab head columns; only vocab_size of them are model FLOPs.
  padding = 2 * cfg.d_model * (cfg.padded_vocab - cfg.vocab_size)
  assert per_token - padding == cfg.flops_per_token(tokens.shape[1], training=False)
