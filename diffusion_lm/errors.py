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


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config_file_flags(argv) -> list[tuple[str, str]]:
  """(flag name, file path) of each config-file flag given on the command line."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  names = [name for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, config_flags.ConfigFileFlagParser)]
  found = []
  for i, arg in enumerate(argv[1:], start=1):
    for name in names:
      if arg.startswith(f"--{name}="):
        found.append((name, arg.split("=", 1)[1]))
      elif arg == f"--{name}" and i + 1 < len(argv):
        found.append((name, argv[i + 1]))
  # A path may carry an argument for get_config after a colon: configs/text8.py:small.
  return [(name, value.split(":", 1)[0]) for name, value in found]


def check_config_files(argv) -> None:
  """Raises UserError naming a --config file that does not exist.

  ml_collections defers that failure until the config is first read, which then surfaces as an
  OSError traceback far from the command line.
  """
  for name, path in _config_file_flags(argv):
    if not os.path.isfile(path):
      shipped = sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_")) \
          if os.path.isdir(CONFIGS_DIR) else []
      raise UserError(f"--{name}={path}: {'not a file' if os.path.exists(path) else 'no such file'}; allowed: "
                      "a Python config file defining get_config()"
                      + (f", e.g. configs/tiny.py (configs/ holds {', '.join(shipped)})" if shipped else ""))


def parse_flags(argv):
  """absl flags parser for the entry points: a bad flag or config override is one `error:` line, exit 2.

  Pass to app.run(main, flags_parser=parse_flags).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    check_config_files(argv)
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
