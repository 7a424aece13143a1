"""One path layer for every file the project reads or writes: local folders and gs:// alike.

Everything goes through etils.epath, as orbax and tfds do, so a workdir, a data cache or a corpus
may be a bucket path (`gs://bucket/run`, or any scheme epath knows) as well as a local folder.

* `resolve`: local paths become absolute (orbax wants absolute paths); URIs are left as they are.
  `os.path.abspath("gs://b/run")` would give the local folder `./gs:/b/run`.
* Atomic writes (`write_bytes`): on a local filesystem the data go to a temporary file in the same
  folder, fsync'ed, then renamed over the target, so a reader sees the old file or the new one. An
  object store has no rename, but an upload is atomic by itself (the object appears only when it is
  complete), so there the object is written in place, once, by the one process that writes it.
* Object stores cannot append: files that grow (metrics.jsonl, TensorBoard events) are rewritten
  whole on each flush there (see metrics.py).
* Coordination between processes: process 0 does the shared work (tokenizer, data preparation,
  token cache), then all processes meet at `sync(name)` (multihost_utils.sync_global_devices). No
  file locks: they coordinate nothing across the hosts of a pod, nor on a bucket.
"""

import importlib.util
import os
import re
import uuid

from etils import epath
import jax

from diffusion_lm.errors import UserError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(p) -> bool:
  """Whether `p` names a non-local location (`gs://...`, `s3://...`)."""
  return bool(_URI.match(os.fspath(p)))


def resolve(p) -> str:
  """`p` as a string: a local path made absolute (and ~ expanded), a URI unchanged."""
  text = os.fspath(p)
  if is_uri(text):
    try:
      return str(epath.Path(text))  # trailing slash dropped
    except KeyError:  # a scheme epath does not know
      raise _unknown_scheme(text) from None
  return os.path.abspath(os.path.expanduser(text))


# What a real bucket path needs besides etils: epath's filesystem for the scheme (unless TensorFlow's gfile
# serves it) and, for gs://, google-cloud-storage, with which orbax looks up the bucket's layout.
_SCHEME_PACKAGES = {"gs": {"gcsfs": "gcsfs", "google.cloud.storage": "google-cloud-storage"}, "s3": {"s3fs": "s3fs"}}


def check_uri_support(p) -> None:
  """Fails in one line when the bucket path `p` cannot work here for want of a package."""
  if not is_uri(p):
    return
  from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
  scheme = os.fspath(p).split("://", 1)[0]
  try:
    backend = path(p)._backend  # pylint: disable=protected-access  (which filesystem epath would use)
  except NotImplementedError:
    raise _unknown_scheme(p) from None
  if backend not in (epath_backend.fsspec_backend, epath_backend.tf_backend):
    return  # a filesystem registered for the scheme by the caller
  wanted = {module: name for module, name in _SCHEME_PACKAGES.get(scheme, {}).items()
            if not (backend is epath_backend.tf_backend and module in ("gcsfs", "s3fs"))}
  missing = [name for module, name in wanted.items() if not _importable(module)]
  if missing:
    raise UserError(f"path {os.fspath(p)!r} needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                    f"allowed: pip install {' '.join(missing)}, or a local path")


def _unknown_scheme(p) -> UserError:
  scheme = os.fspath(p).split("://", 1)[0]
  return UserError(f"path {os.fspath(p)!r}: epath has no filesystem for {scheme}://; allowed: a local path, gs://, "
                   "s3://")


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package (google.cloud) is missing
    return False


def path(p) -> epath.Path:
  return epath.Path(resolve(p))


def join(base, *parts) -> str:
  return str(path(base).joinpath(*parts))


def exists(p) -> bool:
  return path(p).exists()


def isfile(p) -> bool:
  return path(p).is_file()


def isdir(p) -> bool:
  return path(p).is_dir()


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def read_text(p) -> str:
  return path(p).read_text(encoding="utf-8")


def size(p) -> int:
  return int(path(p).stat().length)


def mtime(p) -> int:
  return int(path(p).stat().mtime)


def remove(p) -> None:
  path(p).unlink()


def files_under(p) -> list[str]:
  """Every file below folder `p` (recursively), as full path strings."""
  root = path(p)
  return [str(epath.Path(folder) / name) for folder, _, names in root.walk() for name in names]


def write_with(p, write) -> None:
  """Calls `write(f)` on a binary file object whose content becomes `p` atomically (see the module
  docstring); creates the folder. Streams: nothing is held in memory."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_uri(target):
    with target.open("wb") as f:  # the object appears when the upload completes, on close
      write(f)
    return
  tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
  try:
    with tmp.open("wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(target)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_bytes(p, data: bytes) -> None:
  """Writes `data` to `p` atomically (see the module docstring), creating the folder."""
  write_with(p, lambda f: f.write(data))


def append_text(p, text: str) -> None:
  """Appends `text` to the file `p` (created if absent); in a bucket, by rewriting the object."""
  if is_uri(p):
    write_bytes(p, ((read_text(p) if exists(p) else "") + text).encode("utf-8"))
    return
  makedirs(path(p).parent)
  with path(p).open("a", encoding="utf-8") as f:
    f.write(text)


def is_writer() -> bool:
  """Whether this process writes the files every process shares (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """All processes wait here until each has arrived (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
