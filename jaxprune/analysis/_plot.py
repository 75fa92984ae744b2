"""Figures without pyplot: a ``matplotlib.figure.Figure`` saved with the Agg canvas.

No global backend is touched and no window opens, so plotting works on headless
machines, in threads and in notebooks alike. matplotlib is the ``plot`` extra: it is
imported when a figure is made, so ``jaxprune.analysis`` imports without it and only
its ``plot_*`` functions ask for it.
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING

from jaxprune import fileio
from jaxprune._extras import require

if TYPE_CHECKING:
  from matplotlib.figure import Figure


def figure(rows: int = 1, cols: int = 1, *, width: float = 4.0, height: float = 3.0) -> Figure:
  """A figure of ``rows x cols`` panels, each ``width x height`` inches."""
  require("matplotlib", extra="plot", by="jaxprune.analysis plotting")
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
  """Writes ``fig`` as a PNG at ``path`` (parent folders created); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return fileio.save_figure(fig, path, dpi=100, format="png")
