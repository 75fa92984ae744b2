"""``jaxprune shrink``: a pruned run's checkpoint -> a smaller model, measured and saved."""

import json
import pathlib
import re

import numpy as np
import pytest

from jaxprune import cli
from jaxprune.train import data
from jaxprune.train import shrink as shrink_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
AGP = str(ROOT / "configs" / "lenet300_agp.py")


def call(capsys, *argv):
  try:
    status = cli.main(list(argv))
  except SystemExit as e:
    status = e.code
  out = capsys.readouterr()
  return status, out.out, out.err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """LeNet-300-100 on digits, 50% of the hidden neurons pruned by step 8 (AGP from step
  4); the classifier is left dense. Checkpoints at steps 3 (before pruning), 6, 9, 12."""
  workdir = tmp_path_factory.mktemp("shrink") / "run"
  args = [
    "--config.data.name=digits", "--config.train.steps=12", "--config.train.eval_every=12",
    "--config.train.progress=false", "--config.checkpoint.every=3",
    "--config.checkpoint.keep=5", "--config.prune.structure=neurons",
    "--config.prune.sparsity=0.5", "--config.prune.dense_last=True",
    f"--config.train.workdir={workdir}",
  ]  # fmt: skip
  assert cli.main(["train", "--config", AGP, *args]) == 0
  return workdir, args


def test_shrink_a_run_by_its_workdir(run, capsys):
  workdir, _ = run
  final = (workdir / "summary.json").read_text()
  status, out, _ = call(capsys, "shrink", "--workdir", str(workdir))
  assert status == 0, out
  assert "checkpoint: train step 12" in out
  assert "fc1/kernel: 300 -> 150 channels" in out and "fc2/kernel: 100 -> 50 channels" in out
  assert "fc3/kernel: 10 -> 10 channels (blocked: the model output)" in out
  assert "| params | 50,610 | 17,810 | 0.35x |" in out
  assert re.search(r"\| FLOPs per image \(XLA\) \| [\d.]+ k \| [\d.]+ k \| 0\.3\dx \|", out)
  masked, shrunk = re.search(r"\| test accuracy \| ([\d.]+)% \| ([\d.]+)% \|", out).groups()
  assert masked == shrunk
  assert "predictions: identical on 297 of 297 test images" in out
  assert f"{json.loads(final)['final_accuracy']:.2%}" == f"{masked}%"

  info = json.loads((workdir / shrink_lib.SHRUNK_JSON).read_text())
  assert info["widths"]["fc1"] == {"in_features": 64, "out_features": 150}
  assert info["checkpoint"] == {"phase": "train", "step": 12}
  assert out.strip().endswith(f"{workdir / shrink_lib.REPORT_NAME} (this report)")
  assert "| saved .npz |" in (workdir / shrink_lib.REPORT_NAME).read_text()

  # Rebuilt from the files alone, the small model scores what the masked one did.
  model = shrink_lib.load_shrunk(workdir)
  assert (model.fc1.out_features, model.fc2.in_features, model.fc2.out_features) == (150, 150, 50)
  test = data.load("digits").test
  images, labels = test.take(np.arange(len(test)))
  accuracy = float(np.mean(np.argmax(np.asarray(model(images)), -1) == labels))
  assert f"{accuracy:.2%}" == f"{masked}%"


def test_a_checkpoint_without_structured_zeros_has_nothing_to_remove(run, capsys, tmp_path):
  _, args = run
  status, out, _ = call(
    capsys, "shrink", "--config", AGP, *args, "--step", "3", "--out", str(tmp_path)
  )
  assert status == 0
  assert "checkpoint: train step 3" in out and "nothing to remove: no channel" in out
  assert "fc1/kernel: 300 -> 300 channels" in out and "| params | 50,610 | 50,610 | 1.00x |" in out
  assert (tmp_path / shrink_lib.SHRUNK_NPZ).is_file()


def test_keep_protects_a_layer_from_the_python_api(run, tmp_path):
  workdir, _ = run
  from jaxprune.train import evaluate

  config = evaluate.config_from_workdir(workdir)
  result = shrink_lib.shrink_checkpoint(config, step=9, keep="fc2", out=tmp_path)
  assert result.step == 9 and result.out_dir == tmp_path
  assert result.model.fc1.out_features == 150 and result.model.fc2.out_features == 100
  assert result.masked.accuracy == result.small.accuracy and result.agree == result.total


@pytest.mark.parametrize("argv, message", [
  (["--workdir", "{run}", "--step", "7"], "No checkpoint of step 7 in "),
  (["--workdir", "{run}", "--step", "7"], "checkpoints are of steps 3, 6, 9, 12."),
  (["--workdir", "{tmp}"], "config.json is missing"),
  (["--config", AGP, "--config.data.name=digits"], "checkpoint.dir: no checkpoints to shrink"),
  (["--config", AGP, "--config.checkpoint.dir={tmp}/ckpt"], "No checkpoint in"),
  (["--workdir", "{run}", "--multiple-of", "0"], "--multiple-of must be >= 1"),
])  # fmt: skip
def test_shrink_errors(run, tmp_path, capsys, argv, message):
  argv = [a.format(run=run[0], tmp=tmp_path) for a in argv]
  status, _, err = call(capsys, "shrink", *argv)
  assert status == 2 and message in err


def test_load_shrunk_needs_the_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="shrunk.json is missing"):
    shrink_lib.load_shrunk(tmp_path)


def test_help(capsys):
  status, out, _ = call(capsys, "shrink", "--help")
  assert status == 0
  for flag in ("--workdir DIR", "--config FILE", "--step STEP", "--out DIR", "--keep REGEX"):
    assert flag in out
