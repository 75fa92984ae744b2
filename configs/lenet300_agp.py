"""LeNet-300-100 on mnist5k, pruned to 90% with AGP (Zhu & Gupta 2017), then fine-tuned.

Steps 0-1000 train dense, 1000-2000 prune every 100 steps along the cubic AGP curve to
90% of every weight matrix (magnitude, per layer), 2000-3000 fine-tune.

  python -m jaxprune train --config configs/lenet300_agp.py [--config.train.steps=600]
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
  config.prune.sparsity = 0.9
  return config
