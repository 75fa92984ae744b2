"""LeNet-300-100 on mnist5k trained sparse from scratch on a fixed random mask, 90%.

The baseline of SET and RigL: every layer 90% sparse (ERK) from step 0, the random mask
(seeded by train.seed) never changes.

  python -m jaxprune train --config configs/lenet300_static.py [--config.prune.sparsity=0.95]
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  config.train.learning_rate = 1e-3
  config.prune.method = "static"
  config.prune.sparsity = 0.9
  config.prune.distribution = "erk"
  return config
