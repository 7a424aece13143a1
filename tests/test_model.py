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
    if "branches" in eqn.params:  # a cond (e.g. one branch per platform): one branch runs
      total += max(_dot_flops(branch.jaxpr) for branch in eqn.params["branches"])
      continue
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
@pytest.mark.parametrize("tensor", [1, 2])
@pytest.mark.parametrize("impl", ["auto", "einsum", "xla"])
def test_flops_per_token_counts_the_network_matmuls_less_the_padding(causal, tensor, impl):
  from diffusion_lm import sharding  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(**{**CFG.__dict__, "causal": causal, "attention_impl": impl})
  model, params, tokens = _init(cfg)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": tensor})
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, tokens).jaxpr
  per_token = _dot_flops(jaxpr) / tokens.size
  # With the vocabulary unsharded only its vocab_size head columns are multiplied; sharded over the
  # tensor axis, all padded_vocab of them (the padding divides the axis), of which vocab_size are model FLOPs.
  padding = 2 * cfg.d_model * (cfg.padded_vocab - cfg.vocab_size) if tensor > 1 else 0
  assert per_token - padding == cfg.flops_per_token(tokens.shape[1], training=False)


def _reference_attention(q, k, v, mask):
  """Softmax attention in float64 numpy from its definition; a row with no visible key averages all values."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum("bqhd,bshd->bhqs", q, k)
  visible = np.broadcast_to(mask, scores.shape)
  none_visible = ~visible.any(-1, keepdims=True)
  scores = np.where(none_visible, 0.0, np.where(visible, scores, -np.inf))
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqs,bshd->bqhd", weights, v)


def test_dot_attention_matches_softmax_attention_from_its_definition():
  from diffusion_lm.model import dot_attention  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (2, 5 if i == 0 else 7, 3, 4)) for i, kk in enumerate(keys[:3]))
  mask = np.array(jax.random.bernoulli(keys[3], 0.6, (5, 7)))
  mask[2] = False  # a query that may see nothing
  np.testing.assert_allclose(np.asarray(dot_attention(q, k, v, mask)), _reference_attention(q, k, v, mask),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dot_attention(q, k, v)), _reference_attention(q, k, v, np.ones((5, 7), bool)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bidirectional", "causal", "mask"])
def test_attention_implementations_agree(kind):
  cfg = ModelConfig(**{**CFG.__dict__, "causal": kind == "causal"})
  model, params, tokens = _init(cfg)
  kwargs = {}
  if kind == "mask":  # block-diffusion style: explicit positions and pattern
    kwargs = dict(positions_L=jnp.arange(16) // 2, mask_QxK=jnp.asarray(np.random.default_rng(0).random((16, 16)) < 0.5))
  out = {impl: np.asarray(Transformer(ModelConfig(**{**cfg.__dict__, "attention_impl": impl})).apply(
      {"params": params}, tokens, **kwargs)) for impl in ("auto", "einsum", "xla")}
  np.testing.assert_allclose(out["auto"], out["xla"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["auto"], out["einsum"])


def test_parameter_tree_is_the_checkpointed_layout():
  # Trained workdirs must keep loading: every name and shape as checkpoints store them.
  cfg = ModelConfig(**{**CFG.__dict__, "time_conditioning": True})
  model, params, _ = _init(cfg)
  d, h, k, m = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  block = {"attn_norm": {"scale": (d,)}, "query": (d, h, k), "key": (d, h, k), "value": (d, h, k), "out": (h, k, d),
           "mlp_norm": {"scale": (d,)}, "wi_gate": {"kernel": (d, m)}, "wi_up": {"kernel": (d, m)},
           "wo": {"kernel": (m, d)}, "ada_ln": {"kernel": (d, 6 * d), "bias": (6 * d,)}}
  expected = {"embed": {"embedding": (128, d)}, "final_norm": {"scale": (d,)}, "head": {"kernel": (d, 128)},
              "time_mlp_in": {"kernel": (d, d), "bias": (d,)}, "time_mlp_out": {"kernel": (d, d), "bias": (d,)},
              **{f"block_{i}": block for i in range(cfg.num_layers)}}
  assert jax.tree.map(lambda x: tuple(x.shape), params) == expected


@pytest.mark.parametrize("causal", [False, True])
def test_fused_and_separate_projections_and_both_heads_agree(monkeypatch, causal):
  from diffusion_lm import model as model_lib  # pylint: disable=g-import-not-at-top
  model, params, tokens = _init(ModelConfig(**{**CFG.__dict__, "causal": causal}))
  out = {}
  for fuse in (False, True):
    for sliced in (False, True):
      monkeypatch.setattr(model_lib, "_fuse_kernels", lambda tokens, d_model, fuse=fuse: fuse)
      monkeypatch.setattr(model_lib, "_vocab_unsharded", lambda sliced=sliced: sliced)
      out[fuse, sliced] = np.asarray(model.apply({"params": params}, tokens))
  for value in out.values():
    assert value.shape == (2, 16, CFG.vocab_size)
    np.testing.assert_allclose(value, out[False, False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_dot_attention_gradients_match_autodiff_of_the_definition(masked):
  from diffusion_lm.model import dot_attention  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(1), 5)
  q, k, v = (jax.random.normal(kk, (2, 5 if i == 0 else 7, 3, 4)) for i, kk in enumerate(keys[:3]))
  mask = None
  if masked:
    mask = np.array(jax.random.bernoulli(keys[3], 0.6, (5, 7)))
    mask[2] = False
  probe = jax.random.normal(keys[4], (2, 5, 3, 4))

  def definition(q, k, v):  # jax.nn.softmax over where-masked scores, differentiated by JAX
    scores = jnp.einsum("bqhd,bshd->bhqs", q, k)
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(scores, axis=-1), v)

  expected = jax.grad(lambda *a: jnp.sum(definition(*a) * probe), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(lambda *a: jnp.sum(dot_attention(*a, mask) * probe), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5)
