"""The sparse-training recipes end to end: ``python -m jaxprune train`` in a subprocess."""

import json
import pathlib
import subprocess
import sys

import numpy as np

import jaxprune
from jaxprune.distributions import layer_sparsities
from jaxprune.train import data, evaluate
from jaxprune.train import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# LeNet-300-100 on the 8x8 digits
SHAPES = {"fc1/kernel": (64, 300), "fc2/kernel": (300, 100), "fc3/kernel": (100, 10)}


def erk_zeros(sparsity: float) -> dict[str, int]:
  """Each layer's pruned count under ERK: ``round(s_l * n_l)``."""
  got = layer_sparsities("erk", sparsity, SHAPES)
  return {p: round(s * SHAPES[p][0] * SHAPES[p][1]) for p, s in got.items()}


def train(config: str, workdir: pathlib.Path, *overrides: str) -> tuple[str, dict]:
  command = [
    sys.executable, "-m", "jaxprune", "train", "--config", str(ROOT / "configs" / config),
    "--config.data.name=digits", "--config.train.progress=False",
    f"--config.train.workdir={workdir}", *overrides,
  ]  # fmt: skip
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "final accuracy: " in done.stdout and (workdir / "report.md").is_file()
  return done.stdout, json.loads((workdir / "summary.json").read_text())


def train_many(
  config: str, runs: list[tuple[pathlib.Path, tuple[str, ...]]]
) -> tuple[str, list[dict]]:
  """:func:`train` for several ``(workdir, overrides)`` in one subprocess (one jax start):
  ``jaxprune train`` through ``cli.main``, once per run; returns the joined stdout."""
  argvs = [
    ["train", "--config", str(ROOT / "configs" / config), "--config.data.name=digits",
     "--config.train.progress=False", f"--config.train.workdir={workdir}", *overrides]
    for workdir, overrides in runs
  ]  # fmt: skip
  script = "import json, sys\nfrom jaxprune import cli\nfor argv in json.loads(sys.argv[1]):\n"
  script += "  assert cli.main(argv) == 0, argv\n"
  done = subprocess.run(
    [sys.executable, "-c", script, json.dumps(argvs)], cwd=ROOT, capture_output=True,
    text=True, timeout=900,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  summaries = []
  for workdir, _ in runs:
    assert (workdir / "report.md").is_file()
    summaries.append(json.loads((workdir / "summary.json").read_text()))
  assert done.stdout.count("final accuracy: ") == len(runs)
  return done.stdout, summaries


def test_rigl_recipe_keeps_each_layer_exactly_at_its_erk_sparsity(tmp_path):
  # 90% and 98% (fc1 keeps 2.2%, fc3 12.6%), both runs in one process (one jax start)
  sparsities = (0.9, 0.98)
  args = ("--config.train.steps=30", "--config.train.eval_every=30", "--config.prune.every=10",
          "--config.prune.end=25")  # fmt: skip
  runs = [(tmp_path / f"s{s}", (*args, f"--config.prune.sparsity={s}")) for s in sparsities]
  out, summaries = train_many("lenet300_rigl.py", runs)
  digits = data.load("digits")
  for sparsity, (workdir, _), summary in zip(sparsities, runs, summaries):
    line = f"pruning: rigl sparse training at {sparsity:.0%} (erk) from step 0, masks moved"
    assert f"{line} every 10" in out
    assert summary["steps"] == 30 and summary["final_accuracy"] is not None
    # The masks hold exactly each layer's ERK count ...
    expected = erk_zeros(sparsity)
    config = evaluate.config_from_workdir(workdir)
    restored = state_lib.restore(config, digits.image_shape, digits.num_classes)
    masks = jaxprune.masks_of(restored.state.opt_state)
    for path, zeros in expected.items():
      layer, _ = path.split("/")
      assert int((~np.asarray(masks[layer]["kernel"])).sum()) == zeros, (sparsity, path)
    # ... pruned weights are exactly 0; a weight grown at 0 that got no gradient since (a
    # dead input or unit) is 0 too, so the summary's zero count can only be higher.
    weights = np.load(workdir / "params.npz")
    for row in summary["layers"]:
      layer = row["path"].split("/")[0]
      kernel, mask = weights[f"params/{row['path']}"], np.asarray(masks[layer]["kernel"])
      assert not kernel[~mask].any() and row["zeros"] == int((kernel == 0).sum())
      assert row["zeros"] - expected[row["path"]] <= 0.05 * mask.sum(), row  # a few


def test_lottery_recipe_prunes_in_rounds_and_trains_the_random_reinit(tmp_path):
  out, summary = train(
    "lenet300_lottery.py", tmp_path, "--config.train.steps=16", "--config.train.eval_every=8",
    "--config.prune.begin=4", "--config.rethink.steps=4",
  )  # fmt: skip
  assert "lottery (3 rounds from 4, rewinding to step 0) to 90% (erk)" in out
  assert "then its final masks from a random re-init" in out
  assert summary["dense_step"] == 4  # the accuracy before the first round
  expected = erk_zeros(0.9)
  assert {r["path"]: r["zeros"] for r in summary["layers"]} == expected
  assert {r["path"]: r["zeros"] for r in summary["rethink"]["layers"]} == expected
  assert summary["rethink"]["steps"] == 4 and summary["rethink"]["final_accuracy"] is not None
