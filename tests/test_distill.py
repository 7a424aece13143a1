"""Distillation (SDTT): the loss against oracles with known answers, the teacher's steps against the
sampler, one round lowering the loss, and a killed distillation resuming exactly.

References are independent of diffusion_lm/distillation.py: the teacher's trajectory comes from the
project's ancestral sampler (diffusion_lm/samplers), the targets from the denoiser recomputed on it.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_lm import checkpointing, distillation, experiment, sampling
from diffusion_lm.distill import distill
from diffusion_lm.errors import UserError
from diffusion_lm.schedules import Schedule

K, L = 6, 8  # data tokens, sequence length
MASK = K


def factorised_oracle(seed=0):
  """The exact denoiser of a distribution whose positions are independent: p(x0_i | x_t) = p_i."""
  table_LxK = jax.random.normal(jax.random.key(seed), (L, K)) * 2.0
  return lambda x, t: jnp.broadcast_to(table_LxK, x.shape + (K,))


def copy_oracle(x, t):
  """The exact denoiser of 'every position holds the same token, uniform': once any position is
  revealed, every masked one is that token; before, uniform. Its conditionals do not factorise."""
  del t
  seen = jnp.max(jnp.where(x == MASK, -1, x), axis=-1)  # the revealed token (all equal), -1 if none
  one_hot = jax.nn.one_hot(jnp.maximum(seen, 0), K) * 30.0
  logits = jnp.where(seen[:, None] >= 0, one_hot, 0.0)
  return jnp.broadcast_to(logits[:, None, :], x.shape + (K,))


def context_oracle(x, t):
  """A denoiser that reads its input and its time (neither exact nor factorised)."""
  table = jax.random.normal(jax.random.key(3), (L, K))
  prev = jax.nn.one_hot(jnp.roll(x, 1, axis=-1), K)  # [MASK] -> zeros
  t_B = t if t.ndim == 1 else t[:, 0]  # the samplers give one time per row, the teacher one per position
  return table + 3.0 * prev + 2.0 * t_B[:, None, None] * jnp.sin(jnp.arange(K, dtype=jnp.float32))


def sdtt(student, teacher, tokens, seed=0, dt=0.25, steps=2, kind="reverse_kl", block_size=0):
  fn = jax.jit(lambda x, k: distillation.sdtt_loss(student, teacher, x, k, schedule=Schedule("linear"), mask_id=MASK,
                                                   dt=dt, num_steps=steps, kind=kind, block_size=block_size))
  return jax.tree.map(np.asarray, fn(tokens, jax.random.key(seed)))


TOKENS = jax.random.randint(jax.random.key(7), (64, L), 0, K)


@pytest.mark.parametrize("kind,block_size", [(kind, 0) for kind in distillation.DIVERGENCES] + [("reverse_kl", 4)])
def test_loss_is_zero_for_a_teacher_exact_in_one_step(kind, block_size):
  oracle = factorised_oracle()
  out = sdtt(oracle, oracle, TOKENS, kind=kind, block_size=block_size)
  assert out["num_masked"] > 100
  np.testing.assert_allclose(out["loss"], 0.0, atol=1e-6)
  # The same student against a teacher whose k steps differ from its one step: clearly positive.
  assert sdtt(copy_oracle, copy_oracle, TOKENS, kind=kind, block_size=block_size)["loss"] > 0.01


def test_copy_oracle_loss_has_its_closed_form():
  """Student and teacher the copy oracle, two teacher steps, from all-[MASK] (t = 1, dt = 1/2, linear).

  Step 1 reveals each position with prob 1/2, drawn uniform and independent; step 2 reveals the rest,
  predicted as a copy of the revealed ones. Student: uniform. Per position, reverse KL(uniform || target):
  0 for positions revealed at step 1 (target uniform); for those revealed at step 2 (when something was
  revealed at step 1), KL(uniform || one-hot) = sum (1/K) (log(1/K) - log p) with p = softmax(30 e_c).
  """
  tokens = jnp.zeros((4096, L), jnp.int32)
  t_B = jnp.ones((tokens.shape[0],))
  x = jnp.full(tokens.shape, MASK, jnp.int32)
  keys = jax.random.split(jax.random.key(0), tokens.shape[0])
  target, _, revealed_at = jax.jit(lambda x, t: distillation.teacher_targets(
      copy_oracle, keys, x, t, 0.5, 2, Schedule("linear"), MASK))(x, jnp.broadcast_to(t_B[:, None], x.shape))
  student = jax.nn.log_softmax(copy_oracle(x, t_B), axis=-1)
  kl = np.asarray(distillation.divergence(student, target, "reverse_kl"))
  log_p = np.log(np.exp(0.0) / (np.exp(30.0) + K - 1))  # a non-copied token under softmax(30 e_c)
  log_c = 30.0 - np.log(np.exp(30.0) + K - 1)
  per_late = (1.0 / K) * ((K - 1) * (np.log(1.0 / K) - log_p) + (np.log(1.0 / K) - log_c))
  revealed_at = np.asarray(revealed_at)
  any_early = (revealed_at == 0).any(axis=1, keepdims=True)
  expected = np.where((revealed_at == 1) & any_early, per_late, 0.0)
  np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-5)
  # About half the positions are late, and nearly every row had an early one.
  assert 0.4 < np.mean(revealed_at == 1) < 0.6


def _sampler_frames(denoiser, steps, n, seed):
  cfg = sampling.SamplerConfig(name="ancestral", steps=steps, cache=False)
  out = jax.jit(lambda k, x, ids: sampling.sample(denoiser, k, x, ids, cfg, schedule=Schedule("linear"),
                                                  mask_id=MASK, return_trajectory=True, time_independent=False))(
      jax.random.key(seed), jnp.full((n, L), MASK, jnp.int32), jnp.arange(n))
  return np.concatenate([np.full((1, n, L), MASK), np.asarray(out.trajectory)])


def test_teacher_steps_are_the_samplers_ancestral_steps_and_targets_follow_the_paper():
  """From all-[MASK] at t = 1 with dt = 1/4, four teacher steps are the 4-step ancestral sampler draw
  for draw (same per-example keys); each position's target is the teacher's distribution at the step
  that revealed it, recomputed here on the sampler's own trajectory."""
  n, steps = 16, 4
  frames = _sampler_frames(context_oracle, steps, n, seed=5)
  key = jax.random.key(5)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  x0 = jnp.full((n, L), MASK, jnp.int32)
  target, x_end, revealed_at = jax.jit(lambda x, t: distillation.teacher_targets(
      context_oracle, keys, x, t, 1.0 / steps, steps, Schedule("linear"), MASK))(x0, jnp.ones((n, L)))
  np.testing.assert_array_equal(np.asarray(x_end), frames[-1])
  target, revealed_at = np.asarray(target), np.asarray(revealed_at)
  for j in range(steps):
    before, after = frames[j], frames[j + 1]
    revealed = (before == MASK) & (after != MASK)
    np.testing.assert_array_equal(revealed_at == j, revealed)
    expected = np.asarray(jax.nn.log_softmax(context_oracle(jnp.asarray(before), jnp.full((n, L), 1.0 - j / steps))))
    np.testing.assert_allclose(target[revealed], expected[revealed], rtol=1e-5, atol=1e-5)


