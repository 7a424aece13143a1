"""User-facing errors: one line, naming the bad value and what is allowed."""

import functools
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


def parse_flags(argv):
  """absl flags parser for the entry points: a bad flag or config override is one `error:` line, exit 2.

  Pass to app.run(main, flags_parser=parse_flags).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
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
  except (flags.Error, KeyError, ValueError, TypeError) as e:
    _fail(str(e), argv)
