"""Metric writers: TensorBoard event files and metrics.jsonl in the workdir (process 0 only).

The workdir may be a bucket (gs://): object stores cannot append, so there both files are kept in
memory and rewritten whole on each flush (metrics.jsonl on every write; a few hundred bytes per
logged step). A resumed run first reads back what the previous runs logged.
"""

import hashlib
import io
import json
import time

import jax

from diffusion_lm import paths
from diffusion_lm.errors import UserError


class _ObjectRecordWriter:
  """tensorboardX record writer for a bucket path: buffers the event file, uploads it whole on flush."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    paths.write_bytes(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectRecordWriterFactory:

  def open(self, path: str) -> _ObjectRecordWriter:
    return _ObjectRecordWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # an object store has no folders to create


class MetricWriter:
  """Appends scalars to WORKDIR/metrics.jsonl and WORKDIR/tensorboard; resumes by appending.

  With `wandb_project` (training.wandb_project) the scalars also go to that Weights & Biases project,
  in one run per workdir (its id is derived from the workdir, so a resumed run continues it).
  """

  def __init__(self, workdir: str, enabled: bool | None = None, wandb_project: str = "",
               run_config: dict | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._wandb = None
    if self.enabled and wandb_project:
      self._wandb = _wandb_run(wandb_project, paths.resolve(workdir), run_config)
    if self.enabled:
      from tensorboardX import SummaryWriter, record_writer  # pylint: disable=g-import-not-at-top
      workdir = paths.resolve(workdir)
      paths.makedirs(workdir)
      if paths.is_uri(workdir):
        # tensorboardX picks the record writer by the path's scheme; ours goes through paths (epath).
        record_writer.register_writer_factory(workdir.split(":", 1)[0], _ObjectRecordWriterFactory())
        self._jsonl = _RewrittenFile(paths.join(workdir, "metrics.jsonl"))
      else:
        _drop_cut_record(paths.join(workdir, "metrics.jsonl"))
        self._jsonl = paths.path(paths.join(workdir, "metrics.jsonl")).open("a", encoding="utf-8")
      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    for name, value in clean.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **clean}) + "\n")
    self._jsonl.flush()
    if self._wandb is not None:
      self._wandb.log(clean, step=int(step))

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
      if self._wandb is not None:
        self._wandb.finish()
      self.enabled = False


def _wandb_run(project: str, workdir: str, run_config: dict | None):
  """A Weights & Biases run for this workdir (resumed when it exists); UserError without the package."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"training.wandb_project={project!r} needs the wandb package; allowed: pip install wandb, "
                    "or training.wandb_project='' (off)") from None
  run_id = hashlib.sha256(workdir.encode()).hexdigest()[:16]
  name = workdir.rstrip("/").rsplit("/", 1)[-1]
  return wandb.init(project=project, id=run_id, name=name, resume="allow", config=run_config or {},
                    dir=None if paths.is_uri(workdir) else workdir)


class _RewrittenFile:
  """A text file in a bucket that grows by rewriting it whole on each flush (no append there)."""

  def __init__(self, path: str):
    self.path = path
    self.text = paths.read_text(path) if paths.exists(path) else ""
    self.text = self.text[:self.text.rfind("\n") + 1]  # a record cut by a kill mid-upload: dropped

  def write(self, text: str) -> None:
    self.text += text

  def flush(self) -> None:
    paths.write_bytes(self.path, self.text.encode("utf-8"))

  def close(self) -> None:
    self.flush()


def _drop_cut_record(path: str) -> None:
  """Cuts a local metrics file back to its last complete line: a kill during a write can leave half a
  record, which the next run's records must not be glued onto."""
  if not paths.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)