def test_positions_still_masked_take_the_last_steps_distribution():
  """Two steps of dt = 1/16 from t = 1 leave most positions masked: their target is step 2's prediction."""
  n = 16
  frames = _sampler_frames(context_oracle, 16, n, seed=2)
  key = jax.random.key(2)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  target, x_end, revealed_at = jax.jit(lambda x, t: distillation.teacher_targets(
      context_oracle, keys, x, t, 1.0 / 16, 2, Schedule("linear"), MASK))(
          jnp.full((n, L), MASK, jnp.int32), jnp.ones((n, L)))
  np.testing.assert_array_equal(np.asarray(x_end), frames[2])
  still = frames[2] == MASK
  assert still.mean() > 0.6
  np.testing.assert_array_equal(np.asarray(revealed_at) == 2, still)
  expected = np.asarray(jax.nn.log_softmax(context_oracle(jnp.asarray(frames[1]), jnp.full((n, L), 15 / 16))))
  np.testing.assert_allclose(np.asarray(target)[still], expected[still], rtol=1e-5, atol=1e-5)


def test_divergences_against_numpy():
  p = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (5, K)))
  q = jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (5, K)))
  pn, qn = np.exp(np.asarray(p, np.float64)), np.exp(np.asarray(q, np.float64))
  np.testing.assert_allclose(distillation.divergence(p, q, "reverse_kl"), (pn * np.log(pn / qn)).sum(-1), rtol=1e-4)
  np.testing.assert_allclose(distillation.divergence(p, q, "forward_kl"), (qn * np.log(qn / pn)).sum(-1), rtol=1e-4)
  np.testing.assert_allclose(distillation.divergence(p, q, "tvd"), 0.5 * np.abs(pn - qn).sum(-1), rtol=1e-4)


