"""LeNet-300-100 on mnist5k: lottery tickets with rewinding (Frankle & Carbin 2019; 2020), 90%.

Train dense for 1000 steps, then 3 rounds 1000 steps apart: prune by magnitude the same
fraction of the remaining weights each round (54%, 78%, 90%; ERK over the layers, the
output layer denser), reset the survivors to their values at step 20 (rewinding;
``prune.rewind=0`` is the original: the initial weights) with the optimizer state of that
step, and retrain. The rewind point is in the optimizer state, so checkpoints carry it.
Then the control: the final masks on new random weights (``rethink.seed``), trained 1000
steps from scratch; the report puts both accuracies side by side.

  python -m jaxprune train --config configs/lenet300_lottery.py --config.train.workdir=runs/lottery
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.name = "mnist5k"
  config.model.name = "lenet300"
  config.train.steps = 4000
  config.train.learning_rate = 1e-3
  p = config.prune
  p.method = "magnitude"
  p.schedule = "lottery"
  p.sparsity = 0.9
  p.distribution = "erk"
  p.rounds = 3
  p.begin = 1000  # the dense training; then a round every (steps - begin) // rounds steps
  p.every = (config.train.get_ref("steps") - p.get_ref("begin")) // p.get_ref("rounds")
  p.rewind = p.get_ref("begin") // 50  # step 20: 2% of the dense training
  config.rethink.enabled = True  # the random re-init of the final masks
  config.rethink.steps = p.get_ref("begin")
  config.rethink.seed = 1
  return config
