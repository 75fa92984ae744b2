"""Atomic file writes: a file jaxprune writes is either the old one or the new one, whole.

Every file the package writes (export files, reports, masks, configs, tables, plots)
goes through :func:`atomic_write`: the content goes to a temporary file in the target's
directory, is flushed and ``fsync``-ed, then ``os.replace`` puts it in the target's
place in one step. A writer killed at any moment, or one that fails (a full disk, an
exception while producing the content), leaves the old file as it was; a failed write
removes its temporary file. (A process killed by ``SIGKILL`` cannot remove its own: a
``.<name>.<random>.tmp`` file may stay next to the target, never in its place.)

Orbax checkpoints are written atomically by orbax itself; ``metrics.csv`` is a log that
grows by appended rows (its rewrite on resume goes through here).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
  from matplotlib.figure import Figure

__all__ = [
  "atomic_path",
  "atomic_write",
  "save_figure",
  "savez",
  "write_bytes",
  "write_json",
  "write_text",
]

_TEMP_SUFFIX = ".tmp"


def _temporary(target: pathlib.Path) -> tuple[int, pathlib.Path]:
  """A new file next to ``target`` (permissions as a new ``open(target, 'w')`` would get)."""
  while True:
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    try:
      return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp
    except FileExistsError:
      continue


def _sync_directory(directory: pathlib.Path) -> None:
  """Puts the rename itself on disk (best effort: not every platform opens directories)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_write(
  path: str | os.PathLike,
  mode: str = "wb",
  *,
  encoding: str | None = None,
  newline: str | None = None,
) -> Iterator[IO[Any]]:
  """A file object whose content replaces ``path`` atomically when the block ends.

  The file is a temporary file in the same directory; at the end of the ``with`` block it
  is flushed, ``fsync``-ed and moved over ``path`` with ``os.replace``. If the block
  raises (or writing fails, e.g. the disk is full), the temporary file is removed and
  ``path`` is untouched. An existing target keeps its permission bits; a symlink is
  followed (its target is replaced).

  Args:
    path: the file to write; its parent directory must exist.
    mode: ``"wb"`` (bytes) or ``"w"`` (text).
    encoding: text encoding for ``mode="w"`` (default UTF-8).
    newline: as :func:`open`'s (``""`` for the ``csv`` module).

  Examples:
    >>> import os, tempfile
    >>> from jaxprune import fileio
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with fileio.atomic_write(path, "w") as f:
    ...   _ = f.write("hello")
    >>> open(path).read(), os.listdir(os.path.dirname(path))
    ('hello', ['notes.txt'])
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"jaxprune.fileio.atomic_write: mode must be 'w' or 'wb', got {mode!r}.")
  target = pathlib.Path(os.path.realpath(path))
  fd, temp = _temporary(target)
  try:
    with contextlib.suppress(FileNotFoundError):
      os.chmod(temp, os.stat(target).st_mode & 0o7777)
    if mode == "wb":
      f = os.fdopen(fd, "wb")
    else:
      f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
  except BaseException:
    os.close(fd)
    os.unlink(temp)
    raise
  try:
    with f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temp)
    raise
  _sync_directory(target.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """A temporary path that replaces ``path`` atomically when the block ends.

  For libraries that write by file name (``safetensors.numpy.save_file``,
  ``shutil.copyfile``): they write the yielded temporary path; at the end of the block it
  is ``fsync``-ed and moved over ``path`` with ``os.replace``. If the block raises, the
  temporary file is removed and ``path`` is untouched (as :func:`atomic_write`).

  Examples:
    >>> import os, shutil, tempfile
    >>> from jaxprune import fileio
    >>> folder = tempfile.mkdtemp()
    >>> with fileio.atomic_path(os.path.join(folder, "copy.txt")) as temp:
    ...   _ = shutil.copyfile(fileio.__file__, temp)
    >>> os.listdir(folder)
    ['copy.txt']
  """
  target = pathlib.Path(os.path.realpath(path))
  fd, temp = _temporary(target)
  os.close(fd)
  try:
    with contextlib.suppress(FileNotFoundError):
      os.chmod(temp, os.stat(target).st_mode & 0o7777)
    yield temp
    fd = os.open(temp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(temp, target)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temp)
    raise
  _sync_directory(target.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes ``data`` to ``path`` atomically; returns the path."""
  with atomic_write(path, "wb") as f:
    f.write(data)
  return pathlib.Path(path)


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes ``text`` (UTF-8) to ``path`` atomically; returns the path."""
  with atomic_write(path, "w") as f:
    f.write(text)
  return pathlib.Path(path)


def write_json(path: str | os.PathLike, value: Any, **dumps_kwargs: Any) -> pathlib.Path:
  """Writes ``json.dumps(value, **dumps_kwargs)`` to ``path`` atomically; returns the path.

  The JSON text is made before the file is touched, so a value JSON cannot encode leaves
  the old file as it was.
  """
  return write_text(path, json.dumps(value, **dumps_kwargs))


def savez(path: str | os.PathLike, arrays: dict[str, Any]) -> pathlib.Path:
  """``numpy.savez`` of ``arrays`` (name -> array) to ``path`` atomically; returns the path.

  The path is used as given (``numpy.savez`` would append ``.npz`` to a name without it).
  """
  import numpy as np

  with atomic_write(path, "wb") as f:
    np.savez(f, **arrays)
  return pathlib.Path(path)


def save_figure(fig: Figure, path: str | os.PathLike, **savefig_kwargs: Any) -> pathlib.Path:
  """``fig.savefig`` to ``path`` atomically (format from the suffix unless given)."""
  path = pathlib.Path(path)
  savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or None)
  with atomic_write(path, "wb") as f:
    fig.savefig(f, **savefig_kwargs)
  return path
