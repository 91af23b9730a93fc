"""Paths that live on a local disk or on cloud storage (gs://...), as `etils.epath.Path`.

epath is orbax's own path type: workdirs, checkpoints, metrics, data and token stores all go
through it, so a `gs://bucket/run` works wherever a local directory does. Local-only calls
(`open`, `os.replace`, pathlib) stay out of the library.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
    return "://" in str(path)


def as_path(path: epath.PathLike) -> epath.Path:
    """`path` as an epath.Path; a local one with '~' expanded and made absolute."""
    if is_remote(path):
        return epath.Path(str(path))
    return epath.Path(os.path.abspath(os.path.expanduser(str(path))))
