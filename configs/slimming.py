"""Network Slimming (Liu et al. 2017) of a small conv-BN net on the 8x8 digits.

Train with the proximal L1 penalty on every BatchNorm scale (gamma), which drives the
scales of unneeded channels to zero; at step 1000 remove half of the channels, smallest
``|gamma|`` first, from the conv filter, the BatchNorm and the next layer's input, then
fine-tune without the penalty. ``prune.scope="global"`` is the paper's single threshold
over the whole net; here ``"layer"`` removes half of each layer, because in a stack of
three conv-BN layers the scales of a whole layer shrink together and one threshold
strips the first layer almost bare.

  python -m jaxprune train --config configs/slimming.py --config.train.workdir=runs/slim
"""

from jaxprune.train.config import digits_convnet_config


def get_config():
  config = digits_convnet_config()  # vgg_small on digits, 1,500 steps, prune at 1,000
  config.regularize.method = "l1"  # default where: the BatchNorm scales
  config.regularize.strength = 1e-3  # with Adam: the shrinkage of |gamma| per step
  config.prune.method = "slimming"
  config.prune.scope = "layer"
  config.prune.sparsity = 0.5
  return config
