"""LeNet-300-100 on mnist5k pruned to Han et al.'s (2015) per-layer sparsity: 92/91/74%.

Han's LeNet-300-100 kept 8% / 9% / 26% of fc1 / fc2 / fc3 (12x fewer weights) at the
dense error. Here: steps 0-1000 dense, 1000-2000 AGP every 100 steps to those targets
(magnitude, per layer), 2000-3000 fine-tune. ``jaxprune export`` then writes the compact
file (``export.jxp``, ``export-int8.jxp``) and prints its size next to dense float32.

  python -m jaxprune train --config configs/lenet300_han.py --config.train.workdir=runs/han
  python -m jaxprune export --workdir runs/han
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  config.train.learning_rate = 1e-3
  config.prune.method = "magnitude"
  config.prune.schedule = "agp"
  config.prune.sparsity = 0.92
  config.prune.overrides = {"fc2": 0.91, "fc3": 0.74}
  return config
