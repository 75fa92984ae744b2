"""``jaxprune export``: a pruned run's checkpoint -> compact files, sizes and accuracy."""

import json
import pathlib
import re

import numpy as np
import pytest

from jaxprune import cli
from jaxprune import export as export_lib
from jaxprune.train import export as export_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAN = str(ROOT / "configs" / "lenet300_han.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """LeNet-300-100 on digits pruned to Han's 92/91/74% by step 10 (AGP from step 4)."""
  workdir = tmp_path_factory.mktemp("export") / "run"
  args = [
    "--config.data.name=digits", "--config.train.steps=12", "--config.train.eval_every=12",
    "--config.train.progress=false", "--config.checkpoint.every=6",
    f"--config.train.workdir={workdir}",
  ]  # fmt: skip
  assert cli.main(["train", "--config", HAN, *args]) == 0
  return workdir


def test_export_a_run_by_its_workdir(run, capsys):
  assert cli.main(["export", "--workdir", str(run)]) == 0
  out = capsys.readouterr().out
  assert "checkpoint: train step 12" in out
  rows = dict(
    re.findall(
      r"\| (dense float32|\.npz \+ gzip|jaxprune float32|jaxprune int8|jaxprune shared \d-bit) "
      r"\| ([\d,]+) \|",
      out,
    )
  )
  sizes = {k: int(v.replace(",", "")) for k, v in rows.items()}
  assert sizes["dense float32"] == 4 * (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
  assert sizes["jaxprune int8"] < sizes["jaxprune float32"] < sizes[".npz + gzip"]
  assert sizes["jaxprune float32"] == (run / export_cli.FLOAT_FILE).stat().st_size
  assert sizes["jaxprune int8"] == (run / export_cli.INT8_FILE).stat().st_size
  for bits in export_cli.SHARED_BITS:
    name = export_cli.shared_name(bits)
    assert sizes[name] == (run / export_cli.shared_file(bits)).stat().st_size
  assert sizes["jaxprune shared 4-bit"] < sizes["jaxprune shared 6-bit"] < sizes["jaxprune int8"]

  final = json.loads((run / "summary.json").read_text())["final_accuracy"]
  found = re.search(r"\| jaxprune float32 \| [\d,]+ \| [\d.]+x \| ([\d.]+)% \|", out)
  assert found is not None
  masked = found.group(1)
  assert masked == f"{final:.2%}"[:-1]  # the loaded float32 file scores what the run did

  params = np.load(run / "params.npz")
  loaded = export_lib.load(run / export_cli.FLOAT_FILE)
  kernel = loaded["fc1"]["kernel"]
  assert kernel.shape == (64, 300) and (kernel == 0).mean() == pytest.approx(0.92, abs=1e-3)
  np.testing.assert_array_equal(params["params/fc1/kernel"], kernel)  # the run's own params


def test_export_names_a_run_without_checkpoints(capsys, tmp_path):
  status = None
  try:
    status = cli.main(["export", "--config", HAN, f"--config.checkpoint.dir={tmp_path}"])
  except SystemExit as e:
    status = e.code
  assert status == 2
  assert "No checkpoint in" in capsys.readouterr().err
