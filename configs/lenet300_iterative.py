"""LeNet-300-100 on mnist5k: iterative magnitude pruning (Han et al. 2015) to 92%.

Train dense until step 1000, then 3 prune/retrain rounds 500 steps apart (each removes
the same fraction of the remaining weights: 57%, 81%, 92%), the output layer pruned
less (75%; 74% in the paper), then fine-tune.

  python -m jaxprune train --config configs/lenet300_iterative.py
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  steps = config.train.get_ref("steps")
  config.prune.method = "magnitude"
  config.prune.schedule = "iterative"
  config.prune.sparsity = 0.92
  config.prune.rounds = 3
  config.prune.begin = steps // 3
  config.prune.every = steps // 6
  config.prune.overrides = {"fc3": 0.75}
  return config
