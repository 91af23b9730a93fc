"""What the three scripts share: flags, and bad input reported as one line, not a traceback."""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from cla_jax.checkpoint import CheckpointError
from cla_jax.config import ConfigError

USER_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, RuntimeError, KeyError)

flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval results.")
flags.DEFINE_string("cache_dir", "~/.cache/cla-jax",
                    "Where downloaded wheels, built datasets and tokenizers are kept.")


def _fail(error: BaseException):
    if os.environ.get("CLA_JAX_TRACEBACK"):
        raise error
    logging.flush()
    text = str(error).replace("\\n", " ").replace("\\'", "'").strip("'\" ")
    text = " ".join(text.split()) or repr(error)  # one line, whatever the source wrote
    print(f"error: {text}", file=sys.stderr)
    raise SystemExit(2)


def _parse_flags(argv):
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, ValueError, TypeError, KeyError) as error:
        _fail(error)  # e.g. --config.train.stepz=3, --config=missing.py
    if len(rest) > 1:
        _fail(ValueError(f"unexpected arguments {rest[1:]}; flags are --name=value"))
    return rest


def start(main):
    """Runs an absl main; bad flags and user errors exit 2 with one `error: ...` line
    (CLA_JAX_TRACEBACK=1 shows the traceback)."""
    def guarded(argv):
        try:
            return main(argv)
        except USER_ERRORS as error:
            _fail(error)
    app.run(guarded, flags_parser=_parse_flags)
