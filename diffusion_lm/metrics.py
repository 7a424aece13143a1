"""Metric writers: TensorBoard event files and metrics.jsonl in the workdir (process 0 only)."""

import json
import os
import time

import jax


class MetricWriter:
  """Appends scalars to WORKDIR/metrics.jsonl and WORKDIR/tensorboard; resumes by appending."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for name, value in clean.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **clean}) + "\n")
    self._jsonl.flush()

  def write_text(self, step: int, name: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(name, text, step)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False
