"""Orbax checkpoints of the train state, the data-iterator state and the config.

Layout: WORKDIR/checkpoints/<step>/{state,data_iter,config}. The state is a TrainState (step, params,
ema_params, opt_state), or, in a workdir that convert wrote, the parameters only ({"params": tree}, at
step 0): training builds the optimizer state and EMA from them on its devices (`restore(from_params=)`),
and loading reads one subtree of either kind (`restore_params`). Orbax writes each step to a temporary
directory and renames it when complete, so a kill during a save never leaves a checkpoint that
`latest_step()` would pick up; saves are asynchronous, and `close()` waits for the last one.

A checkpoint can still be damaged after it was written (a truncated or overwritten file, an emptied step
folder): every command restores the newest step that restores (`restore_newest`), says in one line which
newer ones it skipped and why, and training moves the skipped ones to WORKDIR/damaged_checkpoints/ so its
next saves do not collide with them.
"""

import contextlib
import sys
import time
from typing import NamedTuple

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from diffusion_lm import paths
from diffusion_lm.errors import UserError


def checkpoint_dir(workdir: str) -> str:
  return paths.join(workdir, "checkpoints")


def make_manager(workdir: str, save_every: int = 1, keep: int = 3, read_only: bool = False):
  """A manager for training (async saves, the given policies) or, with read_only, for loading only.

  The loading manager never writes: it creates no directory, leaves temporary step directories alone
  (a training run may be writing one right now), writes no root metadata, runs no background thread,
  and it refuses to save or delete. orbax's own `read_only` option would add nothing to that but
  warnings on stderr: one for every save setting it has to switch off, and one on every construction.
  """
  if save_every < 1 or keep < 1:
    raise UserError(f"training.checkpoint_every={save_every}, training.keep_checkpoints={keep};"
                    " allowed: integers >= 1")
  if read_only:
    options = ocp.CheckpointManagerOptions(
        create=False, cleanup_tmp_directories=False, save_root_metadata=False, enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(save_every),
        preservation_policy=policies.LatestN(keep),
        cleanup_tmp_directories=True,  # remove what a killed save left half-written
    )
  if read_only:
    with _quiet_orbax():  # it reads every step's metadata, a damaged step's too
      return _LoadingManager(checkpoint_dir(workdir), options=options)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class _LoadingManager(ocp.CheckpointManager):
  """A CheckpointManager that restores only (sample, evaluate and the resume check load with it)."""

  def save(self, step, *args, **kwargs):
    raise RuntimeError(f"checkpoint manager opened for loading only; cannot save step {step}")

  def delete(self, step):
    raise RuntimeError(f"checkpoint manager opened for loading only; cannot delete step {step}")


def save(manager, step: int, state, data_state: dict, config_dict: dict, force: bool = False,
         trees: dict | None = None, records: dict | None = None) -> bool:
  """Saves a step; `trees` (name -> pytree of arrays) and `records` (name -> JSON dict) are extra
  items beside the state (distillation: the teacher's parameters and the round reached)."""
  items = {name: ocp.args.StandardSave(tree) for name, tree in (trees or {}).items()}
  items.update({name: ocp.args.JsonSave(record) for name, record in (records or {}).items()})
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config_dict),
      **items,
  ), force=force)


def restore_items(manager, step: int, trees: dict | None = None, records=()) -> dict:
  """Restores extra items saved with `save(trees=, records=)`: {name: value}; trees into the given
  abstract (sharded) pytrees."""
  items = {name: ocp.args.StandardRestore(abstract) for name, abstract in (trees or {}).items()}
  items.update({name: ocp.args.JsonRestore() for name in records})
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return {name: restored[name] for name in items}


def state_keys(manager, step: int) -> set[str]:
  """The top-level names of a step's state: {step, params, ema_params, opt_state}, or {params} (convert)."""
  path = epath.Path(str(manager.directory)) / str(step) / "state"
  return set(ocp.PyTreeCheckpointHandler().metadata(path).tree)


def params_only(manager, step: int) -> bool:
  return "opt_state" not in state_keys(manager, step)


RESTORE_GROUP_BYTES = 256 << 20  # parameter bytes (whole arrays) per orbax restore call


