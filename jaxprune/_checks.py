"""Hyperparameter checks at construction: one message shape for every transform and trainer.

Each check raises where the bad value is given, naming the function and the argument:
``TypeError`` for a value of the wrong kind (a string, a bool, an array), ``ValueError``
for one outside its range (NaN and infinities included). A traced value (a
hyperparameter of ``optax.inject_hyperparams`` under ``jit``) has no value on the host
and passes unchecked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxprune import select as select_lib


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
  if low is not None and high is not None:
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  if low is not None:
    return f"{'>' if low_open else '>='} {low:g}"
  if high is not None:
    return f"{'<' if high_open else '<='} {high:g}"
  return "(finite)"


def number(
  value: Any,
  name: str,
  fn: str,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
) -> None:
  """Raises unless ``value`` is a finite real scalar in the given range.

  Args:
    value: the hyperparameter.
    name: the argument's name, as the user wrote it.
    fn: the function it was given to (``"sr_ste"``, ``"l1()"``).
    low, high: the bounds (``None``: unbounded on that side).
    low_open, high_open: exclude the bound itself.

  Examples:
    >>> from jaxprune import _checks
    >>> _checks.number(float("nan"), "decay", "sr_ste", low=0)
    Traceback (most recent call last):
    ...
    ValueError: sr_ste: decay must be a number >= 0 (finite, scalar), got nan.
  """
  if not select_lib.is_concrete(value):
    return
  what = f"a number {_range(low, high, low_open, high_open)}"
  v = np.asarray(value)
  if isinstance(value, bool | np.bool_) or not (
    np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)
  ):
    raise TypeError(f"{fn}: {name} must be {what}, got {value!r} ({type(value).__name__}).")
  bad = v.ndim != 0 or not np.isfinite(v)
  if not bad and low is not None:
    bad = v <= low if low_open else v < low
  if not bad and high is not None:
    bad = v >= high if high_open else v > high
  if bad:
    raise ValueError(f"{fn}: {name} must be {what} (finite, scalar), got {value!r}.")


def integer(value: Any, name: str, fn: str, *, low: int | None = None, what: str = "") -> int:
  """``value`` as an ``int``; raises unless it is an integer (not a bool) ``>= low``.

  ``what`` says what the integer is (``"steps between mask updates"``) in the message.

  Examples:
    >>> from jaxprune import _checks
    >>> _checks.integer("100", "every", "rigl", low=1)
    Traceback (most recent call last):
    ...
    TypeError: rigl: every must be an integer >= 1, got '100' (str).
  """
  bound = f" >= {low}" if low is not None else ""
  about = f" ({what})" if what else ""
  if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
    raise TypeError(
      f"{fn}: {name} must be an integer{bound}{about}, got {value!r} ({type(value).__name__})."
    )
  if low is not None and value < low:
    raise ValueError(f"{fn}: {name} must be an integer{bound}{about}, got {value!r}.")
  return int(value)


def flag(value: Any, name: str, fn: str) -> None:
  """Raises ``TypeError`` unless ``value`` is ``True`` or ``False``."""
  if not isinstance(value, bool | np.bool_):
    raise TypeError(f"{fn}: {name} must be True or False, got {value!r} ({type(value).__name__}).")
