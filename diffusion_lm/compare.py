"""Speed against another revision of this package, side by side in one process (bench --compare_ref).

On a shared machine timings drift by tens of percent within minutes, so a before/after ratio means
something only when both sides run in the same process, interleaved (A, B, A, B, ...), each keeping
its minimum. The other revision is extracted with `git archive` into a temporary folder and imported
as its own module objects next to this tree's; both build the same config with the same seed.

  python -m diffusion_lm.bench --config=configs/md4_char.py --parts=train,sampling --batches=32 \
      --seq_len=256 --samplers=ancestral --compare_ref=HEAD~1
"""

import dataclasses
import importlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from diffusion_lm.errors import UserError

PACKAGE = "diffusion_lm"
MODULES = ("experiment", "model", "objectives", "sampling", "sharding")


def extract_revision(rev: str, repo: str | None = None) -> str:
  """A folder holding the package as it is at git revision `rev` of `repo` (default: this checkout)."""
  repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(["git", "-C", repo, "archive", "--format=tar", rev, PACKAGE], capture_output=True,
                        check=False)
  if proc.returncode:
    first = proc.stderr.decode(errors="replace").strip().splitlines()
    raise UserError(f"--compare_ref={rev}: git archive failed ({first[0] if first else proc.returncode}); allowed: "
                    "a revision of this git checkout, e.g. HEAD~1 or a commit hash")
  folder = tempfile.mkdtemp(prefix=f"{PACKAGE}-{rev.replace('/', '_')}-")
  with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
    tar.extractall(folder, filter="data")
  return folder


def import_isolated(folder: str, names=MODULES) -> dict:
  """{name: module} of the package under `folder`, imported apart from (and leaving untouched) the
  package already imported in this process."""
  ours = {k: m for k, m in sys.modules.items() if k == PACKAGE or k.startswith(PACKAGE + ".")}
  for k in ours:
    del sys.modules[k]
  sys.path.insert(0, folder)
  try:
    return {name: importlib.import_module(f"{PACKAGE}.{name}") for name in names}
  finally:
    sys.path.remove(folder)
    for k in [k for k in sys.modules if k == PACKAGE or k.startswith(PACKAGE + ".")]:
      del sys.modules[k]
    sys.modules.update(ours)


@dataclasses.dataclass
class Side:
  """One revision's compiled pieces, built from the same config, and the arguments they run on."""

  label: str
  train: object  # (state, tokens, key) -> (state, metrics), compiled
  forward: object  # (params, tokens, t) -> logits, compiled
  sampler: object  # (params, key, tokens, ids) -> tokens, compiled
  state: object
  params: object
  tokens: object  # the train batch
  masked: object  # the sampler's all-[MASK] start, also the forward's input
  mesh: object
  rules: tuple
  train_memory_bytes: float
  first_loss: float


def _memory_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def build_side(label: str, mods: dict, config, vocab_size: int, eos_id: int, sample_batch: int, seq_len: int,
               sampler_steps: int) -> Side:
  """Compiles the train step, one forward and the ancestral sampler of `config` with `mods`' code."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  experiment, sharding, sampling = mods["experiment"], mods["sharding"], mods["sampling"]
  config = config.copy_and_resolve_references()
  known = {f.name for f in dataclasses.fields(mods["model"].ModelConfig)}
  with config.unlocked():
    for name in [k for k in config.model if k not in known]:  # fields newer than the revision
      del config.model[name]
  mesh = sharding.make_mesh(config.mesh)
  model = mods["model"].Transformer(experiment.model_config(config, vocab_size))
  tx, _ = experiment.make_optimizer(config)
  batch, train_len = config.training.batch_size, config.data.seq_len
  _, shardings = experiment.state_shardings(model, tx, mesh, train_len)
  state = experiment.init_state(model, tx, mesh, jax.random.key(0), train_len, shardings)
  params = jax.tree.map(jnp.copy, state.params)  # the train step donates `state`
  tokens = np.random.default_rng(0).integers(0, vocab_size, (batch, train_len), dtype=np.int32)
  schedule = experiment.schedule_from_config(config)
  cfg = sampling.SamplerConfig(name="ancestral", steps=sampler_steps)

  def sample(p, key, x, ids):  # the objective's own sampling, as generate/sample run it
    return mods["objectives"].of_model(model.config).generate(model, p, key, x, ids, cfg, schedule=schedule,
                                                              mask_id=vocab_size, bos_id=eos_id, eos_id=eos_id).tokens

  masked = jnp.full((sample_batch, seq_len), vocab_size, jnp.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    x = sharding.global_batch_from_local(tokens, mesh)
    train = experiment.jit_train_step(config, model, tx, mesh, shardings, vocab_size, eos_id).lower(
        state, x, jax.random.key(1)).compile()
    forward = jax.jit(lambda p, xx, tt: model.apply({"params": p}, xx, tt)).lower(
        params, masked, jnp.ones((sample_batch,), jnp.float32)).compile()
    sampler = jax.jit(sample).lower(params, jax.random.key(0), masked, jnp.arange(sample_batch)).compile()
    state, metrics = train(state, x, jax.random.key(1))
    first_loss = float(metrics["loss"])
  return Side(label, train, forward, sampler, state, params, x, masked, mesh, sharding.LOGICAL_RULES,
              _memory_bytes(train), first_loss)


def _timers(side: Side, train_steps: int, sampler_steps: int) -> dict:
  """{what: fn() -> how many units it ran}, each unit one train step, forward or sampler step."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  ones = jnp.ones((side.masked.shape[0],), jnp.float32)
  ids = jnp.arange(side.masked.shape[0])

  def train():
    with jax.set_mesh(side.mesh), nn.logical_axis_rules(side.rules):
      for _ in range(train_steps):
        side.state, metrics = side.train(side.state, side.tokens, jax.random.key(1))
      jax.block_until_ready(metrics)
    return train_steps

  def forward():
    jax.block_until_ready(side.forward(side.params, side.masked, ones))
    return 1

  def sampler():
    jax.block_until_ready(side.sampler(side.params, jax.random.key(0), side.masked, ids))
    return sampler_steps

  return {"train step": train, "forward": forward, "ancestral step": sampler}


