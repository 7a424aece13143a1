"""Self-distillation through time (SDTT, Deschenaux & Gulcehre 2025): the maths, apart from the loop.

A student initialised from the teacher learns to do in one step what the teacher does in `factor`
steps of the ancestral sampler. From the same noisy input x_t (the forward process at a time t drawn
as in training):

  teacher  `factor` ancestral steps of size dt from t (t, t - dt, ...), the update the samplers run;
           the target of a position is the teacher's distribution p(x0 | .) at the step that revealed
           it, and for a position still masked after the last step, the last step's distribution;
  student  one forward at x_t: log p_student(x0 | x_t);
  loss     a divergence between the two distributions, averaged over the positions masked in x_t
           (the paper's default: KL(student || teacher), its "kl-bwd").

Rounds: round r distils a teacher of N_r = start_steps / factor^r steps (dt = 1 / N_r) into a student
of N_r / factor steps; the next round's teacher is this round's student (start_steps -> ... -> the
final step count, e.g. 256 -> 128 -> ... -> 8).

Masked diffusion gives the network one time per row; block diffusion one time per block, every
block denoised in the same forward over [noisy | clean] copies as in training (BD3-LM), the teacher's
steps running in every block at once. `Denoise` functions take per-position times t_BxL.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from diffusion_lm import diffusion, experiment, objectives
from diffusion_lm.errors import UserError
from diffusion_lm.objectives.block import block_attention_mask
from diffusion_lm.samplers import SamplerConfig, draw_tokens
from diffusion_lm.schedules import Schedule

# (params, noisy tokens int32[B, L], t float32[B, L]) -> logits float32[B, L, K]
Denoise = Callable[[object, jax.Array, jax.Array], jax.Array]

DIVERGENCES = ("reverse_kl", "forward_kl", "tvd")
TEACHER_SOURCES = ("params", "ema")
OBJECTIVES = ("diffusion", "block")


@dataclasses.dataclass(frozen=True)
class Rounds:
  """The round plan: round r distils a teacher of start_steps / factor^r steps, `steps_per_round`
  optimizer steps each, until the student samples in `final_steps`."""

  start_steps: int
  final_steps: int
  factor: int
  steps_per_round: int

  def __post_init__(self):
    for name in ("start_steps", "final_steps", "steps_per_round"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"distill.{name}={value!r}; allowed: an integer >= 1")
    if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 2:
      raise UserError(f"distill.factor={self.factor!r}; allowed: an integer >= 2 (teacher steps per student step)")
    steps, rounds = self.final_steps, 0
    while steps < self.start_steps:
      steps, rounds = steps * self.factor, rounds + 1
    if steps != self.start_steps or rounds == 0:
      raise UserError(f"distill.start_steps={self.start_steps}, final_steps={self.final_steps}, factor={self.factor};"
                      f" allowed: start_steps = final_steps x factor^n with n >= 1 (e.g. 256, 8, 2)")

  @property
  def num_rounds(self) -> int:
    return round(math.log(self.start_steps / self.final_steps, self.factor))

  @property
  def total_steps(self) -> int:
    return self.num_rounds * self.steps_per_round

  def teacher_steps(self, round_index: int) -> int:
    """The teacher's step count in round `round_index` (0-based)."""
    return self.start_steps // self.factor**round_index

  def student_steps(self, round_index: int) -> int:
    """The student's step count at the end of round `round_index`."""
    return self.teacher_steps(round_index) // self.factor


# ----------------------------------------------------------------------------- the teacher's steps


