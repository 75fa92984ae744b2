"""LeNet-300-100 on mnist5k: global magnitude pruning to 95% with AGP, then fine-tune.

One threshold over all three weight matrices (``prune.scope="global"``): the layers end
at different sparsities, the large first layer (784x300) the sparsest. Han et al.
(2015) report a similar profile for LeNet-300-100 (92% / 91% / 74%).

  python -m jaxprune train --config configs/lenet300_global.py
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 3000
  config.prune.method = "magnitude"
  config.prune.scope = "global"
  config.prune.schedule = "agp"
  config.prune.sparsity = 0.95
  return config
