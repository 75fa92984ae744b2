"""APoZ channel pruning (Hu et al. 2016) of a small conv-BN net on the 8x8 digits.

Train dense for 1000 steps, count how often each channel's ReLU output is zero over a
validation slice of the training set (every position of every image: the Average
Percentage of Zeros), remove the 40% of each conv-BN-ReLU block's channels with the
highest APoZ from the filter, the BatchNorm and the next layer's input, fine-tune.

  python -m jaxprune train --config configs/apoz.py --config.train.workdir=runs/apoz
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
  config.prune.method = "apoz"
  config.prune.schedule = "one_shot"
  config.prune.begin = 1000
  config.prune.layers = r"^features/\d+$"  # the conv-BN-ReLU blocks
  config.prune.sparsity = 0.4
  config.sensitivity.examples = 500  # the validation slice APoZ is counted over
  return config
