"""User-facing errors: one line, naming the bad value and what is allowed."""

import functools
import os
import re
import sys


class UserError(ValueError):
  """Bad input from a user (flag, config, corpus, workdir). Printed as one line, exit code 2."""


def check(condition: bool, message: str) -> None:
  """Raises UserError(message) unless condition holds."""
  if not condition:
    raise UserError(message)


def cli_main(main):
  """Wraps an absl `main(argv)`: a UserError becomes `error: ...` on stderr and exit code 2.

  With --verbose (an absl flag defined by each entry point) the traceback is shown too.
  """

  @functools.wraps(main)
  def wrapped(argv):
    from absl import flags, logging  # pylint: disable=g-import-not-at-top
    if not getattr(flags.FLAGS, "verbose", False):
      logging.set_verbosity(logging.WARNING)  # library INFO chatter (orbax, tfds) hides the progress
    try:
      return main(argv)
    except UserError as e:
      if flags.FLAGS.is_parsed() and getattr(flags.FLAGS, "verbose", False):
        raise
      message = " ".join(str(e).split("\n"))
      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.exit(2)

  return wrapped


def _fail(message: str, argv) -> None:
  if "--verbose" in argv:
    raise
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  sys.exit(2)


# The shipped configs: the `configs` folder next to the package, in a source tree and in an installed
# wheel alike (pyproject.toml installs it as a top-level package beside diffusion_lm).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config_file_flags(argv) -> list[tuple[int, str, str, str]]:
  """(argv index, flag name, file path, ":arg" suffix) of each config-file flag on the command line."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  names = [name for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, config_flags.ConfigFileFlagParser)]
  found = []
  for i, arg in enumerate(argv[1:], start=1):
    for name in names:
      if arg.startswith(f"--{name}="):
        found.append((i, name, arg.split("=", 1)[1]))
      elif arg == f"--{name}" and i + 1 < len(argv):
        found.append((i + 1, name, argv[i + 1]))
  # A path may carry an argument for get_config after a colon: configs/text8.py:small.
  return [(i, name, value.split(":", 1)[0], value[len(value.split(":", 1)[0]):]) for i, name, value in found]


def find_config_file(path: str, flag: str = "config") -> str:
  """The config file `path` names: the path itself when it is a file, else a shipped config.

  A shipped config is found by `configs/NAME.py`, `NAME.py` or `NAME` when no such file is under the
  current folder, so the README's commands work from any folder once the package is installed. Raises
  UserError when neither exists.
  """
  if os.path.isfile(path):
    return path
  folder, name = os.path.split(os.path.normpath(path))
  if folder in ("", "configs") and name and not name.startswith(("_", ".")):
    shipped = os.path.join(CONFIGS_DIR, name if name.endswith(".py") else name + ".py")
    if os.path.isfile(shipped):
      return shipped
  names = sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_")) \
      if os.path.isdir(CONFIGS_DIR) else []
  raise UserError(f"--{flag}={path}: {'not a file' if os.path.exists(path) else 'no such file'}; allowed: "
                  "a Python config file defining get_config()"
                  + (f", e.g. configs/tiny.py (configs/ holds {', '.join(names)})" if names else ""))


def resolve_config_files(argv) -> list[str]:
  """argv with each --config file path replaced by the file find_config_file finds (UserError if none).

  ml_collections would defer a missing file's failure until the config is first read, which then
  surfaces as an OSError traceback far from the command line.
  """
  argv = list(argv)
  for i, name, path, suffix in _config_file_flags(argv):
    found = find_config_file(path, name)
    if found != path:
      argv[i] = argv[i][:len(argv[i]) - len(path + suffix)] + found + suffix
  return argv


def parse_flags(argv):
  """absl flags parser for the entry points: a bad flag or config override is one `error:` line, exit 2.

  Pass to app.run(main, flags_parser=parse_flags).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    argv = resolve_config_files(argv)
  except UserError as e:
    _fail(str(e), argv)
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections: an override naming an unknown config key
    text = str(e).replace("\\'", "'").replace("\\n", " ")
    key = re.search(r"'(\w+)'", text)
    close = re.search(r'Did you mean "([^"]+)"', text)
    override = next((a.split("=")[0] for a in argv if key and a.startswith("--config.") and
                     a.split("=")[0].endswith("." + key.group(1))), None)
    _fail(f"unknown config key {override or (key.group(1) if key else text)!r}"
          + (f"; did you mean {close.group(1)!r}?" if close else "; see configs/default.py for the keys"), argv)
  except (flags.Error, KeyError, ValueError, TypeError, OSError) as e:  # OSError: an unreadable config file
    _fail(str(e), argv)
