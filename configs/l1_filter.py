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

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "digits"
  config.data.batch_size = 64
  config.model.name = "vgg_small"
  config.train.steps = 1500
  config.train.learning_rate = 3e-3
  config.train.eval_every = 250
  config.prune.method = "l1_filter"
  config.prune.schedule = "one_shot"
  config.prune.begin = 1000
  config.prune.ratios = "sensitivity"  # "uniform": prune.sparsity of every group
  config.prune.sparsity = 0.5
  config.sensitivity.grid = (0.0, 0.25, 0.5, 0.75)
  config.sensitivity.max_drop = 0.01
  config.sensitivity.examples = 500
  return config
