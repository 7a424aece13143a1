"""User-facing errors: one line, naming the bad value and what is allowed."""

import functools
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
