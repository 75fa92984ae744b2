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

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "digits"
  config.data.batch_size = 64
  config.model.name = "vgg_small"
  config.train.steps = 1500
  config.train.optimizer = "sgd"  # the prox step is exact proximal gradient descent
  config.train.learning_rate = 0.02
  config.train.eval_every = 250
  config.regularize.method = "group_lasso"
  config.regularize.strength = 0.4
  config.regularize.groups = ("channel",)
  config.regularize.where = r"features/[1-9]\d*/conv/kernel|head/kernel"  # not the pixels
  config.prune.method = "ssl"
  config.prune.schedule = "one_shot"
  config.prune.begin = 1200
  return config
