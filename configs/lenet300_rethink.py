"""LeNet-300-100 on mnist5k: prune 90% in one shot and fine-tune, then train from scratch.

"Rethinking the value of network pruning" (Liu et al. 2019) asks whether the weights a
pruned model inherits matter, or only its architecture. After the usual one-shot
magnitude prune at step 1000 and fine-tuning to step 3000, a second phase re-initialises
the network (seed ``rethink.seed``) and trains it for another ``train.steps`` steps with
the final masks fixed (for unstructured masks the "architecture" is the mask). The
report shows both accuracies side by side.

  python -m jaxprune train --config configs/lenet300_rethink.py --config.train.workdir=runs/rethink
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
  config.rethink.enabled = True
  config.rethink.steps = 0  # as many steps as the pruned run (Scratch-E)
  config.rethink.seed = 1
  return config
