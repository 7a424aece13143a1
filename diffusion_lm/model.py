"""The denoiser: a pure-functional linen Transformer over token ids (bidirectional by default).

Pre-norm (RMSNorm) blocks with rotary position embeddings, SwiGLU MLPs and optional adaLN time
conditioning. Parameters are float32 and annotated with logical axis names ("vocab", "embed",
"heads", "kv", "mlp"); activations compute in `dtype` (float32 on CPU, bfloat16 on TPU).
The network knows nothing of masking schedules: it maps tokens_BxL (ids 0..vocab_size, the last
being [MASK]) and an optional t_B to logits_BxLxV over the vocab_size data tokens (padding rows of the tables are never used).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_lm import lora
from diffusion_lm.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("rmsnorm", "layernorm", "layernorm_nobias")
NORM_POSITIONS = ("pre", "post")
MLPS = ("swiglu", "gelu", "gelu_tanh", "geglu")
GATED_MLPS = {"swiglu": nn.silu, "geglu": functools.partial(nn.gelu, approximate=False)}
POSITIONS = ("rope", "learned")
ROPE_SCALINGS = ("", "linear", "llama3")
# Logit of an in-vocabulary [MASK] (model.mask_token_id): finite, so that p log p stays 0, not NaN.
MASK_LOGIT = -1e9
# einsum: `dot_attention` (heads-major einsums, deferred softmax normalisation, q and k rotated in one
# pass); xla / cudnn: jax.nn.dot_product_attention with that implementation (cudnn: NVIDIA GPUs,
# bfloat16 only); auto: einsum on CPUs, jax.nn's own choice elsewhere (decided where the program is
# lowered, so an ahead-of-time TPU compile on a CPU host gets the TPU choice).
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
# ModelConfig fields that choose how the network computes, not what: a checkpoint loads under any value.
RUNTIME_FIELDS = ("attention_impl", "fuse_kernels")


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
  attention_impl: str = "auto"  # how attention is computed (see ATTENTION_IMPLS); never changes the parameters
  # CPUs: multiply by the q/k/v and gate/up kernels side by side in one matmul; None: by the token count
  # (_fuse_kernels); a training microbatch sets True (its backward pass is the faster fused)
  fuse_kernels: bool | None = None
  # Families imported from Hugging Face checkpoints (diffusion_lm/convert/): LLaMA / LLaDA, Qwen2 / Dream,
  # GPT-2, BERT / RoBERTa, ModernBERT. The defaults are this project's own network, parameter tree included.
  num_kv_heads: int = 0  # key/value heads, grouped-query attention (divides num_heads); 0 = num_heads
  qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2, GPT-2)
  linear_bias: bool = False  # biases on the attention output and the MLP projections (GPT-2; GELU MLPs only)
  norm: str = "rmsnorm"  # rmsnorm | layernorm (with a bias) | layernorm_nobias (ModernBERT)
  norm_eps: float = 1e-6  # added to the variance inside every norm
  # pre: x + f(norm(x)), a final norm before the head; post (BERT): norm(x + f(x)), no final norm
  norm_position: str = "pre"
  mlp: str = "swiglu"  # swiglu | geglu (ModernBERT: gelu(h wi_gate) * h wi_up) | gelu | gelu_tanh (wi then wo)
  position: str = "rope"  # rope | learned (an added table of max_len positions, GPT-2, BERT)
  position_offset: int = 0  # learned: position i reads table row i + offset (RoBERTa: padding_idx + 1)
  token_types: int = 0  # rows of a token-type table whose row 0 is added to every position (BERT); 0 = none
  embed_norm: bool = False  # a norm on the summed embeddings (BERT, ModernBERT)
  first_attn_norm: bool = True  # False: block 0's attention reads its input as it is (ModernBERT)
  # Alternating attention (ModernBERT): with local_window > 0, block i is global when i % global_every == 0,
  # else it sees keys at most local_window // 2 positions away, rotated with local_rope_base (0 = rope_base).
  local_window: int = 0
  global_every: int = 1
  local_rope_base: float = 0.0
  # The masked-LM head (BERT, ModernBERT): dense (bias = linear_bias), GELU and a norm before the output head,
  head_transform: bool = False
  head_bias: bool = False  # and a bias on the output logits
  rope_scaling: str = ""  # "" | linear | llama3: rotary frequencies stretched for long contexts
  rope_scaling_factor: float = 1.0  # linear, llama3: how much longer the contexts are
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_len: int = 8192  # llama3: the context length the frequencies were trained at
  tie_embeddings: bool = False  # the output head is the input embedding table transposed (no "head" kernel)
  mask_token_id: int = -1  # a [MASK] inside the vocabulary (LLaDA, Dream): never predicted; -1: [MASK] = vocab_size
  shift_logits: bool = False  # the network's output at i predicts token i + 1 (Dream); logits come out aligned
  # LoRA (set from config.training.lora by experiment.model_config, never saved in config.model): adapters of
  # this rank beside the named projections (lora.TARGETS), scaled by alpha / rank; rank 0 = none
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()

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
    if self.attention_impl not in ATTENTION_IMPLS:
      raise UserError(f"model.attention_impl={self.attention_impl!r}; allowed: {', '.join(ATTENTION_IMPLS)}")
    self._check_family_fields()

  def _check_family_fields(self):
    """The fields of imported families (see the class body), each with a one-line error."""
    if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 0 or (
        self.num_kv_heads and self.num_heads % self.num_kv_heads):
      raise UserError(f"model.num_kv_heads={self.num_kv_heads!r} with num_heads={self.num_heads}; allowed: 0 "
                      "(= num_heads) or a divisor of num_heads")
    for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS), ("rope_scaling", ROPE_SCALINGS),
                          ("norm_position", NORM_POSITIONS)):
      if getattr(self, name) not in allowed:
        raise UserError(f"model.{name}={getattr(self, name)!r}; allowed: {', '.join(repr(a) for a in allowed)}")
    if self.linear_bias and self.mlp in GATED_MLPS:
      raise UserError(f"model.linear_bias=True with mlp={self.mlp!r}; allowed: linear_bias with a GELU MLP "
                      "(GPT-2, BERT)")
    if self.norm_position == "post" and self.time_conditioning:
      raise UserError("model.norm_position='post' with time_conditioning=True; allowed: time conditioning of "
                      "pre-norm blocks only")
    if not isinstance(self.position_offset, int) or self.position_offset < 0 or (
        self.position_offset and self.position != "learned"):
      raise UserError(f"model.position_offset={self.position_offset!r} with position={self.position!r}; allowed: "
                      "an integer >= 0, non-zero only with learned positions")
    if not isinstance(self.token_types, int) or self.token_types < 0:
      raise UserError(f"model.token_types={self.token_types!r}; allowed: an integer >= 0")
    if not isinstance(self.local_window, int) or self.local_window < 0 or not isinstance(
        self.global_every, int) or self.global_every < 1:
      raise UserError(f"model.local_window={self.local_window!r}, global_every={self.global_every!r}; allowed: "
                      "local_window >= 0 and global_every >= 1")
    if self.local_window and (self.causal or self.block_size):
      raise UserError("model.local_window with causal or block attention; allowed: sliding-window layers in "
                      "bidirectional models only")
    if not -1 <= self.mask_token_id < self.vocab_size:
      raise UserError(f"model.mask_token_id={self.mask_token_id!r}; allowed: -1 ([MASK] = vocab_size) or an id "
                      f"below vocab_size={self.vocab_size}")
    if self.shift_logits and (self.causal or self.block_size):
      raise UserError("model.shift_logits=True with causal or block attention; allowed: shift_logits only for "
                      "bidirectional (masked diffusion) models")
    if self.lora_rank or self.lora_targets:
      lora.check_targets(lora.LoraConfig(self.lora_rank, self.lora_alpha, ",".join(self.lora_targets) or "query"),
                         self.mlp in GATED_MLPS)
    if not self.norm_eps > 0 or not self.rope_scaling_factor >= 1:
      raise UserError(f"model.norm_eps={self.norm_eps}, rope_scaling_factor={self.rope_scaling_factor}; allowed: "
                      "norm_eps > 0 and rope_scaling_factor >= 1")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def flops_per_token(self, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token (the MFU numerator): 2N forward (x3 with the backward pass) over the matmul
    parameters N, plus the attention score and value products over all seq_len keys.

    N counts the output head over the vocab_size data tokens only: its [MASK] and padding columns are
    not model FLOPs (they are computed, then dropped, only where a mesh axis shards the vocabulary;
    see Transformer). The input embedding is a
    lookup (no FLOPs), and the per-sequence time conditioning is left out (not per token).
    """
    attention_params = 2 * self.d_model**2 + 2 * self.d_model * self.kv_heads * self.head_dim
    mlp_params = (3 if self.mlp in GATED_MLPS else 2) * self.d_model * self.mlp_dim
    n = self.num_layers * (attention_params + mlp_params) + self.d_model * self.vocab_size
    attention = 2 * 2 * self.num_layers * seq_len * self.d_model
    return (3 if training else 1) * (2 * n + attention)

  @property
  def padded_vocab(self) -> int:
    """Rows of the embedding/head tables: vocab_size + 1 ([MASK]) rounded up to a multiple of 128,
    so that the vocabulary axis shards over any tensor-parallel size up to 128."""
    return -(-(self.vocab_size + 1) // 128) * 128

  def is_local(self, layer: int) -> bool:
    """Whether block `layer` attends within the sliding window (model.local_window)."""
    return bool(self.local_window) and layer % self.global_every != 0


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


class LayerNorm(nn.Module):
  """LayerNorm with a scale and (use_bias) a bias, computed in float32 (GPT-2's, BERT's; ModernBERT's
  has no bias)."""

  dtype: jnp.dtype = jnp.float32
  eps: float = 1e-5
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BxLxD):
    dim = x_BxLxD.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (dim,))
    x = x_BxLxD.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale
    if self.use_bias:
      x = x + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (dim,))
    return x.astype(self.dtype)


