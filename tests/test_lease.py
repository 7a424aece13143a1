"""One writer per workdir (lease.py): refused while the holder lives, never blocked by a killed holder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from diffusion_lm import lease
from diffusion_lm.errors import UserError
from diffusion_lm.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}

# A process that takes the lease at an agreed moment and reports whether it got it, then holds it.
_HOLDER = """
import sys, time
from diffusion_lm import lease
from diffusion_lm.errors import UserError
workdir, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
  lease.Lease(workdir, "train").acquire()
except UserError as e:
  print("refused", e, flush=True)
  sys.exit(0)
print("held", flush=True)
time.sleep(120)
"""


def _holder(workdir, start=0.0):
  return subprocess.Popen([sys.executable, "-c", _HOLDER, workdir, str(start)], cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_live_holder_refuses_a_second_writer_until_it_releases(tmp_path):
  workdir = str(tmp_path)
  first = lease.Lease(workdir, "train").acquire()
  try:
    with pytest.raises(UserError) as e:
      lease.Lease(workdir, "distill").acquire()
    assert f"process {os.getpid()} on host {socket.gethostname()!r} (train" in str(e.value)
    assert "\n" not in str(e.value)
  finally:
    first.release()
  assert not os.path.exists(lease.lease_path(workdir))
  lease.Lease(workdir, "train").acquire().release()


def test_a_sigkilled_holder_never_blocks_the_next_run(tmp_path):
  workdir = str(tmp_path)
  proc = _holder(workdir)
  assert proc.stdout.readline().strip() == "held"
  with pytest.raises(UserError, match=f"process {proc.pid} "):  # alive: refused
    lease.Lease(workdir, "train").acquire()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert json.load(open(lease.lease_path(workdir)))["pid"] == proc.pid  # the kill left its lease behind
  start = time.time()
  taken = lease.Lease(workdir, "train").acquire()  # well before the lease would expire
  try:
    assert time.time() - start < 5 and taken.took_over["pid"] == proc.pid
  finally:
    taken.release()


def test_another_hosts_lease_holds_until_it_expires(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  now = time.time()
  record = {"pid": 1, "host": "some-other-host", "command": "train", "token": "x", "renewed": now,
            "expires": now + 30}
  with open(lease.lease_path(workdir), "w") as f:
    json.dump(record, f)
  with pytest.raises(UserError, match="process 1 on host 'some-other-host'"):
    lease.Lease(workdir, "train").acquire()
  monkeypatch.setattr(time, "time", lambda: now + 31)  # its holder stopped renewing 31 s ago
  lease.Lease(workdir, "train").acquire().release()


def test_two_runs_starting_together_one_goes_on(tmp_path):
  workdir = str(tmp_path)
  start = time.time() + 8  # both interpreters are up and importing done by then
  procs = [_holder(workdir, start) for _ in range(2)]
  try:
    answers = sorted(p.stdout.readline().strip().split(" ", 1)[0] for p in procs)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  assert answers == ["held", "refused"], answers


def test_renewal_notices_a_takeover(tmp_path, monkeypatch):
  monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
  workdir = str(tmp_path)
  held = lease.Lease(workdir, "train").acquire()
  try:
    other = {"pid": 1, "host": "some-other-host", "command": "train", "token": "other", "renewed": time.time(),
             "expires": time.time() + 60}
    with open(lease.lease_path(workdir), "w") as f:
      json.dump(other, f)
    deadline = time.time() + 5
    while not held.lost and time.time() < deadline:
      time.sleep(0.05)
    with pytest.raises(UserError, match="taken over by process 1 on host 'some-other-host'"):
      held.check()
  finally:
    held.release()
  assert json.load(open(lease.lease_path(workdir)))["token"] == "other"  # release leaves another's lease alone


def test_training_is_refused_before_it_touches_the_workdir(tmp_path, tiny_config):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  proc = _holder(workdir)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"is being trained by process {proc.pid} "):
      train_and_evaluate(tiny_config, workdir)
    assert sorted(os.listdir(workdir)) == [lease.LEASE_FILE]  # no tokenizer, data or checkpoint written
  finally:
    proc.kill()
    proc.wait()
  tiny_config.training.num_steps = 1
  train_and_evaluate(tiny_config, workdir)  # the holder was killed: the next run goes on
  assert not os.path.exists(lease.lease_path(workdir))  # and releases its lease when done
