"""Progress bars that stay readable in log files: tqdm on a terminal, plain lines elsewhere.

A tqdm bar redraws itself with carriage returns, which a terminal overwrites in place
but a file or a CI log keeps: thousands of redraws on one line. :func:`bar` returns a
tqdm bar when its stream is a terminal (or a Jupyter output) and otherwise a
:class:`LineBar`, which prints one plain line each time the count crosses another
``every`` percent (and one at the end). Every progress bar in jaxprune comes from here.

tqdm is optional (the ``train`` extra installs it): without it every bar is a
:class:`LineBar`, whose lines read the same as tqdm's with or without tqdm.

Examples:
  >>> import io
  >>> from jaxprune import progress
  >>> log = io.StringIO()  # not a terminal
  >>> with progress.bar(total=1000, desc="train", unit="step", file=log, every=25) as b:
  ...   for _ in range(1000):
  ...     b.update()
  >>> lines = log.getvalue().splitlines()
  >>> len(lines), "\\r" in log.getvalue(), lines[-1].split("[")[0]
  (5, False, 'train: 100% 1000/1000 ')
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from types import ModuleType
from typing import IO, Any

EVERY = 5.0  # percent between two lines of a LineBar


def _tqdm() -> ModuleType | None:
  """The tqdm module, or None where it is not installed (the core install)."""
  try:
    import tqdm
  except ModuleNotFoundError:
    return None
  return tqdm


def _clock(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours:d}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def format_line(
  n: int,
  total: int | None,
  elapsed: float,
  *,
  desc: str = "",
  unit: str = "it",
  postfix: str = "",
  initial: int = 0,
) -> str:
  """One progress line, as tqdm's ``format_meter`` writes it without a bar (``ncols=0``).

  Examples:
    >>> from jaxprune.progress import format_line
    >>> format_line(150, 200, 3.2, desc="train", unit="step", postfix="loss=0.1", initial=100)
    'train:  75% 150/200 [00:03<00:03, 15.62step/s, loss=0.1]'
    >>> format_line(25, None, 0.0)
    '25it [00:00, ?it/s]'
  """
  rate = (n - initial) / elapsed if elapsed else None
  if rate and 1 / rate > 1:  # slower than one per second: seconds per unit
    speed = f"{1 / rate:5.2f}s/{unit}"
  else:
    speed = f"{rate:5.2f}{unit}/s" if rate else f"?{unit}/s"
  if total:
    remaining = _clock((total - n) / rate) if rate else "?"
    times = f"{_clock(elapsed)}<{remaining}, {speed}"
    count = f"{100 * n / total:3.0f}% {n}/{total}"
  else:
    times = f"{_clock(elapsed)}, {speed}"
    count = f"{n}{unit}"
  prefix = f"{desc}: " if desc else ""
  return f"{prefix}{count} [{times}{', ' + postfix if postfix else ''}]"


def is_interactive(file: IO[str]) -> bool:
  """Whether ``file`` shows carriage-return redraws in place: a terminal or Jupyter output."""
  if type(file).__name__ == "OutStream" and "ipykernel" in type(file).__module__:
    return True
  isatty = getattr(file, "isatty", None)
  try:
    return bool(isatty and isatty())
  except ValueError:  # a closed stream
    return False


class LineBar:
  """A tqdm-like bar for files and logs: a plain line every ``every`` percent, no ``\\r``.

  Supports what jaxprune's loops call on a bar: ``update``, ``set_postfix``,
  ``set_postfix_str``, ``set_description``, ``close`` and use as a context manager.
  Without a ``total`` it prints a line every ``100 / every`` updates and one at the end;
  with ``disable`` it counts and prints nothing.
  """

  def __init__(
    self,
    *,
    total: int | None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    file: IO[str] | None = None,
    every: float = EVERY,
    disable: bool = False,
  ):
    if not every > 0:
      raise ValueError(f"every must be a percentage > 0, got {every!r}.")
    self.total, self.desc, self.unit = total, desc, unit
    self.n = self.initial = initial
    self.file = file
    self.every = every
    self.disable = disable
    self.postfix = ""
    self.start = time.monotonic()
    self._printed = -1  # the last stage printed
    self._closed = False

  def _stage(self) -> int:
    if self.total:
      return int(100.0 * self.n / self.total // self.every)
    return int((self.n - self.initial) // max(1, round(100 / self.every)))

  def _print(self) -> None:
    line = format_line(
      self.n,
      self.total,
      time.monotonic() - self.start,
      desc=self.desc,
      unit=self.unit,
      postfix=self.postfix,
      initial=self.initial,
    )
    file = sys.stderr if self.file is None else self.file
    file.write(line + "\n")
    file.flush()
    self._printed = self._stage()

  def update(self, n: int = 1) -> None:
    self.n += n
    if not self.disable and self._stage() > self._printed:
      self._print()

  def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kw):
    items = {**(ordered_dict or {}), **kw}
    self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

  def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
    self.postfix = str(s)

  def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
    self.desc = desc or ""

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    done = self.total is not None and self.n >= self.total and self._printed >= self._stage()
    if not done and not self.disable and self.n > self.initial:
      self._print()  # where it stopped

  def __enter__(self) -> LineBar:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def bar(
  *,
  total: int | None,
  desc: str = "",
  unit: str = "it",
  initial: int = 0,
  disable: bool = False,
  file: IO[str] | None = None,
  every: float = EVERY,
) -> Any:
  """A progress bar on ``file`` (default ``sys.stderr``, as tqdm's).

  Args:
    total: the count at 100%.
    desc, unit, initial: as tqdm's (``initial``: where a resumed loop starts).
    disable: no output at all (a disabled :class:`LineBar`).
    file: the stream; a terminal or Jupyter output gets a tqdm bar where tqdm is
      installed, anything else (a file, a pipe, a CI log) a :class:`LineBar`.
    every: the percent between two lines of a :class:`LineBar`.

  Returns:
    A ``tqdm.tqdm`` or a :class:`LineBar`; both take ``update``, ``set_postfix``,
    ``set_postfix_str`` and ``close``, and work as context managers.
  """
  stream = sys.stderr if file is None else file
  tqdm = _tqdm()
  if tqdm is not None and not disable and is_interactive(stream):
    return tqdm.tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream)
  return LineBar(
    total=total, desc=desc, unit=unit, initial=initial, file=stream, every=every, disable=disable
  )


def write(message: str, file: IO[str] | None = None) -> None:
  """Prints ``message`` on its own line without breaking a tqdm bar (default: stdout)."""
  tqdm = _tqdm()
  if tqdm is None:
    print(message, file=sys.stdout if file is None else file, flush=True)
  else:
    tqdm.tqdm.write(message, file=file)
