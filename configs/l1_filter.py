"""L1-norm filter pruning (Li et al. 2017) of a small conv-BN net on the 8x8 digits.

Train ``vgg_small`` (conv-BN-ReLU 16, pool, 32, pool, 64, average pool, Dense) dense for
1000 steps; at step 1000 sweep each conv's channel group alone (remove 25/50/75% of its
channels, smallest filter L1 norm first, in the filter, the BatchNorm and the next
layer's input) on a validation slice of the training set, give each group the largest
ratio that costs at most 1 point, remove those channels, and fine-tune for 500 steps.
The sweep's table and curves go to ``sensitivity.csv`` / ``sensitivity.png`` of the
workdir; ``jaxprune shrink`` then cuts the smaller model out of the checkpoint.

  python -m jaxprune train --config configs/l1_filter.py --config.train.workdir=runs/l1
  python -m jaxprune sensitivity --config configs/l1_filter.py   # the sweep alone
"""

from jaxprune.train.config import digits_convnet_config


def get_config():
  config = digits_convnet_config()  # vgg_small on digits, 1,500 steps, prune at 1,000
  config.prune.method = "l1_filter"
  config.prune.ratios = "sensitivity"  # "uniform": prune.sparsity of every group
  config.prune.sparsity = 0.5
  config.sensitivity.grid = (0.0, 0.25, 0.5, 0.75)
  config.sensitivity.max_drop = 0.01
  config.sensitivity.examples = 500
  return config
