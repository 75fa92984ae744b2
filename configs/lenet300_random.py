"""LeNet-300-100 on mnist5k: random pruning to 90% with AGP, the baseline of the criteria.

The same schedule as ``lenet300_agp.py`` with uniformly random scores (seeded by
``train.seed``): what any importance criterion has to beat.

  python -m jaxprune train --config configs/lenet300_random.py
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  config.prune.method = "random"
  config.prune.schedule = "agp"
  config.prune.sparsity = 0.9
  return config
