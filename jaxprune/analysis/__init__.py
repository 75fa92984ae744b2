"""Analysis: APoZ statistics, sensitivity sweeps, weight and APoZ histograms (PNG).

Plots use matplotlib's Agg canvas directly (no pyplot, no display needed). matplotlib is
the ``plot`` extra (``pip install 'jaxprune[plot]'``): this package imports without it, and
only the ``plot_*`` functions need it.
"""

from jaxprune.analysis.activation_zeros import apoz, apoz_masks
from jaxprune.analysis.histograms import plot_apoz_histogram, plot_weight_histograms
from jaxprune.analysis.sweep import (
  Sensitivity,
  channel_sensitivity,
  choose_ratios,
  plot_sensitivity,
  sensitivity,
)

__all__ = [
  "channel_sensitivity",
  "apoz",
  "apoz_masks",
  "choose_ratios",
  "plot_apoz_histogram",
  "plot_sensitivity",
  "plot_weight_histograms",
  "Sensitivity",
  "sensitivity",
]
