"""One writer per workdir: a lease file that a live training process renews and a dead one lets lapse.

WORKDIR/lease.json names the process that trains in the workdir (pid, host, command) and when its lease
expires. The holder renews it every RENEW_SECONDS from a background thread; a second `train` or `distill`
on the workdir reads it and is refused while the holder lives. No file locks (a bucket has none, and
they coordinate nothing across hosts): the lease is a plain file written through the paths layer.

* A killed holder never blocks the next run: on the holder's own host its pid is checked at once (a
  SIGKILLed process holds nothing); from another host the lease lapses EXPIRES_SECONDS after the last
  renewal.
* Two runs that start together: each writes its own record (a fresh token), waits SETTLE_SECONDS, and
  reads the file back; only the run whose token is there goes on, the other is refused before it has
  touched anything (tokenizer, data preparation, checkpoints).
* Multi-process runs: process 0 holds the lease and tells the others whether it got it.
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np

from diffusion_lm import paths
from diffusion_lm.errors import UserError

LEASE_FILE = "lease.json"
RENEW_SECONDS = 10.0
EXPIRES_SECONDS = 60.0
SETTLE_SECONDS = 0.2  # a bucket upload may take longer to become visible: see _settle_seconds


def lease_path(workdir: str) -> str:
  return paths.join(workdir, LEASE_FILE)


def _read(path: str) -> dict | None:
  try:
    record = json.loads(paths.read_text(path))
  except (OSError, ValueError):  # absent, or a torn / foreign file: no live holder can be read from it
    return None
  return record if isinstance(record, dict) and "token" in record else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  except (OSError, OverflowError, TypeError):
    return False
  return True


def is_live(record: dict | None, now: float | None = None) -> bool:
  """Whether `record` is a lease some process still holds."""
  if record is None:
    return False
  now = time.time() if now is None else now
  try:
    if float(record.get("expires", 0)) < now:
      return False
    if record.get("host") == socket.gethostname():
      return _pid_alive(int(record.get("pid", -1)))
  except (TypeError, ValueError):  # a record no run of this project wrote: nobody holds it
    return False
  return True


def describe(record: dict) -> str:
  return (f"process {record.get('pid')} on host {record.get('host')!r} ({record.get('command', 'a run')}, "
          f"lease renewed {max(0, round(time.time() - float(record.get('renewed', 0))))} s ago)")


class Lease:
  """The writer's lease on a workdir (process 0 of a run). `lost` turns true when a renewal finds the
  file holding another process's token (this run was stalled past the expiry and another took over)."""

  def __init__(self, workdir: str, command: str):
    self.workdir, self.path, self.command = workdir, lease_path(workdir), command
    self.token = uuid.uuid4().hex
    self.lost = False
    self.took_over = None  # the record of a dead holder this lease replaced
    self._stop = threading.Event()
    self._thread = None

  def _record(self) -> dict:
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "token": self.token,
            "renewed": now, "expires": now + EXPIRES_SECONDS}

  def _refuse(self, holder: dict) -> UserError:
    return UserError(f"workdir {self.workdir!r} is being trained by {describe(holder)}; allowed: wait for it to "
                     f"finish or stop it, or use another --workdir (a stale lease lapses by itself: a killed process "
                     f"on this host at once, on another host {int(EXPIRES_SECONDS)} s after its last renewal)")

  def acquire(self) -> "Lease":
    holder = _read(self.path)
    if is_live(holder):
      raise self._refuse(holder)
    self.took_over = holder
    paths.write_bytes(self.path, json.dumps(self._record()).encode())
    time.sleep(SETTLE_SECONDS * (5 if paths.is_uri(self.path) else 1))
    now_held = _read(self.path)
    if now_held is None or now_held.get("token") != self.token:  # another run wrote after us: it goes on
      raise self._refuse(now_held or {"pid": "?", "host": "?", "renewed": time.time()})
    self._thread = threading.Thread(target=self._renew, name="diffusion_lm-lease", daemon=True)
    self._thread.start()
    return self

  def _renew(self) -> None:
    while not self._stop.wait(RENEW_SECONDS):
      try:
        current = _read(self.path)
        if current is not None and current.get("token") != self.token:
          self.lost = True
          return
        paths.write_bytes(self.path, json.dumps(self._record()).encode())
      except OSError:  # a storage hiccup: the next renewal tries again, well within the expiry
        continue

  def check(self) -> None:
    """Raises UserError when another process has taken the lease over."""
    if self.lost:
      holder = _read(self.path) or {}
      raise UserError(f"workdir {self.workdir!r}: this run's lease was taken over by {describe(holder)} after this "
                      f"process went {int(EXPIRES_SECONDS)} s without renewing it; stopped without saving")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      current = _read(self.path)
      if current is not None and current.get("token") == self.token:
        paths.remove(self.path)
    except OSError:
      pass  # left behind, it lapses by itself


class _NoLease:
  """What processes other than 0 hold: nothing to check or release."""
  lost = False
  took_over = None

  def check(self) -> None:
    pass


@contextlib.contextmanager
def held(workdir: str, command: str):
  """Holds the workdir's lease (process 0) for the block; every process raises UserError if it is taken."""
  lease, error = _NoLease(), None
  if jax.process_index() == 0:
    try:
      lease = Lease(workdir, command).acquire()
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    granted = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not granted and error is None:
      error = UserError(f"workdir {workdir!r} is being trained by another run (process 0 of this run says which); "
                        "allowed: wait for it to finish or stop it, or use another --workdir")
  if error is not None:
    raise error
  try:
    yield lease
  finally:
    if isinstance(lease, Lease):
      lease.release()
