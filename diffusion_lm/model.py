"""The denoiser: a pure-functional linen Transformer over token ids (bidirectional by default).

Pre-norm (RMSNorm) blocks with rotary position embeddings, SwiGLU MLPs and optional adaLN time
conditioning. Parameters are float32 and annotated with logical axis names ("vocab", "embed",
"heads", "kv", "mlp"); activations compute in `dtype` (float32 on CPU, bfloat16 on TPU).
The network knows nothing of masking schedules: it maps tokens_BxL (ids 0..vocab_size, the last
being [MASK]) and an optional t_B to logits_BxLxV over the vocab_size data tokens (padding rows of the tables are never used).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_lm.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of the denoiser; built from `config.model` as ModelConfig(vocab_size=..., **config.model)."""

  vocab_size: int  # number of data tokens K; the input embedding has K + 1 rows ([MASK] = K)
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  mlp_dim: int = 1024
  max_len: int = 128
  time_conditioning: bool = False
  causal: bool = False
  block_size: int = 0  # block diffusion (objective "block"): tokens per block; 0 = not block-structured
  decode_window: int = 0  # cached decoding sees at most this many positions (0 = max_len); the trained length
  dtype: str = "float32"
  remat: bool = False
  rope_base: float = 10000.0

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise UserError(f"model.{name}={value!r}; allowed: an integer >= 1")
    if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
      raise UserError(f"model.d_model={self.d_model} with num_heads={self.num_heads}: allowed only when"
                      " d_model / num_heads is an even integer (rotary embeddings rotate pairs)")
    if self.dtype not in DTYPES:
      raise UserError(f"model.dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def flops_per_token(self, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token (the MFU numerator): 2N forward (x3 with the backward pass) over the matmul
    parameters N, plus the attention score and value products over all seq_len keys.

    N counts the output head over the vocab_size data tokens only: its [MASK] and padding columns are
    computed and then dropped, so they are hardware FLOPs, not model FLOPs. The input embedding is a
    lookup (no FLOPs), and the per-sequence time conditioning is left out (not per token).
    """
    n = self.num_layers * (4 * self.d_model**2 + 3 * self.d_model * self.mlp_dim) + self.d_model * self.vocab_size
    attention = 2 * 2 * self.num_layers * seq_len * self.d_model
    return (3 if training else 1) * (2 * n + attention)

  @property
  def padded_vocab(self) -> int:
    """Rows of the embedding/head tables: vocab_size + 1 ([MASK]) rounded up to a multiple of 128,
    so that the vocabulary axis shards over any tensor-parallel size up to 128."""
    return -(-(self.vocab_size + 1) // 128) * 128


def _dense_init(names):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class RMSNorm(nn.Module):
  dtype: jnp.dtype = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x_BxLxD):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x_BxLxD.shape[-1],))
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale).astype(self.dtype)


def apply_rope(x_BxLxHxD, base: float, positions_L=None):
  """Rotary position embedding on the last axis (pairs (i, i + D/2)) at `positions_L` (default 0..L-1)."""
  length, head_dim = x_BxLxHxD.shape[1], x_BxLxHxD.shape[-1]
  inv_freq = 1.0 / base**(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  positions = jnp.arange(length) if positions_L is None else positions_L
  angles_LxD2 = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  sin = jnp.sin(angles_LxD2)[None, :, None, :]
  cos = jnp.cos(angles_LxD2)[None, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxHxD.dtype)


def timestep_embedding(t_B, dim: int, max_period: float = 10000.0):
  """Sinusoidal features of t in [0, 1] (scaled by 1000 as in diffusion practice); float32[B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t_B.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, cond_BxD, decode: bool = False, commit: bool = True, positions_L=None,
               mask_QxK=None):
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    if cond_BxD is not None:
      # adaLN: per-block shift/scale/gate from the time embedding, zero-initialised so that a fresh
      # model is the unconditioned one.
      mod = nn.Dense(6 * cfg.d_model, dtype=dtype, name="ada_ln",
                     kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(cond_BxD)
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod[:, None, :], 6, axis=-1)
    else:
      shift1 = scale1 = gate1 = shift2 = scale2 = gate2 = 0.0

    h = RMSNorm(dtype, name="attn_norm")(x_BxLxD) * (1 + scale1) + shift1
    init = _dense_init(("embed", "heads", "kv"))
    shape = (cfg.d_model, cfg.num_heads, cfg.head_dim)
    q, k, v = (jnp.einsum("bld,dhk->blhk", h, self.param(name, init, shape).astype(dtype))
               for name in ("query", "key", "value"))
    if decode:
      attn = self._cached_attention(q, k, v, commit)
    else:
      q, k = apply_rope(q, cfg.rope_base, positions_L), apply_rope(k, cfg.rope_base, positions_L)
      mask = None if mask_QxK is None else mask_QxK[None, None]
      attn = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=cfg.causal and mask is None)
    w_out = self.param("out", _dense_init(("heads", "kv", "embed")), (cfg.num_heads, cfg.head_dim, cfg.d_model))
    attn = jnp.einsum("blhk,hkd->bld", attn, w_out.astype(dtype))
    x_BxLxD = x_BxLxD + attn * (1 + gate1)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

    h = RMSNorm(dtype, name="mlp_norm")(x_BxLxD) * (1 + scale2) + shift2
    gate = nn.Dense(cfg.mlp_dim, dtype=dtype, use_bias=False, name="wi_gate",
                    kernel_init=_dense_init(("embed", "mlp")))(h)
    up = nn.Dense(cfg.mlp_dim, dtype=dtype, use_bias=False, name="wi_up",
                  kernel_init=_dense_init(("embed", "mlp")))(h)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    h = nn.Dense(cfg.d_model, dtype=dtype, use_bias=False, name="wo",
                 kernel_init=_dense_init(("mlp", "embed")))(h)
    x_BxLxD = x_BxLxD + h * (1 + gate2)
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

  def _cached_attention(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, commit: bool):
    """Attention over a key/value cache ("cache" collection) plus the chunk of positions passed now.

    The chunk sits at absolute positions index .. index + C - 1 and sees every cached position before
    it and itself (causal models: causally; block diffusion: the whole chunk, bidirectionally). With
    commit=True its keys/values stay in the cache and the index advances past it; otherwise the cache is
    left as it was, so a block can be denoised many times against the same prefix.

    The cache is a ring of `cache_size` slots (the trained sequence length, rounded down to whole
    blocks): generation may run past it, each chunk then seeing the last cache_size positions, the
    window the model was trained on (rotary embeddings are relative, so sliding needs no re-encoding).
    The first call (the cache does not exist yet) only creates the cache.
    """
    cfg = self.config
    batch, chunk = q_BxLxHxD.shape[:2]
    size = cache_size(cfg)
    exists = self.has_variable("cache", "key")
    shape = (batch, size, cfg.num_heads, cfg.head_dim)
    cached_k = self.variable("cache", "key", jnp.zeros, shape, k_BxLxHxD.dtype)
    cached_v = self.variable("cache", "value", jnp.zeros, shape, v_BxLxHxD.dtype)
    slot_positions = self.variable("cache", "positions", lambda: jnp.full((size,), -1, jnp.int32))
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not exists:
      return jnp.zeros_like(q_BxLxHxD)
    if size % chunk:
      raise UserError(f"cached chunks of {chunk} positions do not tile the {size}-slot cache; allowed: a "
                      f"divisor of {size}")
    pos = index.value
    positions_C = pos + jnp.arange(chunk, dtype=jnp.int32)
    q = apply_rope(q_BxLxHxD, cfg.rope_base, positions_C)
    k = apply_rope(k_BxLxHxD, cfg.rope_base, positions_C)
    slot = pos % size  # chunks start at multiples of their length, so a chunk never wraps
    keys = jax.lax.dynamic_update_slice(cached_k.value, k, (0, slot, 0, 0))
    values = jax.lax.dynamic_update_slice(cached_v.value, v_BxLxHxD, (0, slot, 0, 0))
    held = jax.lax.dynamic_update_slice(slot_positions.value, positions_C, (slot,))
    if cfg.causal:
      visible = (held[None, :] >= 0) & (held[None, :] <= positions_C[:, None])
    else:
      visible = jnp.broadcast_to((held >= 0) & (held < pos + chunk), (chunk, size))
    if commit:
      cached_k.value, cached_v.value, slot_positions.value = keys, values, held
      index.value = pos + chunk
    return jax.nn.dot_product_attention(q, keys, values, mask=visible[None, None])


