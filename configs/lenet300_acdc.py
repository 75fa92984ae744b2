"""LeNet-300-100 on mnist5k with AC/DC (Peste et al. 2021) at 90%.

Dense warm-up to step 600; then sparse and dense phases of 300 steps alternate (a sparse
phase keeps the top 10% |w| of each layer chosen at its start and holds the rest at 0;
a dense phase trains every weight again); from step 2100 sparse to the end.

  python -m jaxprune train --config configs/lenet300_acdc.py [--config.prune.sparsity=0.95]
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  config.train.learning_rate = 1e-3
  config.prune.method = "magnitude"
  config.prune.schedule = "acdc"
  config.prune.sparsity = 0.9
  config.prune.begin = 600  # dense warm-up
  config.prune.every = 300  # phase length
  config.prune.end = 2100  # the final sparse phase
  return config
