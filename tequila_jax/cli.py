"""What every `python -m tequila_jax.X` command shares: expected errors
(bad config, missing file, shape mismatch, disk full, ...) end the command
with one line, the cause and then the fix, and exit status 2; `--verbose`
shows their traceback. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import logging
import sys
import threading

from absl import app, flags

from tequila_jax.errors import ExpectedError

flags.DEFINE_bool("verbose", False, "Show the traceback of expected errors.")

# Builtins stand for the libraries' own expected errors (a missing file, a
# bad value in a config); every error of ours derives `ExpectedError`.
EXPECTED = (ValueError, OSError, ExpectedError)
EXIT_ERROR = 2


def message(error: BaseException) -> str:
  """The one line an expected error prints."""
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    return (f"disk full writing {error.filename or 'a file'}: free space or "
            "write elsewhere (nothing partial was kept).")
  return " ".join(str(error).split()) or type(error).__name__


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag (unknown, mistyped config field,
  wrong type) as one line on stderr and exit status 2 instead of absl's
  usage dump (exit 1) or a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
    if "--verbose" in argv:
      raise
    text = str(e.args[0]) if e.args else str(e)
    text = " ".join(text.replace("\\'", "'").replace("\\n", " ").split())
    if isinstance(e, (KeyError, AttributeError)):  # ml_collections' lookup
      if len(text) > 1 and text[0] == text[-1] == "'":
        text = text[1:-1]
      text = f"no config field {text}"
    print(f"error: bad command line: {text.rstrip('.')}; fix the flag "
          "(--helpfull lists the flags; a --config.X field must exist in the "
          "config file).", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def _quiet_after_error() -> None:
  """After an expected error, what its background work reports on the way
  out goes to the debug log, not stderr: a failed asynchronous save leaves
  the storage stack's futures unretrieved (asyncio logs each at exit), its
  abandoned coroutines raise when collected (unraisable), and its threads
  may still fail; all would bury the one line (`--verbose` keeps them)."""
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  debug = logging.getLogger("tequila_jax").debug
  sys.unraisablehook = lambda u: debug("after the error: %s", u.exc_value)
  threading.excepthook = lambda a: debug("after the error, thread %s: %s",
                                         a.thread, a.exc_value)


def run(main) -> None:
  """`absl.app.run(main)`, with expected errors (and bad flags) as one line
  on stderr."""

  def guarded(argv):
    try:
      return main(argv)
    except EXPECTED as e:
      if flags.FLAGS.verbose:
        raise
      _quiet_after_error()
      print(f"error: {message(e)} (--verbose shows the traceback)",
            file=sys.stderr)
      return EXIT_ERROR

  app.run(guarded, flags_parser=_parse_flags)
