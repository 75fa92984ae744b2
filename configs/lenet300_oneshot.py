"""LeNet-300-100 on mnist5k: train dense, prune 90% in one shot at step 1000, fine-tune.

Han et al. (2015) prune in one shot after training and retrain with the mask fixed.

  python -m jaxprune train --config configs/lenet300_oneshot.py
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  config.prune.method = "magnitude"
  config.prune.schedule = "one_shot"
  config.prune.sparsity = 0.9
  return config
