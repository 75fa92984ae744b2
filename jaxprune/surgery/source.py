"""Where an op or an error comes from: the line of the user's model, for messages."""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any

import flax
import jax
import optax


def _package_dir(module: types.ModuleType) -> str:
  """The directory of a package (with a trailing separator)."""
  if module.__file__ is None:
    raise ImportError(f"{module.__name__} has no __file__: cannot tell its frames from the user's")
  return os.path.dirname(module.__file__) + os.sep


def _spec_dirs(*names: str) -> tuple[str, ...]:
  """The directories of installed packages (opt_einsum, where jnp.einsum raises)."""
  out = []
  for name in names:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
      out.extend(os.path.join(d, "") for d in spec.submodule_search_locations)
  return tuple(out)


_OTHER_LIBRARIES = _spec_dirs("opt_einsum")

# Frames in these directories are library code: a message points at the first frame
# outside them, the line of the user's model that called the layer.
_LIBRARY_DIRS = (
  tuple(_package_dir(m) for m in (jax, flax, optax))
  + _OTHER_LIBRARIES
  + (os.path.dirname(__file__) + os.sep,)
)


def is_library(file_name: str) -> bool:
  """Whether a frame's file is jax (and its opt_einsum), flax, optax, surgery itself or
  Python's own."""
  from jax._src import source_info_util

  return file_name.startswith(_LIBRARY_DIRS) or not source_info_util.is_user_filename(file_name)


def user_line(traceback: Any) -> str:
  """``file.py:LINE`` of the innermost frame of a jax ``Traceback`` outside the libraries."""
  try:
    from jax._src import source_info_util

    code, lasti = traceback.raw_frames() if traceback is not None else ([], [])
    for c, i in zip(code, lasti):
      if not is_library(c.co_filename):
        frame = source_info_util.raw_frame_to_frame(c, i)
        return f"{os.path.basename(frame.file_name)}:{frame.start_line}"
  except Exception:  # source info is a nicety; never fail the trace over it
    return ""
  return ""


def exception_line(e: BaseException) -> str:
  """``file.py:LINE`` of the innermost frame of ``e``'s traceback outside the libraries."""
  tb, line = e.__traceback__, ""
  while tb is not None:
    if not is_library(tb.tb_frame.f_code.co_filename):
      line = f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
    tb = tb.tb_next
  return line


def where(eqn: Any, what: str = "") -> str:
  """```op` [of PARAM] [in NAME STACK] [at FILE:LINE]`` for a message about ``eqn``."""
  stack = str(eqn.source_info.name_stack)
  line = user_line(eqn.source_info.traceback)
  return (
    f"`{eqn.primitive.name}`"
    + (f" of {what}" if what else "")
    + (f" in {stack}" if stack else "")
    + (f" at {line}" if line else "")
  )
