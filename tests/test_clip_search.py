"""BD3-LM's clipped noise schedules for block diffusion: the range grid, clipped draws, and the search."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_lm import data, diffusion, sharding
from diffusion_lm.clip_search import ClipSearch
from diffusion_lm.objectives import block
from diffusion_lm.schedules import Schedule

VOCAB, L, BLOCK = 11, 16, 4
MASK = VOCAB


def test_the_grid_is_bd3lms():
  """BD3-LM: [eps, 1], then per width w the ranges [i, i + w], i = 0, delta, ..., 1 - w (lower bounds >= eps)."""
  got = block.clip_candidates((0.5, 0.9), 0.05)
  want = [(diffusion.T_MIN, 1.0), (diffusion.T_MIN, 0.5)] + [(round(0.05 * i, 2), round(0.05 * i + 0.5, 2))
                                                           for i in range(1, 11)]
  want += [(diffusion.T_MIN, 0.9), (0.05, 0.95), (0.1, 1.0)]
  assert got == want


def test_clipped_draws_stay_in_the_range():
  """Times on [0.3, 0.8]; with resampling every block's masked share in [0.3, 0.8] (linear: 1 - alpha(t) = t)."""
  tokens = jnp.zeros((64, L), jnp.int32)
  for resample in (False, True):
    noise = block.block_noise(tokens, jax.random.key(0), Schedule("linear"), MASK, BLOCK, clip=(0.3, 0.8),
                              resample=resample)
    t = 1.0 / np.asarray(noise["weight"])
    assert t.min() >= 0.3 - 1e-6 and t.max() <= 0.8 + 1e-6 and t.max() - t.min() > 0.4
    share = np.asarray(noise["is_masked"]).reshape(64, L // BLOCK, BLOCK).mean(-1)
    inside = (share >= 0.3) & (share <= 0.8)
    assert inside.all() if resample else not inside.all()


class _Uniform:
  config = type("C", (), {"d_model": 8, "time_conditioning": False, "block_size": BLOCK})

  def apply(self, variables, tokens, t=None, **kwargs):
    return jnp.zeros(tokens.shape + (VOCAB,), jnp.float32)


def test_the_search_picks_the_range_of_least_variance():
  """A uniform denoiser's block value is log V * n / (L' t), n ~ Bin(L', t): without resampling its variance
  over t ~ U[a, b] is log(V)^2 (ln(b / a) / (b - a) - 1) / L' (closed form). The search must land on the
  candidate that minimises it."""
  config = ml_collections.ConfigDict({
      "block": {"clip_search_widths": (0.5, 0.7), "clip_search_delta": 0.1, "clip_search_batches": 8,
                "resample": False},
      "evaluation": {"batch_size": 64, "seed": 0}, "mesh": {"data": -1, "fsdp": 1, "tensor": 1}})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  search = ClipSearch(_Uniform(), Schedule("linear"), MASK, mesh, {}, config)
  windows = data.Windows(np.random.default_rng(0).integers(0, VOCAB, 64 * 8 * L), L, "validation")
  best, totals = search({}, windows)
  closed = {(a, b): (np.log(b / a) / (b - a) - 1.0) / BLOCK for a, b in search.candidates}
  assert best == min(closed, key=closed.get) == (0.5, 1.0)
  ranked = sorted(search.candidates, key=closed.get)
  assert totals[ranked[0]] < totals[ranked[1]] < totals[ranked[-1]]


def test_training_saves_the_range_it_found(tmp_path, data_cache):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from diffusion_lm import checkpointing, clip_search, train  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.cache_dir = data_cache
  config.objective, config.model.block_size = "block", 8
  config.block.update(clip_search_widths=(0.5,), clip_search_delta=0.25, clip_search_batches=1)
  config.training.update(num_steps=3, eval_every=2, checkpoint_every=2)
  workdir = str(tmp_path / "clip")
  train.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  found = [(r["eval/clip_lo"], r["eval/clip_hi"]) for r in rows if "eval/clip_lo" in r]
  assert len(found) == 1 and found[0] in block.clip_candidates((0.5,), 0.25)
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    assert clip_search.restore(manager, 2) == clip_search.restore(manager, 3) == found[0]
  finally:
    manager.close()
