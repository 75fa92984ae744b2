import pathlib
import subprocess
import sys

import pytest

from jaxprune import cli
from jaxprune.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
AGP = str(ROOT / "configs" / "lenet300_agp.py")


def run_main(capsys, *args):
  try:
    status = cli.main(["train", "--config", AGP, *args])
  except SystemExit as e:
    status = e.code
  out = capsys.readouterr()
  return status, out.out, out.err


def test_help(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  assert "train" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--config FILE" in out and "--config.FIELD=VALUE" in out and "--dry-run" in out


def test_a_command_is_required(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([])
  assert e.value.code == 2


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(path):
  config = config_lib.load_config(path)
  assert config.train.steps > 0


def test_overrides_apply_and_propagate(capsys):
  status, out, _ = run_main(
    capsys,
    "--config.train.steps=90",
    "--config.data.name", "digits",
    "--config.prune.overrides={'fc3': 0.5}",
    "--config.train.progress=false",
    "--config.prune.sparsity=0.8",
    "--dry-run",
  )  # fmt: skip
  assert status == 0
  assert "steps: 90" in out and "name: digits" in out and "fc3: 0.5" in out
  assert "progress: false" in out and "sparsity: 0.8" in out
  assert "end: 60" in out and "begin: 30" in out  # follow train.steps


def test_load_config_overrides():
  config = config_lib.load_config(
    AGP, ["prune.overrides.fc2=0.3", "train.learning_rate=1", "model.name='lenet5'"]
  )
  assert dict(config.prune.overrides) == {"fc2": 0.3}
  assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
  assert config.model.name == "lenet5"


@pytest.mark.parametrize("override, field, message", [
  ("train.stpes=3", "train.stpes", "unknown config field (did you mean 'steps'?)"),
  ("trian.steps=3", "trian", "unknown config field (did you mean 'train'?)"),
  ("train.steps.x=3", "train.steps", "is a value, not a group"),
  ("data.foo.bar=1", "data.foo", "unknown config field"),
  ("train.steps=2.5", "train.steps", "cannot set '2.5'"),
  ("train.steps=abc", "train.steps", "cannot set 'abc'"),
  ("train.steps", "train.steps", "no value given"),
  ("train.steps=-5", "train.steps", "must be an integer >= 1, got -5"),
  ("train.steps=0", "train.steps", "must be an integer >= 1"),
  ("prune.sparsity=1.5", "prune.sparsity", "must be in [0, 1)"),
  ("prune.sparsity=1", "prune.sparsity", "must be in [0, 1)"),
  ("prune.method=l0", "prune.method", "must be one of 'magnitude'"),
  ("prune.scope=net", "prune.scope", "must be one of 'layer', 'global'"),
  ("prune.schedule=cubic", "prune.schedule", "must be one of 'agp'"),
  ("prune.end=5", "prune.end", "must not come before prune.begin (1000)"),
  ("prune.end=3000", "prune.end", "training stops before step train.steps = 3000"),
  ("prune.overrides={'fc3': 1.0}", "prune.overrides['fc3']", "must be in [0, 1)"),
  ("data.name=cifar10", "data.name", "must be one of 'digits', 'mnist5k'"),
  ("data.batch_size=0", "data.batch_size", "must be an integer >= 1"),
  ("model.name=vgg", "model.name", "must be one of 'lenet300', 'lenet5'"),
  ("train.learning_rate=0", "train.learning_rate", "must be a number > 0"),
  ("train.progress=maybe", "train.progress", "cannot set 'maybe'"),
])  # fmt: skip
def test_bad_overrides_name_the_field(capsys, override, field, message):
  status, out, err = run_main(capsys, f"--config.{override}")
  assert status == 2 and out == ""
  assert err.startswith(f"jaxprune train: error: {field}: ")
  assert message in err


def test_unknown_field_in_a_config_file(tmp_path, capsys):
  path = tmp_path / "typo.py"
  path.write_text(
    "from jaxprune.train.config import default_config\n"
    "def get_config():\n"
    "  config = default_config()\n"
    "  config.prune.sparstiy = 0.5\n"
    "  return config\n"
  )
  with pytest.raises(config_lib.ConfigError, match=r"prune\.sparstiy: unknown .*'sparsity'"):
    config_lib.load_config(path)
  assert cli.main(["train", "--config", AGP, "--dry-run"]) == 0
  with pytest.raises(SystemExit):
    cli.main(["train", "--config", str(tmp_path / "missing.py")])
  assert "No config file" in capsys.readouterr().err


def test_iterative_last_round_must_fit():
  path = ROOT / "configs" / "lenet300_iterative.py"
  with pytest.raises(config_lib.ConfigError, match=r"prune\.rounds: the last pruning step is 5000"):
    config_lib.load_config(path, ["prune.rounds=9"])


def test_python_m_jaxprune_trains_end_to_end():
  proc = subprocess.run(
    [sys.executable, "-m", "jaxprune", "train", "--config", AGP,
     "--config.train.steps=60", "--config.train.progress=False"],
    capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "lenet300 on mnist5k, 60 steps" in out
  assert "dense accuracy: " in out and "(step 22)" in out and "final accuracy: " in out
  for line in ("fc1/kernel  784x300  235,200  211,680    90.00%", "total"):
    assert line in out
