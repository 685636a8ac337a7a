"""The one base of the errors a user can fix.

A bad config, a missing asset, a busy workdir, a corrupt corpus: each module
raises its own subclass of `ExpectedError` (beside the builtin it also is, so
callers may catch `ValueError` or `RuntimeError` as before), and every
command (`cli.run`) prints it as one line with its fix instead of a
traceback. Anything else is a bug and keeps its traceback. A leaf: it
imports nothing of the package, so `cli` needs no module that raises.
"""


class ExpectedError(Exception):
  """A failure with a cause and a fix the user acts on; its message says
  both in one line."""
