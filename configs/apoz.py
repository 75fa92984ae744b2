"""APoZ channel pruning (Hu et al. 2016) of a small conv-BN net on the 8x8 digits.

Train dense for 1000 steps, count how often each channel's ReLU output is zero over a
validation slice of the training set (every position of every image: the Average
Percentage of Zeros), remove the 40% of each conv-BN-ReLU block's channels with the
highest APoZ from the filter, the BatchNorm and the next layer's input, fine-tune.

  python -m jaxprune train --config configs/apoz.py --config.train.workdir=runs/apoz
"""

from jaxprune.train.config import digits_convnet_config


def get_config():
  config = digits_convnet_config()  # vgg_small on digits, 1,500 steps, prune at 1,000
  config.prune.method = "apoz"
  config.prune.layers = r"^features/\d+$"  # the conv-BN-ReLU blocks
  config.prune.sparsity = 0.4
  config.sensitivity.examples = 500  # the validation slice APoZ is counted over
  return config