def cache_size(cfg: ModelConfig) -> int:
  """Slots of the decoding cache: decode_window (else max_len), rounded down to whole blocks for block diffusion."""
  size = min(cfg.decode_window or cfg.max_len, cfg.max_len)
  return size - size % cfg.block_size if cfg.block_size else size


class Transformer(nn.Module):
  """tokens_BxL int32 in [0, vocab_size] (+ t_B float32) -> logits_BxLxV float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, t_B=None, decode: bool = False, *, commit: bool = True, positions_L=None,
               mask_QxK=None):
    """Logits for every position.

    decode=True (causal and block-diffusion models): the tokens are the next chunk after the "cache"
    collection's positions (see Block._cached_attention); commit=False leaves the cache unchanged.
    positions_L / mask_QxK (bool[L, L], True = may attend): explicit positions and attention pattern,
    e.g. block diffusion's noisy and clean copies side by side.
    """
    cfg = self.config
    if decode and not (cfg.causal or cfg.block_size):
      raise UserError("cached decoding needs a causal or block-diffusion model (objective='ar' or 'block')")
    dtype = DTYPES[cfg.dtype]
    if tokens_BxL.shape[1] > cfg.max_len and positions_L is None and not decode:
      raise UserError(f"sequence length {tokens_BxL.shape[1]} exceeds model.max_len={cfg.max_len}")
    embed = nn.Embed(cfg.padded_vocab, cfg.d_model, dtype=dtype, name="embed",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    x = embed(tokens_BxL)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    cond = None
    if cfg.time_conditioning:
      if t_B is None:
        raise UserError("model.time_conditioning=True needs the time t for every sequence")
      cond = timestep_embedding(t_B, cfg.d_model)
      cond = nn.Dense(cfg.d_model, dtype=dtype, name="time_mlp_in",
                      kernel_init=_dense_init(("embed", "mlp")))(cond)
      cond = nn.Dense(cfg.d_model, dtype=dtype, name="time_mlp_out",
                      kernel_init=_dense_init(("mlp", "embed")))(nn.silu(cond))
      cond = nn.silu(cond)

    block = nn.remat(Block, static_argnums=(3, 4)) if cfg.remat else Block
    for i in range(cfg.num_layers):
      x = block(cfg, name=f"block_{i}")(x, cond, decode, commit, positions_L, mask_QxK)
    x = RMSNorm(dtype, name="final_norm")(x)
    logits = nn.Dense(cfg.padded_vocab, dtype=dtype, use_bias=False, name="head",
                      kernel_init=_dense_init(("embed", "vocab")))(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits[..., :cfg.vocab_size]  # SUBS: no probability on [MASK] or padding rows
