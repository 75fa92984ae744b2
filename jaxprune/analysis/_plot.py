"""Figures without pyplot: a ``matplotlib.figure.Figure`` saved with the Agg canvas.

No global backend is touched and no window opens, so plotting works on headless
machines, in threads and in notebooks alike.
"""

from __future__ import annotations

import os
import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure(rows: int = 1, cols: int = 1, *, width: float = 4.0, height: float = 3.0) -> Figure:
  """A figure of ``rows x cols`` panels, each ``width x height`` inches."""
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
  """Writes ``fig`` as a PNG at ``path`` (parent folders created); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100, format="png")
  return path
