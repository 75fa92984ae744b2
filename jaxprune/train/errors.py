"""Errors a user can fix (a damaged file of a run, an output path that cannot be one).

The ``jaxprune`` command prints these, :class:`jaxprune.train.config.ConfigError` and
``OSError`` (a missing or unreadable file) as one line naming the file or argument,
without a traceback (``--debug`` shows it); any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import pathlib


class RunFileError(ValueError):
  """A file of a run (its ``config.json``, a checkpoint) is damaged or cannot be read.

  The message starts with the file's path.
  """


def check_out_dir(out: str | os.PathLike | None, what: str) -> None:
  """Raises unless ``out`` can be (or is) a writable directory; nothing is created.

  Called before any work, so a bad output path fails at once, not after the work.

  Args:
    out: the directory (``None`` or ``""``: nothing to check).
    what: the argument that gave it (``"--out"``, ``"posttrain.out"``), for the message.

  Raises:
    NotADirectoryError: when ``out`` or a folder above it is a file.
    PermissionError: when the nearest existing folder of ``out`` cannot be written.

  Examples:
    >>> import tempfile, pathlib
    >>> from jaxprune.train.errors import check_out_dir
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "export.md"
    >>> _ = file.write_text("")
    >>> check_out_dir(file / "sub", "--out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    NotADirectoryError: --out .../export.md/sub: .../export.md is a file, not a directory.
  """
  if not out:
    return
  path = pathlib.Path(out)
  existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
  if not existing.is_dir():
    raise NotADirectoryError(f"{what} {path}: {existing} is a file, not a directory.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{what} {path}: cannot write into {existing}.")