def make_norm(cfg: "ModelConfig", name: str):
  """The configured norm (model.norm, model.norm_eps) under `name`."""
  if cfg.norm == "rmsnorm":
    return RMSNorm(DTYPES[cfg.dtype], cfg.norm_eps, name=name)
  return LayerNorm(DTYPES[cfg.dtype], cfg.norm_eps, cfg.norm == "layernorm", name=name)


def rope_inv_freq(cfg: "ModelConfig", base: float | None = None):
  """float32[head_dim / 2] rotary frequencies of `base` (default model.rope_base), stretched by
  model.rope_scaling (linear: all divided by the factor; llama3: long wavelengths divided, short ones
  kept, a smooth blend between)."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (base or cfg.rope_base)**(jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  if cfg.rope_scaling == "linear":
    return inv_freq / cfg.rope_scaling_factor
  if cfg.rope_scaling == "llama3":
    wavelen = 2 * jnp.pi / inv_freq
    # Position in [0, 1] between the long-wavelength end (0: divided) and the short end (1: kept).
    blend = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blend = jnp.clip(blend, 0.0, 1.0)
    return (1 - blend) * inv_freq / cfg.rope_scaling_factor + blend * inv_freq
  return inv_freq


def position_tables(cfg: "ModelConfig", positions_L, local: bool = False):
  """The (cos_LxD, sin_LxD) tables the blocks rotate queries and keys by: rotary ones (local: those of
  the sliding-window layers' base, model.local_rope_base), or for learned positions the identity
  (cos 1, sin 0), so that every attention path serves both."""
  if cfg.position == "learned":
    ones = jnp.ones((positions_L.shape[0], cfg.head_dim), jnp.float32)
    return ones, jnp.zeros_like(ones)
  base = (cfg.local_rope_base or cfg.rope_base) if local else cfg.rope_base
  if not cfg.rope_scaling:
    return rope_tables(positions_L, cfg.head_dim, base)
  angles_LxD2 = positions_L.astype(jnp.float32)[:, None] * rope_inv_freq(cfg, base)[None, :]
  cos, sin = jnp.cos(angles_LxD2), jnp.sin(angles_LxD2)
  return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)


def window_mask(cfg: "ModelConfig", query_positions, key_positions_S):
  """bool[..., Q, S]: True where a sliding-window layer's query may attend to a key (|i - j| at most
  local_window // 2, ModernBERT's band); query_positions is [Q] or [B, Q]."""
  return jnp.abs(query_positions[..., :, None] - key_positions_S) <= cfg.local_window // 2


def rope_tables(positions_L, head_dim: int, base: float):
  """(cos_LxD, sin_LxD) float32 tables of rotary embeddings over pairs (i, i + D/2) at `positions_L`.

  Rotation is x * cos + rotate_half(x) * sin with rotate_half(x) = [x2, x1]; sin carries the sign,
  [-sin, sin], so applying it is two multiplies and an add (see apply_rope).
  """
  inv_freq = 1.0 / base**(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_LxD2 = positions_L.astype(jnp.float32)[:, None] * inv_freq[None, :]
  cos, sin = jnp.cos(angles_LxD2), jnp.sin(angles_LxD2)
  return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)


def apply_rope(x_BxLx_xD, cos, sin):
  """Rotary embedding on the last axis of x, computed in float32; the (rope_tables) tables broadcast
  against x.shape[1:], e.g. [L, 1, D] for x of [B, L, H, D]. They may carry a factor (the attention
  scale folded into the queries' tables)."""
  x = x_BxLx_xD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxLx_xD.dtype)


