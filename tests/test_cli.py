import pathlib
import subprocess
import sys

import pytest

from jaxprune import cli
from jaxprune.train import config as config_lib
from jaxprune.train import hf_prune

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
  for command, expected in (("eval", "--workdir DIR"), ("report", "WORKDIR")):
    with pytest.raises(SystemExit) as e:
      cli.main([command, "--help"])
    assert e.value.code == 0 and expected in capsys.readouterr().out


def test_a_command_is_required(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([])
  assert e.value.code == 2


RECIPES = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(path):
  raw = config_lib.read_config(path)
  if hf_prune.is_config(raw):  # `jaxprune prune --config`: the flag form's arguments
    args = cli.build_parser().parse_args(["prune", *hf_prune.config_arguments(raw)])
    assert hf_prune.check_arguments(args) is None and args.checkpoint
    return
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
  ("data.name=cifar_ten", "data.name", "must be one of 'digits', 'mnist5k', 'pydoc_topics' or a TFDS"),
  ("data.augment=mixup", "data.augment", "must be one of 'none', 'flip_crop'"),
  ("data.download=perhaps", "data.download", "cannot set 'perhaps'"),
  ("model.width=0", "model.width", "must be a number > 0"),
  ("model.width=2", "model.width", "lenet300 has fixed layer widths"),
  ("train.optimizer=rmsprop", "train.optimizer", "must be one of 'adam', 'sgd'"),
  ("train.lr_schedule=step", "train.lr_schedule", "must be one of 'constant', 'cosine'"),
  ("train.warmup_steps=-1", "train.warmup_steps", "must be an integer >= 0"),
  ("prune.structure=rows", "prune.structure", "must be one of 'unstructured', 'neurons'"),
  ("checkpoint.every=0", "checkpoint.every", "must be an integer >= 1"),
  ("checkpoint.keep=0", "checkpoint.keep", "must be an integer >= 1"),
  ("parallel.devices=64", "parallel.devices", "asks for 64 devices"),
  ("rethink.steps=-2", "rethink.steps", "must be an integer >= 0"),
  ("data.batch_size=0", "data.batch_size", "must be an integer >= 1"),
  ("model.name=vgg", "model.name", "must be one of 'charlm', 'lenet300', 'lenet5', 'resnet20'"),
  ("train.learning_rate=0", "train.learning_rate", "must be a number > 0"),
  ("train.progress=maybe", "train.progress", "cannot set 'maybe'"),
  ("train.learning_rate=1e999", "train.learning_rate", "must be a number > 0, got inf"),
  ("regularize.strength=1e999", "regularize.strength", "must be a number >= 0, got inf"),
])  # fmt: skip
def test_bad_overrides_name_the_field(capsys, override, field, message):
  status, out, err = run_main(capsys, f"--config.{override}")
  assert status == 2 and out == ""
  assert err.startswith(f"jaxprune train: error: {field}: ")
  assert message in err


RIGL = str(ROOT / "configs" / "lenet300_rigl.py")


@pytest.mark.parametrize("overrides, field, message", [
  (["prune.end=50", "prune.every=100"], "prune.every", "with prune.every = 100 they never move"),
  (["prune.drop_fraction=0.0"], "prune.drop_fraction", "must be in (0, 1]"),
  (["prune.distribution='uniform'", "prune.sparsity=0.9999"], "prune.sparsity",
   "uniform(0.9999) leaves no weight in 1 layer(s): 'fc3/kernel' (shape (100, 10)"),
  (["prune.method='magnitude'", "prune.schedule='constant'", "prune.sparsity=0.99995"],
   "prune.sparsity", "erk(0.99995) leaves no weight in 1 layer(s): 'fc3/kernel'"),
])  # fmt: skip
def test_sparse_training_hyperparameters_are_checked_in_the_config(overrides, field, message):
  """The library's checks of rigl / set / erk fire through the config, before any data."""
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config(RIGL, ["data.name=digits", *overrides])
  assert str(e.value).startswith(f"{field}: ") and message in str(e.value)


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


def test_rethinking_needs_pruning(capsys):
  status, _, err = run_main(capsys, "--config.prune.method=none", "--config.rethink.enabled=true")
  assert status == 2 and "rethink.enabled: needs a pruned run" in err


def test_iterative_last_round_must_fit():
  path = ROOT / "configs" / "lenet300_iterative.py"
  with pytest.raises(config_lib.ConfigError, match=r"prune\.rounds: the last pruning step is 5000"):
    config_lib.load_config(path, ["prune.rounds=9"])


def test_eval_and_report_subcommands(tmp_path, capsys):
  workdir = tmp_path / "run"
  args = ["--config.data.name=digits", "--config.train.steps=12", "--config.train.eval_every=6",
          "--config.train.progress=false", "--config.checkpoint.every=6",
          f"--config.train.workdir={workdir}"]  # fmt: skip
  assert cli.main(["train", "--config", AGP, *args]) == 0
  out = capsys.readouterr().out
  assert "final accuracy: " in out and f"report: {workdir}/report.md" in out
  final = out.split("final accuracy: ")[1].split("\n")[0]

  assert cli.main(["eval", "--workdir", str(workdir)]) == 0
  out = capsys.readouterr().out
  assert "checkpoint: train step 12" in out and f"test accuracy: {final}" in out
  assert "fc1/kernel  64x300   19,200  17,280    90.00%" in out
  assert cli.main(["eval", "--config", AGP, *args, "--step", "6"]) == 0
  assert "checkpoint: train step 6" in capsys.readouterr().out

  (workdir / "report.md").unlink()
  assert cli.main(["report", str(workdir)]) == 0
  assert capsys.readouterr().out.strip() == f"{workdir}/report.md"
  assert "## Per-layer sparsity" in (workdir / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
  (["report", "{tmp}"], "metrics.csv is missing"),
  (["eval", "--workdir", "{tmp}"], "config.json is missing"),
  (["eval", "--config", AGP, "--config.data.name=digits"], "checkpoint.dir: no checkpoints"),
  (["eval", "--config", AGP, "--config.checkpoint.dir={tmp}/ckpt"], "No checkpoint in"),
  (["eval", "--workdir", "{tmp}", "--config.train.steps=3"], "go with --config FILE"),
])  # fmt: skip
def test_eval_and_report_errors(tmp_path, capsys, argv, message):
  (tmp_path / "summary.json").write_text("{}")
  with pytest.raises(SystemExit) as e:
    cli.main([a.format(tmp=tmp_path) for a in argv])
  assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "sensitivity", "shrink"])
