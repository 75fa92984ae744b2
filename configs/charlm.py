"""A character-level transformer LM on CPython's help texts (pydoc_data.topics), dense.

The model for post-training pruning (`jaxprune prune --config configs/charlm_wanda.py`,
charlm_sparsegpt.py, charlm_magnitude.py read this run's checkpoint): 4 pre-norm blocks
of width 128, 4 query heads sharing 2 key/value heads (rotary positions), gated MLP of
384, RMSNorm, untied head; 0.8M params; sequences of 64 characters, batch 32, Adam with
warm-up and cosine decay. Validation perplexity is reported at every evaluation.

  jaxprune train --config configs/charlm.py --config.train.workdir=runs/charlm
"""

from jaxprune.train import config as config_lib


def get_config():
  config = config_lib.default_config()
  config.data.update(name="pydoc_topics", seq_len=64, batch_size=32, eval_batch_size=128)
  config.model.update(name="charlm", dim=128, depth=4, heads=4, kv_heads=2, mlp_dim=384)
  config.train.update(
    steps=1200,
    learning_rate=3e-3,
    lr_schedule="cosine",
    warmup_steps=100,
    eval_every=300,
    log_every=50,
    workdir="runs/charlm",
  )
  config.prune.method = "none"
  config.checkpoint.every = 300
  return config