def ancestral_update(keys_B, i, x_BxL, logits_BxLxK, alpha_t_BxL, alpha_s_BxL, last_BxL, mask_id: int,
                     cfg: SamplerConfig = SamplerConfig()):
  """One step of the ancestral sampler from t to s < t: (new tokens, revealed bool[B, L]).

  Draw for draw the ancestral step of `samplers.remdm` (sigma = 0): step i's keys split in four, the
  first drawing a token per position from the denoiser, the second the reveal uniforms; a masked
  position is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), every one at the last step.
  """
  keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i), 4))(keys_B)
  proposal, _ = draw_tokens(keys[:, 0], logits_BxLxK, cfg)
  masked = x_BxL == mask_id
  reveal_prob = jnp.where(last_BxL, 1.0, (alpha_s_BxL - alpha_t_BxL) / jnp.maximum(1.0 - alpha_t_BxL, 1e-12))
  u_reveal = jax.vmap(lambda k: jax.random.uniform(k, (x_BxL.shape[1],)))(keys[:, 1])
  reveal = masked & (u_reveal < reveal_prob)
  return jnp.where(reveal, proposal, x_BxL), reveal


def teacher_targets(denoise: Callable, keys_B, x_BxL, t_BxL, dt: float, num_steps: int, schedule: Schedule,
                    mask_id: int):
  """The teacher's `num_steps` ancestral steps of size dt from x_t, and the targets they give.

  Args:
    denoise: (tokens_BxL, t_BxL) -> logits_BxLxK, the teacher.
    keys_B: one key per row (its draws).
    x_BxL: the noisy input; t_BxL its time per position.
    dt: the teacher's step size (1 / its step count); step j runs from t - j dt to t - (j + 1) dt,
      clipped at 0, where every position still masked is revealed.
  Returns:
    (target log-probabilities float32[B, L, K]: at each position the teacher's distribution of the step
     that revealed it, the last step's for those still masked; tokens after the steps int32[B, L];
     the step that revealed each position int32[B, L], num_steps where none did).
  """
  schedule = schedule.bound_schedule

  def body(j, carry):
    x, target, revealed_at = carry
    t = jnp.maximum(t_BxL - j * dt, 0.0)
    s = jnp.maximum(t_BxL - (j + 1) * dt, 0.0)
    logits = denoise(x, t).astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    x, reveal = ancestral_update(keys_B, j, x, logits, schedule.alpha(t), schedule.alpha(s), s <= 0.0, mask_id)
    # A position keeps the distribution of the step that revealed it; a still-masked one the latest.
    still_masked = (x == mask_id) | reveal
    target = jnp.where(still_masked[..., None], log_p, target)
    revealed_at = jnp.where(reveal, j, revealed_at)
    return x, target, revealed_at

  vocab = jax.eval_shape(denoise, x_BxL, t_BxL).shape[-1]
  init = (x_BxL, jnp.zeros(x_BxL.shape + (vocab,), jnp.float32), jnp.full(x_BxL.shape, num_steps, jnp.int32))
  x, target, revealed_at = jax.lax.fori_loop(0, num_steps, body, init)
  return target, x, revealed_at


# ----------------------------------------------------------------------------- divergences and loss


def divergence(student_log_p, teacher_log_p, kind: str):
  """Per-position divergence (nats; tvd: a probability distance in [0, 1]) over the last axis.

  reverse_kl  KL(student || teacher), the paper's default ("kl-bwd")
  forward_kl  KL(teacher || student)
  tvd         total variation, half the L1 distance
  """
  if kind == "reverse_kl":
    return jnp.sum(jnp.exp(student_log_p) * (student_log_p - teacher_log_p), axis=-1)
  if kind == "forward_kl":
    return jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
  if kind == "tvd":
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(student_log_p) - jnp.exp(teacher_log_p)), axis=-1)
  raise UserError(f"distill.divergence={kind!r}; allowed: {', '.join(DIVERGENCES)}")


