"""The structured LM recipe (train.lm_structured) end to end at a tiny size, from the CLI."""

import json
import re

import numpy as np
import pytest

from jaxprune import cli
from jaxprune.train import config as config_lib
from jaxprune.train import lm_structured

TINY = {
  "model.dim": 16,
  "model.depth": 2,
  "model.heads": 4,
  "model.kv_heads": 2,
  "model.mlp_dim": 32,
  "data.seq_len": 16,
  "data.batch_size": 8,
  "data.eval_batch_size": 256,
  "train.steps": 4,
  "train.warmup_steps": 1,
  "train.eval_every": 4,
  "checkpoint.every": 4,
  "train.progress": False,
  "posttrain.calibration": 8,
  "posttrain.finetune_steps": 3,
  "posttrain.latency_rounds": 2,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny char LM trained from the CLI (shared by both methods): ``(workdir, args)``."""
  workdir = tmp_path_factory.mktemp("charlm") / "run"
  args = [f"--config.{k}={v}" for k, v in TINY.items()] + [f"--config.train.workdir={workdir}"]
  assert cli.main(["train", "--config", "configs/charlm.py", *args]) == 0
  return workdir, args


@pytest.mark.parametrize("method", lm_structured.METHODS)
def test_train_then_structured_prune_from_the_command_line(trained, capsys, method):
  workdir, args = trained
  capsys.readouterr()
  config = ["--config", "configs/charlm_structured.py", f"--config.posttrain.method={method}"]
  assert cli.main(["prune", *config, *args]) == 0
  out = capsys.readouterr().out
  # 2 blocks x 2 query-head slots (one query head of each of the 2 KV groups): 25% is
  # one slot, 2 query heads of 8; 25% of 2 x 32 neurons is 16.
  assert f"{method}: removed 2 of 8 query heads" in out
  assert "16 of 64 MLP neurons" in out
  assert re.search(r"\| val\. perplexity \| \d+\.\d{3} \| \d+\.\d{3} \| \d+\.\d{3} \|", out)
  assert re.search(r"batch 32: speed-up \d+\.\d\dx / FLOP reduction", out)
  saved = json.loads((workdir / f"{method}_structured" / "structured.json").read_text())
  heads = [k for _, k in saved["heads"]]
  assert sorted(heads) == [2, 4] and saved["kv_heads"] == [2, 2]
  assert sum(k for _, k in saved["neurons"]) == 48
  assert saved["params"]["small"] < saved["params"]["dense"]
  assert saved["flop_reduction"] > 1
  assert saved["max_error"] <= 1e-5
  ppl = saved["perplexity"]
  assert all(np.isfinite(v) and v > 1 for v in ppl.values())
  npz = np.load(workdir / f"{method}_structured" / "shrunk.npz")
  assert npz["blocks/0/mlp/up_proj/kernel"].shape[0] == 16


def test_structured_methods_need_the_language_model():
  config = config_lib.load_config(
    "configs/charlm_structured.py", ["model.name='lenet300'", "data.name='digits'"]
  )
  with pytest.raises(config_lib.ConfigError, match=r"^model\.name: .* charlm"):
    lm_structured.prune_structured(config)