def compare_rows(rev: str, config, vocab_size: int, eos_id: int, *, sample_batch: int, seq_len: int,
                 sampler_steps: int = 16, train_steps: int = 2, repeats: int = 3, log=print) -> list[dict]:
  """Times this tree against revision `rev` on `config`, interleaved in this process; returns the rows.

  Figures per side: seconds per train step, per forward of sample_batch x seq_len, per ancestral
  sampler step (a run of sampler_steps steps / sampler_steps); compiled train-step memory; the loss
  of the first train step on the same batch and key (equal up to float rounding when the revision
  computes the same function).
  """
  folder = extract_revision(rev)
  try:
    ref = build_side(rev, import_isolated(folder), config, vocab_size, eos_id, sample_batch, seq_len, sampler_steps)
  finally:
    shutil.rmtree(folder, ignore_errors=True)  # its modules are imported: the files are no longer needed
  this = build_side("this tree", {name: importlib.import_module(f"{PACKAGE}.{name}") for name in MODULES}, config,
                    vocab_size, eos_id, sample_batch, seq_len, sampler_steps)
  timers = {side.label: _timers(side, train_steps, sampler_steps) for side in (ref, this)}
  best = {(label, what): float("inf") for label in timers for what in timers[label]}
  for _ in range(max(repeats, 1)):
    for what in timers[this.label]:
      for label in timers:  # interleaved: ref, this, ref, this, ...
        start = time.perf_counter()
        count = timers[label][what]()
        best[label, what] = min(best[label, what], (time.perf_counter() - start) / count)
  log(f"# side by side with {rev} (one process, interleaved, minimum of {repeats} runs each; "
      f"forward and sampler at batch {sample_batch} x {seq_len}, sampler T={sampler_steps})")
  log(f"{'':24s} {rev:>14s} {'this tree':>14s} {'ratio':>8s}")
  rows = []
  for what in timers[this.label]:
    a, b = best[ref.label, what], best[this.label, what]
    rows.append({"part": "compare", "ref": rev, "what": what, "ref_s": a, "this_s": b, "ratio": b / a})
    log(f"{what + ' (s)':24s} {a:14.4f} {b:14.4f} {b / a:7.3f}x")
  a, b = ref.train_memory_bytes, this.train_memory_bytes
  rows.append({"part": "compare", "ref": rev, "what": "train step memory (compiled)", "ref_bytes": a, "this_bytes": b,
               "ratio": b / a})
  log(f"{'train memory (MiB)':24s} {a / 2**20:14.1f} {b / 2**20:14.1f} {b / a:7.3f}x  (XLA: arguments + outputs + "
      "temporaries - aliased)")
  rows.append({"part": "compare", "ref": rev, "what": "first train-step loss (nats/token)", "ref_loss": ref.first_loss,
               "this_loss": this.first_loss})
  log(f"{'first-step loss':24s} {ref.first_loss:14.6f} {this.first_loss:14.6f}  (same batch, key and initial "
      "parameters)")
  return rows
