"""LeNet-300-100 on mnist5k trained dense for 3000 steps: the baseline of the recipes.

python -m jaxprune train --config configs/dense.py
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  config.prune.method = "none"
  return config