def sdtt_loss(student: Callable, teacher: Callable, tokens_BxL, key, *, schedule: Schedule, mask_id: int,
              dt: float, num_steps: int, kind: str, block_size: int = 0) -> dict:
  """The SDTT loss of one batch: the mean over masked positions of divergence(student, teacher target).

  Args:
    student, teacher: (tokens_BxL, t_BxL) -> logits_BxLxK (bound to their parameters).
    tokens_BxL: clean tokens.
    key: split into time, mask and teacher keys.
    dt, num_steps: the teacher's step size and its steps per student step.
    block_size: 0 for masked diffusion (one time per row); block diffusion: one time per block.
  Returns:
    {"loss": scalar float32 (mean over masked positions), "num_masked": float32 count, "per_position":
     float32[B, L] (0 at unmasked positions)}.
  """
  batch_size, seq_len = tokens_BxL.shape
  time_key, mask_key, teacher_key = jax.random.split(key, 3)
  schedule = schedule.bound_schedule
  blocks = seq_len // block_size if block_size else 1
  t_BxN = diffusion.antithetic_times(time_key, batch_size * blocks).reshape(batch_size, blocks)
  t_BxL = jnp.repeat(t_BxN, seq_len // blocks, axis=1)
  noisy_BxL, masked_BxL = diffusion.forward_mask(mask_key, tokens_BxL, schedule.alpha(t_BxL), mask_id)
  keys_B = jax.random.split(teacher_key, batch_size)
  target, _, _ = teacher_targets(teacher, keys_B, noisy_BxL, t_BxL, dt, num_steps, schedule, mask_id)
  target = jax.lax.stop_gradient(target)
  student_log_p = jax.nn.log_softmax(student(noisy_BxL, t_BxL).astype(jnp.float32), axis=-1)
  per_position = jnp.where(masked_BxL, divergence(student_log_p, target, kind), 0.0)
  num_masked = jnp.sum(masked_BxL).astype(jnp.float32)
  return {"loss": jnp.sum(per_position) / jnp.maximum(num_masked, 1.0), "num_masked": num_masked,
          "per_position": per_position}


def denoiser(model, params, clean_BxL=None) -> Callable:
  """(tokens_BxL, t_BxL) -> logits_BxLxK of a masked- or block-diffusion network.

  Masked diffusion: the row's time (time-conditioned networks read it). Block diffusion: the noisy
  tokens beside the clean copy `clean_BxL`, the block-causal attention of training; logits of the noisy half.
  """
  cfg = model.config
  if not cfg.block_size:
    return lambda x, t: model.apply({"params": params}, x, t[:, 0])
  seq_len = clean_BxL.shape[1]
  positions = jnp.arange(seq_len)
  mask = block_attention_mask(seq_len, cfg.block_size)

  def fn(x, t):
    del t  # block diffusion reads the noise level from its masks
    both = jnp.concatenate([x, clean_BxL], axis=1)
    return model.apply({"params": params}, both, None, positions_L=jnp.concatenate([positions, positions]),
                       mask_QxK=mask)[:, :seq_len]

  return fn


def check_objective(model_config) -> None:
  name = objectives.of_model(model_config).name
  if name not in OBJECTIVES:
    raise UserError(f"the teacher is an {name!r} model; allowed: a masked-diffusion or block-diffusion teacher "
                    f"({', '.join(OBJECTIVES)})")


# ----------------------------------------------------------------------------- the step


def distill_step(state, teacher_params, tokens_BxL, key, dt, *, model, tx, schedule, mask_id, ema_decay,
                 num_steps: int, kind: str):
  """One optimizer step of the student (`state`, an experiment.TrainState) against the teacher.

  dt is a traced scalar, so one compiled step serves every round. Metrics (float32 scalars): loss (mean
  divergence per masked position), grad_norm, param_norm, mask_rate, finite.
  """
  step_key = jax.random.fold_in(key, state.step)
  block_size = model.config.block_size

  def loss_fn(params):
    out = sdtt_loss(denoiser(model, params, tokens_BxL), denoiser(model, teacher_params, tokens_BxL), tokens_BxL,
                    step_key, schedule=schedule, mask_id=mask_id, dt=dt, num_steps=num_steps, kind=kind,
                    block_size=block_size)
    return out["loss"], out["num_masked"]

  (loss, num_masked), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, grad_norm, finite = experiment.guarded_update(state, grads, loss, tx=tx, ema_decay=ema_decay)
  metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(state.params),
             "mask_rate": num_masked / tokens_BxL.size, "finite": finite.astype(jnp.float32)}
  return new_state, metrics
