"""Structured sparsity learning (Wen et al. 2016) of a small conv-BN net on the 8x8 digits.

SGD with the proximal group-lasso step on channel-wise groups: each input channel of the
convs after the first and of the Dense head is one group, ``lambda * sum_g ||w_g||_2``.
Groups reach exact zero during training; a channel that no consumer reads any more is
useless, and at step 1200 every such channel is masked in all its arrays (the producing
filter, its BatchNorm, the consumers' input slices) and the net is fine-tuned without
the penalty. Filter-wise groups are the other classic SSL choice, but a filter in
front of a BatchNorm never reaches zero (BatchNorm undoes its scale, so the loss pulls
the norm back up as fast as the prox shrinks it); the consumers' channel groups have no
such normalisation.

  python -m jaxprune train --config configs/ssl.py --config.train.workdir=runs/ssl
"""

from jaxprune.train.config import digits_convnet_config


def get_config():
  config = digits_convnet_config()  # vgg_small on digits, 1,500 steps
  config.train.optimizer = "sgd"  # the prox step is exact proximal gradient descent
  config.train.learning_rate = 0.02
  config.regularize.method = "group_lasso"
  config.regularize.strength = 0.4
  config.regularize.groups = ("channel",)
  config.regularize.where = r"features/[1-9]\d*/conv/kernel|head/kernel"  # not the pixels
  config.prune.method = "ssl"
  config.prune.begin = 1200
  return config
