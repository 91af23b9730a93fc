"""The one base class of errors a user can fix: a bad config, flag, path, prompt or checkpoint.

The command lines (cla_jax.cli) print such an error as one line and exit 2; anything else is
an internal failure and keeps its traceback. It subclasses ValueError so that callers (and
tests) that catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input; the message says what is wrong and how to fix it."""
