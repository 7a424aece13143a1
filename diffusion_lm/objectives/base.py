"""The interface every objective implements."""

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_lm.errors import UserError
from diffusion_lm.samplers import SampleOutput, SamplerConfig, SplitDenoiser
from diffusion_lm.schedules import Schedule


def bind(model, params) -> Callable[..., jax.Array]:
  """apply(tokens_BxL, t_B=None, **model_kwargs) -> logits_BxLxK: the network with its parameters bound."""
  return lambda tokens, t=None, **kwargs: model.apply({"params": params}, tokens, t, **kwargs)


# Tokens per piece when a CPU runs a forward pass over a batch piece by piece (rows_in_pieces).
CPU_PIECE_TOKENS = 1024
# Activations of tokens x width (d_model) at or above which a CPU step or forward pass runs in pieces (2M floats,
# 32 x 256 x 256): smaller ones fit the caches in one piece.
CPU_CACHE_SPILL = 2**21


def piece_count(rows: int, length: int, tokens_per_piece: int) -> int:
  """How many pieces of about tokens_per_piece tokens `rows` rows of `length` make: a divisor of rows."""
  count = max(1, rows // max(1, tokens_per_piece // length))
  while rows % count:
    count -= 1
  return count


def rows_in_pieces(fn, *arrays_B, width: int):
  """fn(*arrays_B) (each leading with the batch axis; None passes through): on CPUs computed over pieces
  of about CPU_PIECE_TOKENS tokens one after another, whose activations stay in the caches (a forward
  pass of 32 x 256 tokens: 1.5x faster on a 2-core CPU); in one piece elsewhere (decided where the
  program is lowered). Piece m holds rows m, m + n, ... so each device keeps its share of every piece.
  For forward passes (sampling, evaluation); a training step runs microbatches instead. width: the
  network's d_model (activations are tokens x width).
  """
  batch, length = arrays_B[0].shape[:2]
  count = piece_count(batch, length, CPU_PIECE_TOKENS) if batch * length * width >= CPU_CACHE_SPILL else 1
  if count == 1:  # small enough for the caches in one piece
    return fn(*arrays_B)
  given = [i for i, a in enumerate(arrays_B) if a is not None]

  def call(present):  # fn with the given arrays replaced by `present`
    args = list(arrays_B)
    for i, a in zip(given, present):
      args[i] = a
    return fn(*args)

  def pieces(*present):
    out = jax.lax.map(call, [split_rows(a, count) for a in present])
    return jax.tree.map(merge_rows, out)

  return jax.lax.platform_dependent(*[arrays_B[i] for i in given], cpu=pieces, default=lambda *present: call(present))


def split_rows(a_B, count: int):
  """[count, B / count, ...]: piece m holds rows m, m + count, m + 2 count, ... (under data parallelism every
  device keeps an equal share of each piece)."""
  return jnp.swapaxes(a_B.reshape(a_B.shape[0] // count, count, *a_B.shape[1:]), 0, 1)


def merge_rows(a_NxR):
  """The inverse of split_rows: [count, R, ...] -> [count x R, ...] in the original row order."""
  return jnp.swapaxes(a_NxR, 0, 1).reshape(a_NxR.shape[0] * a_NxR.shape[1], *a_NxR.shape[2:])


def bind_forward(model, params) -> Callable[..., jax.Array]:
  """bind for forward passes only (samplers, evaluation): (tokens_BxL, t_B=None) -> logits, by rows_in_pieces."""
  return lambda tokens, t=None: rows_in_pieces(lambda x, tt: model.apply({"params": params}, x, tt), tokens, t,
                                               width=model.config.d_model)


def bind_split(model, params) -> SplitDenoiser:
  """The bidirectional network with its parameters bound, in two parts (trunk, then logits at positions),
  each by rows_in_pieces."""
  apply = lambda tokens, t, **kwargs: model.apply({"params": params}, tokens, t, **kwargs)
  width = model.config.d_model
  trunk = lambda tokens, t: rows_in_pieces(lambda x, tt: apply(x, tt, return_trunk=True), tokens, t, width=width)
  logits_at = lambda h, tokens, t, positions: rows_in_pieces(
      lambda hh, x, tt, pos: apply(x, tt, trunk=hh, outputs_at=pos), h, tokens, t, positions, width=width)
  return SplitDenoiser(trunk=trunk, logits_at=logits_at)


def hold_first(keep_BxL, tokens_BxL):
  """keep_BxL (or None) with position 0 added: data.ignore_bos on framed windows, whose position 0 is always
  the frame id (BD3-LM's ignore_bos: never masked in training, not scored in evaluation)."""
  first = jnp.zeros(tokens_BxL.shape, bool).at[:, 0].set(True)
  return first if keep_BxL is None else keep_BxL | first


def check_learned_positions(model_config, length: int) -> None:
  """A learned position table (model.position='learned', GPT-2) has max_len rows: cached decoding, which may
  otherwise slide past max_len, cannot go beyond them."""
  if model_config.position == "learned" and length > model_config.max_len:
    raise UserError(f"sequence length {length} with model.position='learned'; allowed: at most the model's "
                    f"max_len={model_config.max_len} (a learned position table has no rows past it)")


class Objective:
  """One training objective. Stateless; methods are pure and jit-safe (called inside jitted steps)."""

  name: str = ""
  bound: str = ""  # what `evaluate` reports: "exact" or the kind of bound
  attention: str = ""  # bidirectional | causal | block-causal
  default_sampler: str = ""

  def model_fields(self, config) -> dict:
    """ModelConfig fields this objective sets (attention structure)."""
    return {}

  def check(self, config) -> None:
    """Raises UserError (one line) for config settings this objective cannot train with."""

  def loss(self, model, params, tokens_BxL, key, *, schedule: Schedule, mask_id: int, bos_id: int):
    """(nats_B, num_masked_B): the per-sequence training loss in nats (a bound or the exact NLL)."""
    raise NotImplementedError

  def scored_positions(self, tokens_BxL):
    """float32[B]: the positions of each row the loss and the per-token figures count, or None when every
    position counts (then per-token figures divide by the row length). Prompted objectives count only
    their response positions."""
    return None

  def noise(self, model, tokens_BxL, key, *, schedule: Schedule, mask_id: int, bos_id: int, **extra):
    """The loss's random draws for the whole batch as a dict of arrays leading with B (the same draws
    `loss` makes), or None when the loss does not split by rows. With them, row_losses of any subset of
    rows is that subset's loss, which lets a step run its batch in microbatches."""
    return None

  def row_losses(self, model, params, rows: dict, *, bos_id: int):
    """(nats_B, num_masked_B) of the rows of noise()'s dict."""
    raise NotImplementedError

  def eval_nats(self, model, params, tokens_BxL, key, *, schedule: Schedule, mask_id: int, bos_id: int,
                num_t_samples: int, discrete_steps: int) -> dict:
    """{"nats": float32[B], optionally "nats_discrete": float32[B]}: the evaluation bound per sequence."""
    raise NotImplementedError

  def generate(self, model, params, key, tokens_BxL, example_ids_B, cfg: SamplerConfig, *, schedule: Schedule,
               mask_id: int, bos_id: int, eos_id: int, return_trajectory: bool = False) -> SampleOutput:
    """Fills every [MASK] of tokens_BxL; call under jax.jit."""
    raise NotImplementedError
