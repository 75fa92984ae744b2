"""Marking NNX module outputs in a trace, by instance: no class is patched.

:func:`mark_outputs`, called inside a function that :func:`jaxprune.surgery.capture.trace`
traces, on modules of a copy merged there (``nnx.merge(graphdef, state)``), changes the
class of those *instances* to a subclass of their own class whose ``__call__`` names its
output in the jaxpr (``checkpoint_name``). The classes themselves, and every other
instance, are untouched, so other threads and other models see nothing; the marks of
each trace go to that trace only (a context variable).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

PREFIX = "jaxprune_capture:"


@dataclasses.dataclass(frozen=True)
class Mark:
  """A marked module call: its output is the value of the ``name`` equation ``name``.

  ``returned`` is the type name of what the call returned when it was not one array
  (then nothing is marked and ``name`` is ``None``).
  """

  path: str
  name: str | None
  returned: str | None = None


class _Sink:
  """What :func:`mark_outputs` marks in one ``capture.trace`` (the context's current one)."""

  def __init__(self) -> None:
    self.paths: dict[int, str] | None = None
    self.marks: list[Mark] = []


_SINK: contextvars.ContextVar[_Sink | None] = contextvars.ContextVar(
  "jaxprune_capture", default=None
)


@contextlib.contextmanager
def collecting() -> Iterator[list[Mark]]:
  """The marks :func:`mark_outputs` makes until the block ends (one trace's)."""
  sink = _Sink()
  token = _SINK.set(sink)
  try:
    yield sink.marks
  finally:
    _SINK.reset(token)


_MARKING: dict[type, type] = {}
_MARKING_LOCK = threading.Lock()


def _marking_class(cls: type) -> type:
  """A subclass of ``cls`` whose ``__call__`` marks its output when its instance is marked."""
  with _MARKING_LOCK:
    sub = _MARKING.get(cls)
    if sub is None:

      def __call__(self, *args, **kwargs):
        # ``cls`` is any module class: its ``__call__`` is not known statically.
        parent: Any = super(marking, self)
        y = parent.__call__(*args, **kwargs)
        sink = _SINK.get()
        if sink is None or sink.paths is None:
          return y
        path = sink.paths.get(id(self))
        if path is None:
          return y
        if not isinstance(y, jax.Array):
          sink.marks.append(Mark(path, None, type(y).__name__))
          return y
        name = f"{PREFIX}{len(sink.marks)}"
        sink.marks.append(Mark(path, name))
        return checkpoint_name(y, name)

      marking = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
      marking.__qualname__ = cls.__qualname__
      _MARKING[cls] = sub = marking
    return sub


def mark_outputs(modules: Mapping[str, nnx.Module]) -> None:
  """Marks the output of every call of these module instances in the running :func:`trace`.

  Call it inside the traced function, on modules of a copy merged there
  (``nnx.merge(graphdef, state)``): each instance's class becomes a subclass of its own
  whose ``__call__`` names its output (``Traced.marks``). The classes themselves, and
  every other instance, are not changed. A ``super().__call__`` inside the module is
  not marked again; a module called several times is marked at every call.

  Raises:
    RuntimeError: outside :func:`trace`.
  """
  sink = _SINK.get()
  if sink is None:
    raise RuntimeError("mark_outputs() marks modules of a model traced by capture.trace().")
  if sink.paths is None:
    sink.paths = {}
  for path, m in modules.items():
    object.__setattr__(m, "__class__", _marking_class(type(m)))
    sink.paths[id(m)] = path