@pytest.mark.parametrize("override, field, message", [
  ("prune.overrides={'fc9': 0.5}", "prune.overrides", "'fc9' matches none of the pruned params"),
  ("prune.overrides={'fc(': 0.5}", "prune.overrides['fc(']", "not a valid regular expression"),
  ("regularize.where='('", "regularize.where", "not a valid regular expression"),
  ("data.batch_size=2000", "data.batch_size", "larger than the training split of digits (1500"),
])  # fmt: skip
def test_config_errors_come_before_any_data(monkeypatch, capsys, command, override, field, message):
  """Today's code raised the override and batch-size errors only after loading the data."""
  from jaxprune.train import data

  def no_data(*args, **kwargs):
    raise AssertionError("data loaded before the config was validated")

  monkeypatch.setattr(data, "load", no_data)
  argv = [command, "--config", AGP, "--config.data.name=digits", f"--config.{override}"]
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert err.startswith(f"jaxprune {command}: error: {field}: ") and message in err


@pytest.mark.parametrize("overrides, field, message", [
  (["regularize.method='group_lasso'", "regularize.strength=0.1", "regularize.where='conv'"],
   "regularize.where", "where='conv' selects none"),
  (["regularize.method='l1'", "regularize.strength=0.1"], "regularize.method", "selects none"),
])  # fmt: skip
def test_regularizer_patterns_are_checked_against_the_model(overrides, field, message):
  with pytest.raises(config_lib.ConfigError, match=rf"^{field}: .*{message}"):
    config_lib.load_config(AGP, ["data.name=digits", *overrides])


def test_apoz_layers_must_name_a_layer():
  path = ROOT / "configs" / "apoz.py"
  with pytest.raises(
    config_lib.ConfigError, match=r"prune\.layers: 'fc9' matches none of the layers"
  ):
    config_lib.load_config(path, ["prune.layers=fc9"])
  with pytest.raises(config_lib.ConfigError, match=r"prune\.layers: '\[' is not a valid regular"):
    config_lib.load_config(path, ["prune.layers=["])


@pytest.mark.parametrize("argv, message", [
  (["eval", "--config", AGP, "--step", "-1"], "--step must be a checkpoint step >= 0, got -1"),
  (["shrink", "--config", AGP, "--multiple-of", "0"], "--multiple-of must be >= 1, got 0"),
])  # fmt: skip
def test_bad_command_arguments(capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err


AUTOPRUNER = str(ROOT / "configs" / "autopruner.py")


@pytest.mark.parametrize("override, field, message", [
  ("autopruner.keep_ratio=0", "autopruner.keep_ratio", "must be in (0, 1]"),
  ("autopruner.widths=(16, 0)", "autopruner.widths", "must be a tuple of channel counts"),
  ("autopruner.alpha_mode=cubic", "autopruner.alpha_mode", "must be one of 'linear'"),
  ("autopruner.alpha_start=0", "autopruner.alpha_start", "geometric alpha needs a start > 0"),
  ("regularize.method=l1", "regularize.method", "autopruner's gates are its regularizer"),
  ("data.batch_size=2000", "data.batch_size", "larger than the training split of digits"),
])  # fmt: skip
def test_autopruner_config_errors_come_before_any_data(
  monkeypatch, capsys, override, field, message
):
  from jaxprune.train import data

  monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data loaded"))
  with pytest.raises(SystemExit) as e:
    cli.main(["train", "--config", AUTOPRUNER, f"--config.{override}"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith(f"jaxprune train: error: {field}: ")
  assert message in err


def test_autopruner_has_its_own_runner(capsys):
  assert cli.main(["train", "--config", AUTOPRUNER, "--dry-run"]) == 0
  assert "method: autopruner" in capsys.readouterr().out
  from jaxprune.train import run

  with pytest.raises(config_lib.ConfigError, match=r"^prune\.method: 'autopruner' trains its own"):
    run.Run(config_lib.load_config(AUTOPRUNER))


def test_every_field_has_one_schema_entry():
  from jaxprune.train import schema

  config = config_lib.default_config()
  assert sorted(config) == sorted(schema.FIELDS)
  for group, fields in schema.FIELDS.items():
    assert sorted(config[group]) == sorted(fields)
    for name, field in fields.items():
      assert field.help and field.check(config[group][name]) is None, f"{group}.{name}"


def test_the_command_line_starts_without_plotting_or_sparse_export_libraries():
  # Every `jaxprune ...` process pays its imports: matplotlib (0.6 s) only when a report
  # draws, jax.experimental.sparse (0.4 s, with scipy.sparse) only on export.
  code = (
    "import sys, jaxprune.cli; "
    "print(sorted({'matplotlib', 'jax.experimental.sparse', 'scipy.sparse'} & set(sys.modules)))"
  )
  ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert ran.stdout.strip() == "[]", ran.stdout + ran.stderr
