"""Optional dependencies: one check that names the extra to install when a module is missing.

``pip install jaxprune`` brings jax, flax, optax and numpy only. The training pipeline
needs the ``train`` extra, the plot functions the ``plot`` extra (see pyproject.toml).
A module that needs an extra calls :func:`require` before importing it, so a missing
package fails with the command that installs it rather than a bare ``No module named``.

Examples:
  >>> from jaxprune._extras import require
  >>> require("numpy", extra="plot", by="jaxprune.example")  # installed: nothing happens
  >>> require("not_a_module_xyz", extra="plot", by="jaxprune.example")
  Traceback (most recent call last):
  ...
  ModuleNotFoundError: jaxprune.example needs the 'plot' extra: pip install 'jaxprune[plot]' (not installed: not_a_module_xyz)
"""

from __future__ import annotations

import importlib.util


def require(*modules: str, extra: str, by: str) -> None:
  """Raises an ImportError (ModuleNotFoundError) naming ``extra`` unless every one of ``modules`` is installed.

  Only looks the top-level packages up (``importlib.util.find_spec``), importing
  nothing, so checking for a heavy package (TensorFlow Datasets) costs nothing.

  Args:
    *modules: importable names, e.g. ``"matplotlib"`` or ``"orbax.checkpoint"``.
    extra: the jaxprune extra that installs them (``"train"``, ``"plot"``).
    by: what needs them, as the message names it (``"jaxprune.train"``).

  Raises:
    ModuleNotFoundError: (an ImportError) with ``pip install 'jaxprune[<extra>]'`` and the missing modules.
  """
  missing = [m for m in modules if importlib.util.find_spec(m.partition(".")[0]) is None]
  if missing:
    raise ModuleNotFoundError(
      f"{by} needs the {extra!r} extra: pip install 'jaxprune[{extra}]' "
      f"(not installed: {', '.join(missing)})",
      name=missing[0],
    )
