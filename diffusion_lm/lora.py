"""LoRA: low-rank adapters on named projections of a frozen network (config.training.lora).

A targeted projection y = x W becomes y = x W + (alpha / rank) (x A) B with A [in, rank] drawn at random
and B [rank, out] zeros, so a fresh adapter leaves the network exactly as it was (Hu et al. 2021; peft's
scale alpha / r). The network computes the low-rank path beside the frozen kernel (model.Block), never a
merged W: a step holds the base weights once and the adapters' gradients only.

Adapters live in the "params" tree next to their kernel, under block_i/lora_<target>/{a, b}; `split`
takes them out of a parameter tree and `combine` puts them back, so training differentiates the adapters
alone, and `merge` folds them into the kernels (W + scale A B) for sampling, evaluation and export.
"""

from collections.abc import Mapping
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_lm.errors import UserError

# Projections a block has, by the name of their kernel: attention (query, key, value, out) and MLP
# (wi_gate, wi_up of gated MLPs, wi of GELU MLPs, wo).
ATTENTION_TARGETS = ("query", "key", "value", "out")
GATED_MLP_TARGETS = ("wi_gate", "wi_up", "wo")
PLAIN_MLP_TARGETS = ("wi", "wo")
TARGETS = ATTENTION_TARGETS + ("wi_gate", "wi_up", "wi", "wo")
BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PREFIX = "lora_"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """config.training.lora: rank 0 = off (full fine-tuning)."""

  rank: int = 0
  alpha: float = 16.0
  targets: str = "query,key,value,out,wi_gate,wi_up,wo"  # comma-separated names from TARGETS
  base_dtype: str = "float32"  # storage dtype of the frozen base weights: float32 | bfloat16

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
      raise UserError(f"training.lora.rank={self.rank!r}; allowed: an integer >= 0 (0: no adapters)")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
      raise UserError(f"training.lora.alpha={self.alpha!r}; allowed: a number > 0 (the scale is alpha / rank)")
    if self.base_dtype not in BASE_DTYPES:
      raise UserError(f"training.lora.base_dtype={self.base_dtype!r}; allowed: {', '.join(BASE_DTYPES)}")
    names = self.target_names
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names or len(set(names)) != len(names):
      raise UserError(f"training.lora.targets={self.targets!r}; allowed: distinct comma-separated names from "
                      f"{', '.join(TARGETS)}")

  @property
  def target_names(self) -> tuple[str, ...]:
    return tuple(name.strip() for name in str(self.targets).split(",") if name.strip())

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank if self.rank else 0.0


def from_config(config) -> LoraConfig:
  """LoraConfig of config.training.lora (absent in workdirs from before LoRA: off)."""
  return LoraConfig(**config.training.get("lora", {}))


def check_targets(lora: LoraConfig, gated_mlp: bool) -> None:
  """The targets must be projections this network has (a gated MLP has wi_gate/wi_up, a GELU MLP wi)."""
  present = ATTENTION_TARGETS + (GATED_MLP_TARGETS if gated_mlp else PLAIN_MLP_TARGETS)
  missing = [name for name in lora.target_names if name not in present]
  if lora.rank and missing:
    raise UserError(f"training.lora.targets names {', '.join(missing)}, which this model's blocks do not have; "
                    f"allowed: {', '.join(present)}")


class Adapter(nn.Module):
  """scale * (x A) B for a projection from x's trailing in_shape axes to out_shape: [..., *out_shape].

  A is drawn with variance 1 / fan_in (as a fresh kernel is), B is zeros; both float32, cast to `dtype`
  for the products. The scale multiplies the rank-wide intermediate (the cheapest place)."""

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_names: tuple[str, ...]
  out_names: tuple[str, ...]
  rank: int
  scale: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = tuple(range(len(self.in_shape)))
    init_a = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=fan_in, out_axis=-1)
    a = self.param("a", nn.with_logical_partitioning(init_a, (*self.in_names, None)), (*self.in_shape, self.rank))
    b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, (None, *self.out_names)),
                   (self.rank, *self.out_shape))
    xa = jnp.tensordot(x, a.astype(self.dtype), axes=len(self.in_shape)) * jnp.asarray(self.scale, self.dtype)
    return jnp.tensordot(xa, b.astype(self.dtype), axes=1)


def is_adapter(name: str) -> bool:
  return name.startswith(PREFIX)


def split(params) -> tuple[dict, dict]:
  """(base, adapters) of a parameter tree: the adapters are every lora_* subtree, the base the rest."""
  base, adapters = {}, {}
  for name, value in params.items():
    if is_adapter(name):
      adapters[name] = value
    elif isinstance(value, Mapping):
      b, a = split(value)
      base[name] = b
      if a:
        adapters[name] = a
    else:
      base[name] = value
  return base, adapters


def combine(base, adapters) -> dict:
  """The parameter tree of the adapted network: base with the adapters' subtrees put back."""
  out = dict(base)
  for name, value in adapters.items():
    out[name] = value if is_adapter(name) else combine(base[name], value)
  return out


def merge(params, scale: float, dtype=jnp.float32) -> dict:
  """The base tree with every adapter folded into its kernel: W + scale * A B, computed in float32 and
  stored as `dtype`. Kernels are found next to their adapter: lora_<target> beside <target> (a bare
  kernel: query, key, value, out) or <target>/kernel (wi_gate, wi_up, wi, wo)."""
  base, adapters = split(params)
  return merge_part(base, adapters, scale, dtype)


def merge_part(base, adapters, scale: float, dtype=jnp.float32) -> dict:
  """merge given a tree (or one part of it) apart, as split gives it: base subtree and adapter subtree
  (export merges a large model part by part this way)."""
  out = {}
  for name, value in base.items():
    if isinstance(value, Mapping):
      out[name] = merge_part(value, adapters.get(name, {}), scale, dtype)
    else:
      out[name] = jnp.asarray(value, dtype)
  for name, adapter in adapters.items():
    if not is_adapter(name):
      continue
    target = name[len(PREFIX):]
    delta = scale * jnp.tensordot(jnp.asarray(adapter["a"], jnp.float32), jnp.asarray(adapter["b"], jnp.float32),
                                  axes=1)
    if isinstance(out.get(target), Mapping):
      kernel = base[target]["kernel"]
      out[target] = {**out[target], "kernel": (jnp.asarray(kernel, jnp.float32) + delta).astype(dtype)}
    else:
      out[target] = (jnp.asarray(base[target], jnp.float32) + delta).astype(dtype)
  return out


def cast(tree, dtype):
  """Every floating-point leaf as `dtype` (boxed, logically partitioned leaves keep their boxes)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