def restore_params(manager, step: int, abstract_params, use_ema: bool = True, key: str | None = None,
                   check_config: bool = True):
  """Restores one parameter tree of a step, its EMA parameters (or raw, use_ema=False; a parameters-only
  step has one tree for both) and nothing else of the state, into `abstract_params`' shardings and
  dtypes (each process reads the shards of its own devices; leaves without a sharding come to the host
  as numpy). `abstract_params` may hold some top-level parts only: just those are read.

  The parts are restored in groups of about RESTORE_GROUP_BYTES, one orbax call each: a call reads its
  arrays concurrently, so the group bounds the read buffers in flight beside the shards kept. The config
  is read as well (check_config), so a step whose config is damaged does not pass for intact; a reader
  that goes part by part checks it with its first part only. `key` names another tree of the state to
  read instead (a LoRA state's frozen "base")."""
  key = key or ("ema_params" if use_ema and not params_only(manager, step) else "params")
  if check_config:
    manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  restored = {}
  for group in _groups(abstract_params):
    wanted = {key: group}
    restored.update(manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=wanted, restore_args=jax.tree.map(_restore_args, wanted),
                                     partial_restore=True))).state[key])
  return restored


def _groups(abstract_params) -> list[dict]:
  """The top-level parts in order, gathered into dicts of about RESTORE_GROUP_BYTES (a bigger part alone)."""
  groups, size = [{}], 0
  for name, part in abstract_params.items():
    nbytes = sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(part))
    if groups[-1] and size + nbytes > RESTORE_GROUP_BYTES:
      groups.append({})
      size = 0
    groups[-1][name] = part
    size += nbytes
  return groups


def _restore_args(leaf):
  """Into the leaf's sharding (each process reads its devices' shards), or onto the host as numpy
  without one; in the leaf's dtype either way."""
  if getattr(leaf, "sharding", None) is None:
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
  return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)


def restore(manager, step: int, abstract_state, from_params=None):
  """Restores (state, data_state) at `step` into the given abstract (sharded) state. The config is read
  as well, so a step whose config is damaged does not pass for intact. A parameters-only step (convert)
  becomes from_params(params) (training: a fresh optimizer state and EMA); without from_params it is
  refused by name; its data state is None."""
  if params_only(manager, step):
    if from_params is None:
      raise UserError(f"checkpoint step {step} in {manager.directory} holds parameters only (written by convert); "
                      "allowed: train, sample, evaluate or --config.init_from with this workdir")
    params = restore_params(manager, step, abstract_state.params, use_ema=False)
    return from_params(params), None  # no data consumed yet: the iterator starts fresh
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data_iter=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore(),
  ))
  return restored.state, restored.data_iter


def restore_latest(workdir: str, abstract_state, from_params=None):
  """(step, state, data_state, damaged) of the newest checkpoint that restores whole (see restore_newest;
  from_params: see restore); (None, None, None, []) when there is none."""
  manager = make_manager(workdir, read_only=True)
  try:
    step, restored, damaged = restore_newest(
        manager, lambda s: restore(manager, s, abstract_state, from_params), workdir)
  finally:
    manager.close()
  state, data_state = restored if restored is not None else (None, None)
  return step, state, data_state, damaged


class Damaged(NamedTuple):
  step: int
  reason: str  # one line


def _reason(error: BaseException) -> str:
  """The first line of an exception, short enough for a one-line message (orbax wraps TensorStore's
  error, which names the file and byte range, in a generic one: the innermost cause is the telling one)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  return text if len(text) <= 240 else text[:237] + "..."


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax warns (absl logging) about each missing file of a damaged step; restore_newest says it in one line."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _quiet_abandoned_reads() -> None:
  """After a failed restore, TensorStore may still complete reads of the abandoned attempt and call back
  into orbax's event loop, already closed: Python reports each as an unraisable RuntimeError with a
  traceback. They are harmless; this drops exactly those, passing anything else to the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook._drops_closed_loop = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def restore_newest(manager, restore_step, workdir: str, steps=None, quiet: bool = False):
  """(step, restore_step(step), damaged): the newest step whose `restore_step` succeeds, trying the
  manager's steps (or `steps`) newest first; `damaged` lists the newer ones that failed, each announced
  in one `warning:` line on stderr (process 0, unless quiet). (None, None, []) when there is no step;
  UserError naming the damaged steps when none restores."""
  steps = sorted(manager.all_steps() if steps is None else steps, reverse=True)
  damaged = []
  _quiet_abandoned_reads()
  for step in steps:
    try:
      with _quiet_orbax():
        result = restore_step(step)
    except (KeyboardInterrupt, SystemExit, UserError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore and json raise many kinds)
      folder = paths.join(checkpoint_dir(workdir), str(step))
      damaged.append(Damaged(step, "the folder is empty" if not paths.files_under(folder) else _reason(e)))
      continue
    if damaged and not quiet and jax.process_index() == 0:
      for bad in damaged:
        print(f"warning: checkpoint step {bad.step} in {checkpoint_dir(workdir)} is damaged ({bad.reason}); "
              f"skipped, using step {step}", file=sys.stderr, flush=True)
    return step, result, damaged
  if damaged:
    newest = damaged[0]
    raise UserError(f"workdir {workdir!r} holds no intact checkpoint: step {newest.step} is damaged "
                    f"({newest.reason})" + (f", and so are steps {', '.join(str(d.step) for d in damaged[1:])}"
                                            if len(damaged) > 1 else "")
                    + f"; allowed: restore the folder {checkpoint_dir(workdir)}/{newest.step} from a copy, or remove "
                    "the damaged step folders to start again")
  return None, None, []


