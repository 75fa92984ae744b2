"""One-shot pruning of a Hugging Face checkpoint: the config form of ``jaxprune prune --checkpoint``.

Each field is the flag of the same name (``_`` for ``-``; see ``jaxprune prune --help``),
checked as the flag is; ``None`` is a flag not given. This one prunes the tiny Llama 3
test checkpoint with Wanda to 50% (``sparsity`` unset: its default), calibrated on the
test text:

  jaxprune prune --config configs/hf_prune.py
  jaxprune prune --config configs/hf_prune.py --config.method=sparsegpt --config.structure=2:4 \
    --config.out=runs/llama3_sparsegpt_2_4

For a real model set ``checkpoint`` (a directory with config.json, the safetensors and
tokenizer.json), ``text`` and ``out``, and e.g. ``dtype="bfloat16"``, ``seq_len=2048``.
"""

import pathlib

from jaxprune.train import hf_prune

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"


def get_config():
  config = hf_prune.default_config()
  config.update(
    checkpoint=str(FIXTURES / "llama3"),
    text=str(FIXTURES / "calibration.txt"),
    method="wanda",
    out="runs/llama3_wanda_50",
    seq_len=16,
    calibration=8,
  )
  return config
