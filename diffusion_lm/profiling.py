"""jax.profiler traces of chosen training steps (`training.profile_steps`).

Each run of consecutive chosen steps becomes one trace, written by process 0 to WORKDIR/profile in
the layout TensorBoard's profile tab reads (`tensorboard --logdir WORKDIR/profile`, after
`pip install tensorboard-plugin-profile`), with a `*.trace.json.gz` that ui.perfetto.dev opens without
it. A trace stops only
after the device has finished its last step, so it holds the steps' whole device time. With a bucket
workdir the profiler writes to a local folder and the files are then uploaded there.
"""

import os
import tempfile

import jax

from diffusion_lm import paths
from diffusion_lm.errors import UserError


def check_profile_steps(steps) -> tuple[int, ...]:
  """The chosen step numbers (1 = the first optimizer step), sorted; UserError on anything else."""
  steps = tuple(steps or ())
  if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps):
    raise UserError(f"training.profile_steps={steps!r}; allowed: step numbers >= 1, e.g. (10, 11, 12)")
  return tuple(sorted(set(steps)))


class StepProfiler:
  """Starts a trace before the first step of each run of chosen steps and stops it after the last."""

  def __init__(self, steps, workdir: str, enabled: bool | None = None, log=print):
    self.steps = frozenset(check_profile_steps(steps))
    self.enabled = bool(self.steps) and (paths.is_writer() if enabled is None else enabled)
    self.target = paths.join(paths.resolve(workdir), "profile")
    self.log = log
    self.active = False
    self._local = None

  def before_step(self, step: int) -> None:
    """Call before dispatching step `step` (1-based)."""
    if self.enabled and not self.active and step in self.steps:
      self._local = tempfile.mkdtemp(prefix="profile-") if paths.is_uri(self.target) else self.target
      jax.profiler.start_trace(self._local, create_perfetto_trace=True)
      self.active = True
      self._first = self._last = step

  def after_step(self, step: int, outputs) -> None:
    """Call after dispatching step `step`, with its outputs (waited for before the trace stops)."""
    if not self.active:
      return
    self._last = step
    if step + 1 not in self.steps:
      jax.block_until_ready(outputs)
      self._stop()

  def close(self) -> None:
    """Stops a trace still running (training ended or stopped inside a chosen run)."""
    if self.active:
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self.active = False
    if self._local != self.target:  # upload what the profiler wrote locally
      for local in paths.files_under(self._local):
        paths.write_bytes(paths.join(self.target, os.path.relpath(local, self._local)), paths.read_bytes(local))
    steps = f"steps {self._first}-{self._last}" if self._last != self._first else f"step {self._first}"
    self.log(f"profiled {steps}: trace in {self.target}")