def test_round_plan_and_bad_settings():
  plan = distillation.Rounds(256, 8, 2, 10)
  assert plan.num_rounds == 5 and plan.total_steps == 50
  assert [plan.teacher_steps(r) for r in range(5)] == [256, 128, 64, 32, 16]
  assert plan.student_steps(4) == 8
  with pytest.raises(UserError, match="start_steps = final_steps x factor"):
    distillation.Rounds(100, 8, 2, 10)
  with pytest.raises(UserError, match="factor"):
    distillation.Rounds(16, 8, 1, 10)
  with pytest.raises(UserError, match="reverse_kl"):
    distillation.divergence(jnp.zeros((1, K)), jnp.zeros((1, K)), "kl")


def test_block_denoiser_sees_its_block_noisy_and_earlier_blocks_clean():
  """Block diffusion: the logits of block b's noisy positions depend on block b's noisy tokens and on
  the clean tokens of blocks < b only (BD3-LM's conditioning), whatever else changes."""
  from configs import tiny
  from diffusion_lm.model import Transformer
  config = tiny.get_config()
  config.objective, config.model.block_size = "block", 8
  model = Transformer(experiment.model_config(config, 20))
  seq_len, size = config.data.seq_len, 8
  params = model.init(jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32), jnp.zeros((1,)))["params"]
  clean = jax.random.randint(jax.random.key(1), (1, seq_len), 0, 20)
  noisy = jnp.where(jax.random.uniform(jax.random.key(2), (1, seq_len)) < 0.5, 20, clean)
  t = jnp.ones((1, seq_len))
  logits = jax.jit(lambda c, x: distillation.denoiser(model, params, c)(x, t))
  base = np.asarray(logits(clean, noisy))
  b, lo, hi = 2, 2 * size, 3 * size
  other = (clean + 1) % 20
  later_clean = clean.at[:, lo:].set(other[:, lo:])  # clean blocks >= b
  other_noisy = noisy.at[:, :lo].set(20).at[:, hi:].set(other[:, hi:])  # noisy blocks != b
  np.testing.assert_allclose(np.asarray(logits(later_clean, other_noisy))[:, lo:hi], base[:, lo:hi], atol=1e-5)
  earlier_clean = clean.at[:, :lo].set(other[:, :lo])
  assert np.abs(np.asarray(logits(earlier_clean, noisy))[:, lo:hi] - base[:, lo:hi]).max() > 1e-3
  own_noisy = noisy.at[:, lo:hi].set(other[:, lo:hi])
  assert np.abs(np.asarray(logits(clean, own_noisy))[:, lo:hi] - base[:, lo:hi]).max() > 1e-3


def test_shipped_configs_are_valid_plans():
  """The command's default config file exists (it is found from the package, not the working directory)
  and both shipped configs pass the checks the command runs first."""
  from configs import demo_distill
  from configs import distill as distill_config
  from diffusion_lm import distill as distill_command
  assert os.path.isfile(distill_command.DEFAULT_CONFIG)
  assert distill_command._check_config(distill_config.get_config()).num_rounds == 5  # 256 -> 8
  demo = distill_command._check_config(demo_distill.get_config())
  assert (demo.start_steps, demo.final_steps, demo.num_rounds) == (64, 8, 3)


# ----------------------------------------------------------------------------- end to end (tiny config)


def _config():
  from configs import distill as distill_config
  config = distill_config.get_config()
  config.distill.update(start_steps=8, final_steps=2, factor=2, steps_per_round=8, eval_each_round=False)
  config.training.update(batch_size=8, log_every=4, checkpoint_every=4, keep_checkpoints=8)
  config.optimizer.update(learning_rate=3e-4, warmup_steps=0)
  return config


@pytest.fixture(scope="module")
def distilled(trained_workdir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("student"))
  distill(_config(), trained_workdir, workdir)
  return workdir


def _state_at(workdir, step):
  run = experiment.load_trained(workdir)
  tx, _ = experiment.make_optimizer(run.config)
  abstract, _ = experiment.state_shardings(run.model, tx, run.mesh, run.config.data.seq_len)
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    state, _ = checkpointing.restore(manager, step, abstract)
    extra = checkpointing.restore_items(manager, step, trees={"teacher": abstract.params}, records=("distill_state",))
  finally:
    manager.close()
  return run, state, extra["teacher"], extra["distill_state"]


