"""User-facing errors: one line, naming the bad value and what is allowed."""

import functools
import operator
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
    check_config_file(found, f"--{name}={path}")
    if found != path:
      argv[i] = argv[i][:len(argv[i]) - len(path + suffix)] + found + suffix
  return argv


def check_config_file(path: str, shown: str) -> None:
  """Fails in one line when the config file does not parse or defines no get_config (ml_collections
  would print a traceback, or read a missing get_config as an unknown key 'config_config')."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
  except SyntaxError as e:
    raise UserError(f"{shown}: Python syntax error at line {e.lineno}: {e.msg}; allowed: a Python config file "
                    "defining get_config()") from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{shown}: cannot read the file ({getattr(e, 'strerror', None) or e}); allowed: a readable "
                    "Python config file defining get_config()") from None
  if not any(isinstance(node, (ast.FunctionDef, ast.Assign, ast.ImportFrom)) and
             ("get_config" in [getattr(node, "name", None)]
              + [getattr(t, "id", None) for t in getattr(node, "targets", [])]
              + [a.asname or a.name for a in getattr(node, "names", [])])
             for node in tree.body):
    raise UserError(f"{shown}: the file defines no get_config(); allowed: a Python config file whose "
                    "get_config() returns an ml_collections.ConfigDict, e.g. configs/tiny.py")


# Seeds: jax.random.key and grain take 32 bits; a larger seed would be wrapped into another's stream.
MAX_SEED = 2**32 - 1


def check_seed(value, name: str) -> int:
  """`value` as a seed, or UserError naming `name` (a flag or a keyword) and the allowed range."""
  try:
    if isinstance(value, bool):
      raise TypeError
    value = operator.index(value)  # int, numpy integers; not floats or strings
  except TypeError:
    raise UserError(f"{name}={value!r}; allowed: an integer from 0 to {MAX_SEED}") from None
  if not 0 <= value <= MAX_SEED:
    raise UserError(f"{name}={value}; allowed: an integer from 0 to {MAX_SEED} (seeds are 32-bit; a larger one "
                    "would repeat another seed's samples)")
  return value


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
    parsed = flags.FLAGS(argv)
    for _, name, _, _ in _config_file_flags(argv):
      flags.FLAGS[name].value  # pylint: disable=pointless-statement  (errors of a lazily loaded file: here)
    return parsed
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    _fail(_flag_error_message(e, argv), argv)


def _flag_error_message(error: BaseException, argv) -> str:
  """One line for a flag or config error, naming the flag as the user typed it.

  ml_collections reports an unknown override key as the repr of a KeyError inside an AttributeError
  (quotes escaped, a newline before its "Did you mean"), and an exception in get_config as the whole
  traceback: the key and the flag, or the exception's own last line, are what the user needs."""
  text = str(error)
  flat = text.replace("\\'", "'").replace("\\n", "\n")
  if "Traceback (most recent call last)" in flat:  # raised inside a config file's get_config
    last = [line.strip() for line in flat.splitlines() if line.strip()][-1]
    flag = re.match(r"flag (--\S+?): ", flat)
    return f"{flag.group(1) + ': ' if flag else ''}{last}"
  key = re.match(r"^[\"']*(\w+)[\"']*(\s|$)", flat.strip())
  if isinstance(error, (AttributeError, KeyError)) or (key and "Did you mean" in flat):
    close = re.search(r'Did you mean "([^"]+)"', flat)
    name = key.group(1) if key else None
    override = next((a.split("=")[0] for a in argv[1:] if name and a.startswith("--config") and "." in a.split("=")[0]
                     and re.search(rf"\.{name}(\.|$)", a.split("=")[0])), None)
    if override and override.startswith("--config.model.") and "distill" in str(argv[0] if argv else ""):
      return (f"unknown config key {override!r}: distill builds the student with the teacher's network (the "
              "teacher workdir's model); allowed: the keys of configs/distill.py (distill.*, training.*, ...)")
    return (f"unknown config key {override or name!r}"
            + (f"; did you mean {close.group(1)!r}?" if close else "; see configs/default.py (configs/distill.py for "
               "distill) for the keys"))
  return " ".join(flat.split())