def quarantine(workdir: str, damaged) -> None:
  """Moves damaged step folders out of the checkpoint folder (to WORKDIR/damaged_checkpoints/<step>-<time>):
  kept for inspection, and out of the way of the saves that will reach those steps again."""
  if not damaged or jax.process_index() != 0:
    return
  target = paths.join(workdir, "damaged_checkpoints")
  paths.makedirs(target)
  for bad in damaged:
    source = paths.path(paths.join(checkpoint_dir(workdir), str(bad.step)))
    try:
      if source.exists():
        source.rename(paths.path(paths.join(target, f"{bad.step}-{time.strftime('%Y%m%d-%H%M%S')}")))
    except OSError as e:
      raise UserError(f"could not move the damaged checkpoint {source} aside ({e.strerror or e}); allowed: move or "
                      f"remove it yourself and rerun (training would save step {bad.step} there again)") from None


def read_saved_config(workdir: str, quiet: bool = True):
  """(step, saved config dict) of the newest checkpoint whose config reads, or (None, None)."""
  if not paths.isdir(checkpoint_dir(workdir)):
    return None, None
  manager = make_manager(workdir, read_only=True)
  try:
    step, config, _ = restore_newest(
        manager, lambda s: manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config,
        workdir, quiet=quiet)
    return step, config
  finally:
    manager.close()


# ----------------------------------------------------------------------------- parameters-only checkpoints


CHUNK_BYTES = 16 << 20  # storage chunk of a parameters-only checkpoint's arrays


def _staging(workdir: str) -> str:
  return paths.join(workdir, "checkpoints.staging")


def write_params(workdir: str, parts, config_dict: dict) -> None:
  """Writes a parameters-only step 0 ({"params": tree}, config, empty data_iter) in a staging folder, one
  (top-level name, subtree) part at a time with orbax's partial save: each part is on disk before the
  next is made. `commit_params` moves it into place."""
  from orbax.checkpoint import v1 as ocp_v1  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=g-import-not-at-top
  stage = epath.Path(_staging(workdir))
  if stage.exists():  # what a killed import left
    stage.rmtree()
  stage.mkdir(parents=True)
  step = stage / "0"
  context = ocp_v1.Context()
  # Chunks of at most CHUNK_BYTES (a host array would otherwise be one chunk): a process that restores its
  # shard decodes chunk by chunk, never a whole table at once.
  context.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
  with context:
    for name, tree in parts:
      partial.save(step, {"params": {name: tree}})
      del tree  # the next part is made only after this one is dropped
    partial.finalize(step)
  for item, value in (("config", config_dict), ("data_iter", {})):
    (step / item).mkdir()
    ocp.JsonCheckpointHandler().save(step / item, args=ocp.args.JsonSave(value))


def discard_staged_params(workdir: str) -> None:
  """Removes what write_params staged (an import that failed part way)."""
  stage = epath.Path(_staging(workdir))
  if stage.exists():
    stage.rmtree()


def commit_params(workdir: str) -> None:
  """Moves the staged step 0 into the checkpoint folder (one rename: a killed import leaves no step)."""
  stage = epath.Path(_staging(workdir))
  target = epath.Path(checkpoint_dir(workdir))
  target.mkdir(parents=True, exist_ok=True)
  (stage / "0").rename(target / "0")
  stage.rmtree()