def test_one_round_lowers_the_loss(distilled, trained_workdir):
  """Round 1's distance to the teacher's 2-step targets (dt = 1/8) on held-out batches, with the student
  before (= the teacher) and after the round, measured by total variation and forward KL: divergences the
  round does not train on (it trains on reverse KL), so a student that only games its own loss fails."""
  run, after, teacher_params, progress = _state_at(distilled, 8)
  assert progress == {"step": 8, "round": 0, "teacher_steps": 8, "student_steps": 4, "rounds_done": 1}
  original = experiment.load_trained(trained_workdir, use_ema=True).params
  for a, b in zip(jax.tree.leaves(teacher_params), jax.tree.leaves(original)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  windows, _ = experiment.load_windows(run.config, distilled, run.tokenizer, "validation")
  tokens = jnp.asarray(windows.rows(np.arange(64)))
  teacher = distillation.denoiser(run.model, teacher_params)
  fn = jax.jit(lambda p, x, k, kind: distillation.sdtt_loss(
      distillation.denoiser(run.model, p), teacher, x, k, schedule=run.schedule, mask_id=run.tokenizer.mask_id,
      dt=1.0 / 8, num_steps=2, kind=kind)["loss"], static_argnums=3)

  def loss(params, kind):
    return np.mean([float(fn(params, tokens, jax.random.key(100 + seed), kind)) for seed in range(4)])

  ratios = {kind: loss(after.params, kind) / loss(original, kind) for kind in ("reverse_kl", "tvd", "forward_kl")}
  # Measured: reverse KL 0.63, forward KL 0.64, total variation 0.97 of the teacher's distance.
  assert ratios["reverse_kl"] < 0.85 and ratios["forward_kl"] < 0.85 and ratios["tvd"] < 0.99, ratios


def test_killed_distillation_resumes_exactly(distilled, trained_workdir, tmp_path):
  """Stopped in round 2 (step 11: the teacher is round 1's student, restored from the checkpoint), then
  run to the end: the same student, EMA and teacher as the uninterrupted run."""
  workdir = str(tmp_path / "student")
  distill(_config(), trained_workdir, workdir, stop_after=11)
  assert checkpointing.read_saved_config(workdir)[0] == 11
  distill(_config(), trained_workdir, workdir)
  _, resumed, resumed_teacher, progress = _state_at(workdir, 16)
  _, straight, straight_teacher, _ = _state_at(distilled, 16)
  assert progress["rounds_done"] == 2 and progress["teacher_steps"] == 4
  for a, b in zip(jax.tree.leaves((resumed.params, resumed.ema_params, resumed_teacher)),
                  jax.tree.leaves((straight.params, straight.ema_params, straight_teacher))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_student_is_an_ordinary_workdir_that_records_its_teacher(distilled, trained_workdir):
  run = experiment.load_trained(distilled)
  with open(os.path.join(distilled, "config.json")) as f:
    record = json.load(f)["distill"]
  assert record["teacher_workdir"] == os.path.abspath(trained_workdir)
  assert record["rounds_done"] == record["num_rounds"] == 2
  assert record["student_steps"] == 2 and run.config.sampling.steps == 2
  # A different plan in the same workdir is refused, naming the setting.
  config = _config()
  config.distill.factor = 4
  with pytest.raises(UserError, match="distill.factor=2"):
    distill(config, trained_workdir, distilled)


def test_sdtt_loss_is_kl_from_the_student_to_the_teacher():
  """reverse_kl is KL(student || teacher) at each masked position. With a factorised teacher (exact in one
  step: every target is its table's softmax) and another fixed student table, the per-position loss is
  that KL, computed here in numpy; the other direction differs by far more than the tolerance."""
  teacher_table = np.asarray(jax.random.normal(jax.random.key(0), (L, K)) * 2.0, np.float64)
  student_table = np.asarray(jax.random.normal(jax.random.key(1), (L, K)) * 2.0, np.float64)
  as_denoiser = lambda table: (lambda x, t: jnp.broadcast_to(jnp.asarray(table, jnp.float32), x.shape + (K,)))
  out = sdtt(as_denoiser(student_table), as_denoiser(teacher_table), TOKENS)
  log_softmax = lambda a: a - np.log(np.exp(a).sum(-1, keepdims=True))
  s, t = log_softmax(student_table), log_softmax(teacher_table)
  kl_student_teacher = (np.exp(s) * (s - t)).sum(-1)  # [L]
  kl_teacher_student = (np.exp(t) * (t - s)).sum(-1)
  assert np.abs(kl_student_teacher - kl_teacher_student).max() > 0.5
  masked = out["per_position"] != 0
  assert masked.sum() > 50
  want = np.broadcast_to(kl_student_teacher, masked.shape)
  np.testing.assert_allclose(out["per_position"][masked], want[masked], rtol=1e-4)