def dot_attention(q_BxQxHxD, k_BxSxHxD, v_BxSxHxD, mask_QxS=None):
  """Softmax attention of queries that already carry the 1/sqrt(D) scale; mask True = may attend.

  Returns [B, Q, H, D] in the queries' dtype. The products run heads-major ([B, H, Q, S] scores), so
  both are plain batched matmuls, and the softmax is normalised after the value product: Q x D
  divisions instead of Q x S, and one pass less over the score matrix. Scores, exponentials and the
  normaliser are float32. A row with every key masked averages all values (as jax.nn's does).
  """
  dtype = q_BxQxHxD.dtype
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q_BxQxHxD, k_BxSxHxD, v_BxSxHxD))
  scores = jnp.einsum("bhqd,bhsd->bhqs", q, k, preferred_element_type=jnp.float32)
  if mask_QxS is not None:
    scores = jnp.where(mask_QxS, scores, jnp.finfo(jnp.float32).min)
  # Subtracting the row max changes no value and no gradient; stop_gradient keeps it out of the backward pass.
  weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bhqs,bhsd->bhqd", weights.astype(dtype), v, preferred_element_type=jnp.float32) / total
  return jnp.swapaxes(out, 1, 2).astype(dtype)


def timestep_embedding(t_B, dim: int, max_period: float = 10000.0):
  """Sinusoidal features of t in [0, 1] (scaled by 1000 as in diffusion practice); float32[B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t_B.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Kernel(nn.Module):
  """A bare weight matrix at NAME/kernel, where nn.Dense keeps it: lets a block multiply by several
  kernels in one matmul (concatenated) without changing the parameter tree."""

  shape: tuple[int, ...]
  names: tuple[str, ...]

  @nn.compact
  def __call__(self):
    return self.param("kernel", _dense_init(self.names), self.shape)


class Block(nn.Module):
  config: ModelConfig
  local: bool = False  # a sliding-window layer (ModelConfig.is_local); rope then holds its own base's tables
  normed_attention: bool = True  # False: the attention reads x un-normed (ModernBERT's first block)

  @nn.compact
  def __call__(self, x_BxLxD, cond_BxD, decode: bool = False, commit: bool = True, positions_L=None,
               mask_QxK=None, rope=None, approx_cache: str = "", query_at_BxQ=None):
    """rope: the (cos_LxD, sin_LxD) tables of the positions (Transformer computes them once for all blocks).
    approx_cache: "" | "store" | "reuse" (see Transformer).
    query_at_BxQ: int32 positions (bidirectional attention only): keys and values come from every position,
    everything else (queries, attention output, MLP) is computed at these positions only, and the block
    returns their rows, [B, Q, D]."""
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

    post = cfg.norm_position == "post"
    if post or not self.normed_attention:
      h = x_BxLxD
    else:
      h = make_norm(cfg, "attn_norm")(x_BxLxD) * (1 + scale1) + shift1
    w_qkv, b_qkv = self._qkv_params(dtype)
    adapters = self._adapters(dtype)
    if query_at_BxQ is None:  # (the queries at query_at_BxQ get their rows' terms below)
      b_qkv = self._adapted_biases(adapters, h, h, b_qkv, dtype)
    fuse = cfg.fuse_kernels if cfg.fuse_kernels is not None else _fuse_kernels(x_BxLxD.shape[0] * x_BxLxD.shape[1],
                                                                               cfg.d_model)
    if query_at_BxQ is not None:
      rows = lambda a: jnp.take_along_axis(a, query_at_BxQ[:, :, None], axis=1)
      window = window_mask(cfg, query_at_BxQ, jnp.arange(h.shape[1]))[:, None] if self.local else None
      attn = self._attention_at(h, rows(h), w_qkv, self._adapted_biases(adapters, rows(h), h, b_qkv, dtype), rope,
                                query_at_BxQ, fuse, window)
      x_BxLxD = rows(x_BxLxD)
    elif decode:
      attn = self._cached_attention(_project_qkv(h, w_qkv, fuse, b_qkv), commit)
    elif approx_cache:
      attn = self._approx_cached_attention(_project_qkv(h, w_qkv, fuse, b_qkv), rope, positions_L, approx_cache)
    else:
      if positions_L is None:
        positions_L = jnp.arange(x_BxLxD.shape[1])
      if rope is None:
        rope = position_tables(cfg, positions_L, self.local)
      if self.local:
        window = window_mask(cfg, positions_L, positions_L)
        mask_QxK = window if mask_QxK is None else mask_QxK & window
      einsum_path = functools.partial(_attention_einsum, rope=rope, mask_QxK=mask_QxK, causal=cfg.causal, fuse=fuse)
      jax_path = functools.partial(_attention_jax, rope=rope, mask_QxK=mask_QxK, causal=cfg.causal,
                                   implementation=None if cfg.attention_impl == "auto" else cfg.attention_impl)
      if cfg.attention_impl == "auto":
        # Chosen where the program is lowered (an ahead-of-time TPU compile on a CPU host takes `default`):
        # the einsum path is the faster on CPUs; on TPUs XLA fuses the jax.nn path into fewer HBM bytes.
        attn = jax.lax.platform_dependent(h, *w_qkv, *b_qkv, cpu=einsum_path, default=jax_path)
      else:
        attn = (einsum_path if cfg.attention_impl == "einsum" else jax_path)(h, *w_qkv, *b_qkv)
    w_out = self.param("out", _dense_init(("heads", "kv", "embed")), (cfg.num_heads, cfg.head_dim, cfg.d_model))
    heads_BxLxHxD, attn = attn, jnp.einsum("blhk,hkd->bld", attn, w_out.astype(dtype))
    if "out" in adapters:
      attn = attn + adapters["out"](heads_BxLxHxD)
    if cfg.linear_bias:
      attn = attn + self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                               (cfg.d_model,)).astype(dtype)
    x_BxLxD = x_BxLxD + attn * (1 + gate1)
    if post:
      x_BxLxD = make_norm(cfg, "attn_norm")(x_BxLxD)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

    h = x_BxLxD if post else make_norm(cfg, "mlp_norm")(x_BxLxD) * (1 + scale2) + shift2
    if cfg.mlp in GATED_MLPS:
      w_in = [Kernel((cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), name=name)().astype(dtype)
              for name in ("wi_gate", "wi_up")]
      # Gate and up projections in one matmul where that is the faster (CPUs, many tokens); XLA:TPU fuses
      # the separate ones into fewer HBM bytes.
      act = GATED_MLPS[cfg.mlp]
      terms = [adapters[name](h) if name in adapters else jnp.zeros((), dtype) for name in ("wi_gate", "wi_up")]
      terms = terms if "wi_gate" in adapters or "wi_up" in adapters else []
      h = jax.lax.platform_dependent(h, *w_in, *terms,
                                     cpu=functools.partial(_gated_mlp_in, fuse=fuse, activation=act),
                                     default=functools.partial(_gated_mlp_in, fuse=False, activation=act))
    else:
      h = nn.Dense(cfg.mlp_dim, dtype=dtype, use_bias=cfg.linear_bias, name="wi",
                   kernel_init=_dense_init(("embed", "mlp")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(h) + (
                       adapters["wi"](h) if "wi" in adapters else 0)
      h = nn.gelu(h, approximate=cfg.mlp == "gelu_tanh")
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dense(cfg.d_model, dtype=dtype, use_bias=cfg.linear_bias, name="wo",
                 kernel_init=_dense_init(("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h) + (
                     adapters["wo"](h) if "wo" in adapters else 0)
    x_BxLxD = x_BxLxD + h * (1 + gate2)
    if post:
      x_BxLxD = make_norm(cfg, "mlp_norm")(x_BxLxD)
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))

  def _adapters(self, dtype) -> dict:
    """{target: lora.Adapter} of the projections config.lora_targets names (none without LoRA)."""
    cfg = self.config
    if not cfg.lora_rank:
      return {}
    # (shape, logical axis names) of each projection's input and output, as its kernel has them
    embed = ((cfg.d_model,), ("embed",))
    heads = ((cfg.num_heads, cfg.head_dim), ("heads", "kv"))
    kv_heads = ((cfg.kv_heads, cfg.head_dim), ("heads", "kv"))
    hidden = ((cfg.mlp_dim,), ("mlp",))
    sides = {"query": (embed, heads), "key": (embed, kv_heads), "value": (embed, kv_heads), "out": (heads, embed),
             "wi_gate": (embed, hidden), "wi_up": (embed, hidden), "wi": (embed, hidden), "wo": (hidden, embed)}
    scale = cfg.lora_alpha / cfg.lora_rank
    adapters = {}
    for target in cfg.lora_targets:
      (in_shape, in_names), (out_shape, out_names) = sides[target]
      adapters[target] = lora.Adapter(in_shape, out_shape, in_names, out_names, cfg.lora_rank, scale, dtype,
                                      name=lora.PREFIX + target)
    return adapters

  def _adapted_biases(self, adapters: dict, h_q, h_kv, b_qkv, dtype):
    """[b_q, b_k, b_v] with the query/key/value adapters' low-rank terms added, so that every attention path
    (they all add the biases after projecting) computes x W + b + scale (x A) B: then per token,
    [B, Q or L, H, D] (queries from h_q, keys and values from h_kv); as given where no q/k/v adapter exists."""
    names = ("query", "key", "value")
    if not any(name in adapters for name in names):
      return b_qkv
    cfg = self.config
    terms = []
    for i, (name, x) in enumerate(zip(names, (h_q, h_kv, h_kv))):
      shape = (*x.shape[:2], cfg.num_heads, cfg.head_dim)
      term = jnp.broadcast_to(b_qkv[i], shape) if b_qkv else jnp.zeros(shape, dtype)
      if name in adapters:
        low_rank = adapters[name](x)
        if name != "query" and cfg.kv_heads != cfg.num_heads:  # grouped-query: each kv head serves its group
          low_rank = jnp.repeat(low_rank, cfg.num_heads // cfg.kv_heads, axis=-2)
        term = term + low_rank
      terms.append(term)
    return terms

  def _qkv_params(self, dtype):
    """([w_q, w_k, w_v] each [D_model, H, D], biases [b_q, b_k, b_v] each [H, D] or none) in `dtype`.

    With grouped-query attention (num_kv_heads < num_heads) the key/value parameters hold kv_heads heads
    and are repeated here, each to the num_heads / kv_heads query heads of its group, so every attention
    path (and the decoding cache) sees full heads.
    """
    cfg = self.config
    init = _dense_init(("embed", "heads", "kv"))
    heads = {"query": cfg.num_heads, "key": cfg.kv_heads, "value": cfg.kv_heads}
    group = cfg.num_heads // cfg.kv_heads
    expand = lambda a, name: a if heads[name] == cfg.num_heads else jnp.repeat(a, group, axis=-2)
    w_qkv = [expand(self.param(name, init, (cfg.d_model, heads[name], cfg.head_dim)), name).astype(dtype)
             for name in heads]
    if not cfg.qkv_bias:
      return w_qkv, []
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv"))
    b_qkv = [expand(self.param(f"{name}_bias", bias_init, (heads[name], cfg.head_dim)), name).astype(dtype)
             for name in heads]
    return w_qkv, b_qkv

  def _attention_at(self, h_BxLxD, h_BxQxD, w_qkv, b_qkv, rope, query_at_BxQ, fuse: bool, mask_Bx1xQxL=None):
    """Bidirectional attention of the queries at query_at_BxQ (their normed rows h_BxQxD) over the keys and
    values of every position (those mask_Bx1xQxL allows, if given); [B, Q, H, D]."""
    cfg = self.config
    kv = _project_qkv(h_BxLxD, w_qkv[1:], fuse, b_qkv[1:])
    q = _project_qkv(h_BxQxD, w_qkv[:1], False, b_qkv[:1])[:, :, 0]
    cos_LxD, sin_LxD = rope  # Transformer passes the tables whenever it is not decoding
    k = apply_rope(kv[:, :, 0], cos_LxD[:, None, :], sin_LxD[:, None, :])
    scale = cfg.head_dim**-0.5
    q = apply_rope(q, cos_LxD[query_at_BxQ][:, :, None, :] * scale, sin_LxD[query_at_BxQ][:, :, None, :] * scale)
    return self._attend(q, k, kv[:, :, 1], mask_Bx1xQxL)

  def _attend(self, q_BxQxHxD, k_BxSxHxD, v_BxSxHxD, mask_QxS):
    """Attention of scaled queries by the configured implementation (auto: dot_attention); [B, Q, H, D]."""
    impl = self.config.attention_impl
    if impl in ("xla", "cudnn"):
      mask = None if mask_QxS is None else mask_QxS if mask_QxS.ndim == 4 else mask_QxS[None, None]
      return jax.nn.dot_product_attention(q_BxQxHxD, k_BxSxHxD, v_BxSxHxD, mask=mask, scale=1.0, implementation=impl)
    return dot_attention(q_BxQxHxD, k_BxSxHxD, v_BxSxHxD, mask_QxS)

  def _approx_cached_attention(self, qkv_BxCx3xHxD, rope, positions_C, mode: str):
    """Bidirectional attention with every position's keys/values kept ("approx_cache" collection).

    store: the chunk is the whole sequence; its keys/values are kept and attention is the plain one.
    reuse: the chunk is positions_C (consecutive, from positions_C[0]); its fresh keys/values replace
    the kept ones there and every query attends to all positions, the others' keys/values as kept.
    Exact when nothing outside the chunk changed since `store` (the outside positions' hidden states
    depend on the chunk's tokens, which is what makes the cache approximate while they change).
    """
    cfg = self.config
    q, k = _rotate_queries_and_keys(qkv_BxCx3xHxD, rope, cfg.head_dim)
    v = qkv_BxCx3xHxD[:, :, 2]
    if mode == "store":
      self.put_variable("approx_cache", "key", k)
      self.put_variable("approx_cache", "value", v)
      keys, values, positions_C = k, v, jnp.arange(k.shape[1])
    else:
      start = positions_C[0]
      keys = jax.lax.dynamic_update_slice_in_dim(self.get_variable("approx_cache", "key"), k, start, axis=1)
      values = jax.lax.dynamic_update_slice_in_dim(self.get_variable("approx_cache", "value"), v, start, axis=1)
    window = window_mask(cfg, positions_C, jnp.arange(keys.shape[1])) if self.local else None
    return self._attend(q, keys, values, window)

  def _cached_attention(self, qkv_BxLx3xHxD, commit):
    """Attention over a key/value cache ("cache" collection) plus the chunk of positions passed now.

    The chunk sits at absolute positions index .. index + C - 1. Causal models: each position sees the
    cached positions and the chunk's up to itself. Block diffusion: each position sees every position
    of its own block and of earlier blocks, so a chunk [finished block | next block] computes the
    finished block exactly as it would alone. commit: True keeps the whole chunk's keys/values and
    advances the index past it, an int n keeps only its first n positions, False keeps nothing (a block
    can be denoised many times against the same prefix).

    Every position sees at most the `window` positions up to the end of its block (decode_window, the
    trained sequence length): generation may run past it, the cache sliding over a ring of slots
    (rotary embeddings are relative, so sliding needs no re-encoding). The first call (the cache does
    not exist yet) only creates the cache.
    """
    cfg = self.config
    v_BxLxHxD = qkv_BxLx3xHxD[:, :, 2]
    batch, chunk = qkv_BxLx3xHxD.shape[:2]
    size, window = cache_size(cfg), decode_window(cfg)
    exists = self.has_variable("cache", "key")
    shape = (batch, size, cfg.num_heads, cfg.head_dim)
    cached_k = self.variable("cache", "key", jnp.zeros, shape, v_BxLxHxD.dtype)
    cached_v = self.variable("cache", "value", jnp.zeros, shape, v_BxLxHxD.dtype)
    slot_positions = self.variable("cache", "positions", lambda: jnp.full((size,), -1, jnp.int32))
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not exists:
      return jnp.zeros_like(v_BxLxHxD)
    if chunk > size:
      raise UserError(f"a cached chunk of {chunk} positions exceeds the {size}-slot cache")
    pos = index.value
    positions_C = pos + jnp.arange(chunk, dtype=jnp.int32)
    q, k = _rotate_queries_and_keys(qkv_BxLx3xHxD, position_tables(cfg, positions_C), cfg.head_dim)
    slots = positions_C % size
    keys = cached_k.value.at[:, slots].set(k)
    values = cached_v.value.at[:, slots].set(v_BxLxHxD)
    held = slot_positions.value.at[slots].set(positions_C)
    if cfg.causal:
      last_visible = positions_C
    else:  # block diffusion: up to the end of the query's block
      last_visible = (positions_C // cfg.block_size + 1) * cfg.block_size - 1
    visible = ((held[None, :] >= 0) & (held[None, :] <= last_visible[:, None])
               & (held[None, :] > last_visible[:, None] - window))
    keep = chunk if commit is True else int(commit)
    if keep:
      kept = slots[:keep]
      cached_k.value = cached_k.value.at[:, kept].set(k[:, :keep])
      cached_v.value = cached_v.value.at[:, kept].set(v_BxLxHxD[:, :keep])
      slot_positions.value = slot_positions.value.at[kept].set(positions_C[:keep])
      index.value = pos + keep
    return self._attend(q, keys, values, visible)


def _project_qkv(h_BxLxD, kernels, fuse: bool, biases=()):
  """Queries, keys and values stacked: [B, L, 3, H, D]; fuse: one matmul by the kernels side by side;
  biases: none, or [b_q, b_k, b_v] each [H, D]."""
  if fuse:
    qkv = jnp.einsum("bld,dthk->blthk", h_BxLxD, jnp.stack(kernels, axis=1))
  else:
    qkv = jnp.stack([jnp.einsum("bld,dhk->blhk", h_BxLxD, w) for w in kernels], axis=2)
  # axis -3: biases [H, D] broadcast over the tokens; per-token ones [B, L, H, D] (LoRA) stack as qkv does
  return qkv + jnp.stack(biases, axis=-3) if len(biases) else qkv


def _attention_einsum(h_BxLxD, w_q, w_k, w_v, *b_qkv, rope, mask_QxK, causal: bool, fuse: bool):
  """Attention output [B, L, H, D] by dot_attention: rotary embedding of q and k in one pass with the
  shared tables, the scale folded into the queries' tables."""
  qkv = _project_qkv(h_BxLxD, [w_q, w_k, w_v], fuse, b_qkv)
  q, k = _rotate_queries_and_keys(qkv, rope, w_q.shape[-1])
  if mask_QxK is None and causal:
    mask_QxK = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  return dot_attention(q, k, qkv[:, :, 2], mask_QxK)


def _attention_jax(h_BxLxD, w_q, w_k, w_v, *b_qkv, rope, mask_QxK, causal: bool, implementation):
  """Attention output [B, L, H, D] by jax.nn.dot_product_attention on separately projected, separately
  rotated q and k: the formulation XLA:TPU fuses into the fewest HBM bytes (ahead-of-time counts)."""
  q, k, v = (jnp.einsum("bld,dhk->blhk", h_BxLxD, w) for w in (w_q, w_k, w_v))
  if b_qkv:
    q, k, v = q + b_qkv[0], k + b_qkv[1], v + b_qkv[2]
  q, k = _rope_split(q, rope), _rope_split(k, rope)
  mask = None if mask_QxK is None else mask_QxK[None, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal and mask is None,
                                      implementation=implementation)


def _rope_split(x_BxLxHxD, rope):
  """Rotary embedding as two halves rotated and concatenated, by the (position_tables) tables; float32 inside."""
  cos, sin = (table[:, None, :x_BxLxHxD.shape[-1] // 2] for table in rope)
  sin = -sin  # rope_tables' first half carries the rotation's minus sign
  x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxLxHxD.dtype)


def _gated_mlp_in(h_BxLxD, w_gate, w_up, *terms, fuse: bool, activation=nn.silu):
  """activation(h w_gate) * (h w_up): [B, L, M]; fuse: one matmul by the two kernels side by side.
  terms: none, or (term_gate, term_up) added to the two products (LoRA's low-rank terms; 0-d zeros where none)."""
  if fuse:
    gate, up = jnp.split(jnp.einsum("bld,dm->blm", h_BxLxD, jnp.concatenate([w_gate, w_up], axis=1)), 2, axis=-1)
  else:
    gate, up = (jnp.einsum("bld,dm->blm", h_BxLxD, w) for w in (w_gate, w_up))
  if terms:
    gate, up = gate + terms[0], up + terms[1]
  return activation(gate) * up


def _rotate_queries_and_keys(qkv_BxLx3xHxD, rope, head_dim: int):
  """Rotary embedding of queries and keys in one pass, the 1/sqrt(D) attention scale folded into the
  queries' tables; returns (q, k), each [B, L, H, D]."""
  cos_LxD, sin_LxD = rope
  factor_2x1x1 = jnp.array([head_dim**-0.5, 1.0], jnp.float32)[:, None, None]
  qk = apply_rope(qkv_BxLx3xHxD[:, :, :2], cos_LxD[:, None, None, :] * factor_2x1x1,
                  sin_LxD[:, None, None, :] * factor_2x1x1)
  return qk[:, :, 0], qk[:, :, 1]


def decode_window(cfg: ModelConfig) -> int:
  """Positions a cached decoding step sees at most: decode_window (the trained length), else max_len."""
  return min(cfg.decode_window or cfg.max_len, cfg.max_len)


def cache_size(cfg: ModelConfig) -> int:
  """Slots of the decoding ring: the window, plus one block for block diffusion (a [finished | next]
  chunk writes the next block while the finished block still needs the window behind it)."""
  return decode_window(cfg) + cfg.block_size


class Transformer(nn.Module):
  """tokens_BxL int32 in [0, vocab_size] (+ t_B float32) -> logits_BxLxV float32."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, t_B=None, decode: bool = False, *, commit: bool = True, positions_L=None,
               mask_QxK=None, approx_cache: str = "", outputs_at=None, trunk=None, return_trunk: bool = False,
               keep_mask_logit: bool = False):
    """Logits for every position.

    decode=True (causal and block-diffusion models): the tokens are the next chunk after the "cache"
    collection's positions (see Block._cached_attention); commit=False leaves the cache unchanged.
    positions_L / mask_QxK (bool[L, L], True = may attend): explicit positions and attention pattern,
    e.g. block diffusion's noisy and clean copies side by side.
    approx_cache (bidirectional models; the approximate caches of Fast-dLLM): "store" runs the whole
    sequence and keeps every layer's keys/values (mutable "approx_cache"); "reuse" runs only the chunk
    at positions_L (consecutive), attending to the kept keys/values elsewhere.
    outputs_at (bidirectional models): int32[B, Q] positions; returns logits_BxQxK of those only. The last
    block computes its queries, attention output and MLP there alone (keys and values at every position),
    so a sampler that needs a few positions' predictions skips most of the last block and the head.
    return_trunk / trunk (bidirectional models): the network in two parts, the input of the last block
    ([B, L, D], "the trunk") and the rest from it: apply(tokens, t, trunk=apply(tokens, t,
    return_trunk=True), outputs_at=...) equals apply(tokens, t, outputs_at=...) (a sampler keeps the
    trunk while the tokens do not change).
    """
    cfg = self.config
    if outputs_at is not None or trunk is not None or return_trunk:
      if decode or approx_cache or mask_QxK is not None or positions_L is not None or cfg.causal or cfg.block_size:
        raise UserError("outputs_at / trunk / return_trunk need a bidirectional model without decode, approx_cache, "
                        "positions_L or mask_QxK")
    if approx_cache not in ("", "store", "reuse"):
      raise UserError(f"approx_cache={approx_cache!r}; allowed: store, reuse")
    if approx_cache and (decode or cfg.causal or cfg.block_size or mask_QxK is not None):
      raise UserError("approx_cache needs a bidirectional masked-diffusion model without decode/mask_QxK")
    if approx_cache == "reuse" and positions_L is None:
      raise UserError("approx_cache='reuse' needs positions_L, the chunk's positions")
    if decode and not (cfg.causal or cfg.block_size):
      raise UserError("cached decoding needs a causal or block-diffusion model (objective='ar' or 'block')")
    dtype = DTYPES[cfg.dtype]
    if tokens_BxL.shape[1] > cfg.max_len and positions_L is None and not decode:
      raise UserError(f"sequence length {tokens_BxL.shape[1]} exceeds model.max_len={cfg.max_len}")
    embed = nn.Embed(cfg.padded_vocab, cfg.d_model, dtype=dtype, name="embed",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    if trunk is None:
      x = embed(tokens_BxL)
      if cfg.position == "learned":
        x = x + self._learned_positions(tokens_BxL.shape[1], decode, commit, positions_L).astype(dtype)
      if cfg.token_types:
        types = self.param("type_embed", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                       (None, "embed")), (cfg.token_types, cfg.d_model))
        x = x + types[0].astype(dtype)  # every position is of type 0 (one segment)
      if cfg.embed_norm:
        x = make_norm(cfg, "embed_norm")(x)
    else:
      x = trunk.astype(dtype)
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

    # Rotary tables once for every block (cached decoding derives its own from the cache index).
    table_positions = jnp.arange(tokens_BxL.shape[1]) if positions_L is None else positions_L
    rope = None if decode else position_tables(cfg, table_positions)
    local_rope = rope if decode or not cfg.local_window else position_tables(cfg, table_positions, local=True)
    block_class = nn.remat(Block, static_argnums=(3, 4, 8)) if cfg.remat else Block
    block = lambda i: block_class(cfg, local=cfg.is_local(i), normed_attention=cfg.first_attn_norm or i > 0,
                                  name=f"block_{i}")
    last = cfg.num_layers - 1
    for i in range(last if trunk is None else 0):
      x = block(i)(x, cond, decode, commit, positions_L, mask_QxK, local_rope if cfg.is_local(i) else rope,
                   approx_cache)
    if return_trunk:
      return x
    # Shifted families (Dream) predict token i at position i - 1 (position 0 at itself).
    query_at = None if outputs_at is None else (
        jnp.maximum(outputs_at - 1, 0) if cfg.shift_logits else outputs_at).astype(jnp.int32)
    x = block(last)(x, cond, decode, commit, positions_L, mask_QxK, local_rope if cfg.is_local(last) else rope,
                    approx_cache, query_at)
    if cfg.norm_position == "pre":
      x = make_norm(cfg, "final_norm")(x)
    if cfg.head_transform:  # the masked-LM transform (BERT, ModernBERT)
      x = nn.Dense(cfg.d_model, dtype=dtype, use_bias=cfg.linear_bias, name="head_transform",
                   kernel_init=_dense_init(("embed", "mlp")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
      x = make_norm(cfg, "head_norm")(nn.gelu(x, approximate=cfg.mlp == "gelu_tanh"))
    if cfg.tie_embeddings:
      head = embed.embedding.T
    else:
      head = Kernel((cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), name="head")()
    # SUBS: no probability on [MASK] or padding rows. Unless an axis shards the vocabulary (whose padded
    # width divides it), their columns are not computed at all when slicing the kernel is the cheaper copy.
    bias = self.param("head_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (cfg.padded_vocab,)) if cfg.head_bias else None
    if _vocab_unsharded() and x.shape[0] * x.shape[1] >= cfg.d_model:
      logits = jnp.einsum("bld,dv->blv", x, head[:, :cfg.vocab_size].astype(dtype)).astype(jnp.float32)
      logits = logits if bias is None else logits + bias[:cfg.vocab_size]
      logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    else:
      logits = jnp.einsum("bld,dv->blv", x, head.astype(dtype)).astype(jnp.float32)
      logits = logits if bias is None else logits + bias
      logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
      logits = logits[..., :cfg.vocab_size]
    return self._family_outputs(logits, shift=outputs_at is None, keep_mask_logit=keep_mask_logit)

  def _learned_positions(self, length: int, decode: bool, commit, positions_L):
    """float32[L, D_model] rows of the learned position table (model.position='learned') for the chunk.

    Cached decoding reads the chunk's positions from its own counter in the "cache" collection,
    advanced as the blocks' caches are (commit); positions never slide: decoding stops at max_len.
    """
    cfg = self.config
    table = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                                  ("position", "embed")),
                       (cfg.max_len + cfg.position_offset, cfg.d_model))
    if decode:
      exists = self.has_variable("cache", "position_index")
      index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
      positions_L = index.value + jnp.arange(length, dtype=jnp.int32)
      keep = length if commit is True else int(commit)
      if exists and keep:
        index.value = index.value + keep
    elif positions_L is None:
      positions_L = jnp.arange(length)
    return jnp.take(table, jnp.minimum(positions_L, cfg.max_len - 1) + cfg.position_offset, axis=0)

  def _family_outputs(self, logits_BxLxV, shift: bool = True, keep_mask_logit: bool = False):
    """Imported families' output conventions: an in-vocabulary [MASK] gets no probability (SUBS), and
    a shifted network (Dream: position i predicts token i + 1) is realigned so position i predicts
    token i; position 0, which nothing predicts, takes its own output (Dream's convention). A chunk
    (approx_cache="reuse") is realigned within itself, as Fast-dLLM's cached Dream decoding does.
    keep_mask_logit: the [MASK] logit as the network computes it (the published decoders keep it)."""
    cfg = self.config
    if cfg.mask_token_id >= 0 and not keep_mask_logit:
      is_mask_V = jnp.arange(logits_BxLxV.shape[-1]) == cfg.mask_token_id
      logits_BxLxV = jnp.where(is_mask_V, MASK_LOGIT, logits_BxLxV)
    if cfg.shift_logits and shift:
      logits_BxLxV = jnp.concatenate([logits_BxLxV[:, :1], logits_BxLxV[:, :-1]], axis=1)
    return logits_BxLxV


def _fuse_kernels(tokens: int, d_model: int) -> bool:
  """Whether to multiply by kernels concatenated side by side (q/k/v; gate/up) in one matmul.

  The concatenation copies the weights at every call (XLA does not hoist it out of a sampling loop);
  one wide matmul beats several narrow ones only when the activations dwarf that copy. Measured on a
  CPU at d_model 256: fused wins at 8192 tokens, separate matmuls at 2048 and fewer.
  """
  return tokens >= 16 * d_model


def _vocab_unsharded() -> bool:
  """Whether the logical rules in effect map "vocab" to no mesh axis of size > 1 (always, outside a mesh)."""
  axes = nn.logical_to_mesh_axes(("vocab",))[0]
  if axes is None:
    return True
  sizes = jax.sharding.get_abstract_mesh().shape
  return all(sizes.get(axis, 1) == 1 for axis in (axes if isinstance(axes, tuple) else (axes,)))
