"""Orbax checkpoints of the train state, the data-iterator state and the config.

Layout: WORKDIR/checkpoints/<step>/{state,data_iter,config}. Orbax writes each step to a temporary
directory and renames it when complete, so a kill during a save never leaves a checkpoint that
`latest_step()` would pick up; saves are asynchronous, and `close()` waits for the last one.
"""

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
  return (_LoadingManager if read_only else ocp.CheckpointManager)(checkpoint_dir(workdir), options=options)


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


def restore(manager, step: int, abstract_state):
  """Restores (state, data_state) at `step` into the given abstract (sharded) state."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data_iter=ocp.args.JsonRestore(),
  ))
  return restored.state, restored.data_iter


def read_saved_config(workdir: str):
  """(latest step, saved config dict) of the workdir's checkpoints, or (None, None)."""
  if not paths.isdir(checkpoint_dir(workdir)):
    return None, None
  manager = make_manager(workdir, read_only=True)
  try:
    step = manager.latest_step()
    if step is None:
      return None, None
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return step, restored.config
  finally:
    manager.close()
