"""Structured pruning of the character LM of configs/charlm.py: a smaller, faster model.

Reads the newest checkpoint of the charlm run (train.workdir, runs/charlm), scores heads
and MLP neurons with FLAP (posttrain.method="flap": Var(X_j) * ||W[j, :]||^2 on 128
calibration sequences; "taylor": |w * g|), removes 25% of the query heads and 25% of the
MLP neurons, ranked over all blocks, shrinks the model (an ordinary CharLM with per-block
widths), fine-tunes it for 100 Adam steps, and reports validation perplexity dense /
pruned / pruned + fine-tuned, params, FLOPs and CPU latency per token (batch 1 and 32)
next to the dense model; writes runs/charlm/flap_structured/structured.md:

  jaxprune train --config configs/charlm.py
  jaxprune prune --config configs/charlm_structured.py

Heads: the LM has 4 query heads sharing 2 KV heads per block, so a block can only lose
query heads in steps of one per KV group (2 of its 4); the KV heads stay. 25% of the 16
query heads is 4: two blocks, chosen by the global ranking, keep one query head per KV
group. (With model.heads=8 the steps are finer: train that model first.)
"""

import pathlib

from jaxprune.train import config as config_lib


def get_config():
  config = config_lib.load_config(pathlib.Path(__file__).with_name("charlm.py"))
  config.posttrain.update(
    method="flap",
    heads=0.25,
    neurons=0.25,
    calibration=128,
    finetune_steps=100,
    finetune_learning_rate=1e-3,
    latency_rounds=20,
  )
  return config
