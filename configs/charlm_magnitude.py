"""One-shot magnitude pruning of the character LM of configs/charlm.py, without retraining.

Reads the newest checkpoint of the charlm run (train.workdir, runs/charlm), calibrates on
128 training sequences, prunes every projection of the transformer blocks (embeddings
and head stay dense) to 50% (posttrain.sparsity) or N:M (posttrain.structure="2:4"),
prints the validation perplexity before and after with the per-layer sparsity, and
saves the pruned checkpoint in runs/charlm/magnitude_<target>:

  jaxprune train --config configs/charlm.py
  jaxprune prune --config configs/charlm_magnitude.py [--config.posttrain.structure=2:4]
"""

import pathlib

from jaxprune.train import config as config_lib


def get_config():
  config = config_lib.load_config(pathlib.Path(__file__).with_name("charlm.py"))
  config.posttrain.update(method="magnitude", sparsity=0.5, structure="unstructured")
  return config
