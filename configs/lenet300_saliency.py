"""LeNet-300-100 on mnist5k: saliency pruning (|w * dL/dw|, first-order Taylor) to 90%, AGP.

Scores use the gradients of the batch at each mask update, so they measure how much
the loss would change if the weight were removed, not just its size.

  python -m jaxprune train --config configs/lenet300_saliency.py
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  config.prune.method = "saliency"
  config.prune.schedule = "agp"
  config.prune.sparsity = 0.9
  return config
