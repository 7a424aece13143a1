"""Orbax checkpoints of the train state, the data-iterator state and the config.

Layout: WORKDIR/checkpoints/<step>/{state,data_iter,config}. Orbax writes each step to a temporary
directory and renames it when complete, so a kill during a save never leaves a checkpoint that
`latest_step()` would pick up; saves are asynchronous, and `close()` waits for the last one.
"""

import os

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from diffusion_lm.errors import UserError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, save_every: int = 1, keep: int = 3, read_only: bool = False):
  if save_every < 1 or keep < 1:
    raise UserError(f"training.checkpoint_every={save_every}, training.keep_checkpoints={keep};"
                    " allowed: integers >= 1")
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.FixedIntervalPolicy(save_every),
      preservation_policy=policies.LatestN(keep),
      enable_async_checkpointing=not read_only,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,  # remove what a killed save left half-written
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager, step: int, state, data_state: dict, config_dict: dict, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data_iter=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config_dict),
  ), force=force)


def restore(manager, step: int, abstract_state):
  """Restores (state, data_state) at `step` into the given abstract (sharded) state."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data_iter=ocp.args.JsonRestore(),
  ))
  return restored.state, restored.data_iter


def read_saved_config(workdir: str):
  """(latest step, saved config dict) of the workdir's checkpoints, or (None, None)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
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
