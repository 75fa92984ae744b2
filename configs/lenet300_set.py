"""LeNet-300-100 on mnist5k trained sparse from scratch with SET (Mocanu et al. 2018), 90%.

Every layer is 90% sparse (ERK: the small output layer denser) from step 0; every 100
steps until step 2250 (75% of training) each layer drops the fraction f_t of its active
weights with the smallest |w| (f_t = 0.3 / 2 * (1 + cos(pi t / 2250))) and regrows as
many at random, at zero.

  python -m jaxprune train --config configs/lenet300_set.py [--config.prune.sparsity=0.95]
"""

from jaxprune.train.config import dynamic_sparse_config


def get_config():
  return dynamic_sparse_config("set")
