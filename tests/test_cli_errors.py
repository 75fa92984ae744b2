"""The CLI on broken runs: one line on stderr naming the file or argument, status 2, nothing created.

A damaged checkpoint (cut in half, or with flipped bytes), a cut ``config.json``, a
workdir without checkpoints, a missing workdir and an ``--out`` that is a file each
used to end in a traceback (146 lines of tensorstore, a JSONDecodeError, orbax's
"cannot schedule new futures after interpreter shutdown" after the error line, a
FileExistsError after the whole export), and ``prune`` created the missing workdir.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from jaxprune import cli
from jaxprune.train import data
from jaxprune.train.errors import RunFileError

ROOT = pathlib.Path(__file__).resolve().parents[1]
AGP = str(ROOT / "configs" / "lenet300_agp.py")
LOTTERY = str(ROOT / "configs" / "lenet300_lottery.py")
ARGS = [
  "--config.data.name=digits", "--config.train.steps=4", "--config.train.eval_every=4",
  "--config.train.progress=false", "--config.checkpoint.every=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """LeNet-300-100 on digits, 4 AGP steps, checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("broken") / "run"
  assert cli.main(["train", "--config", AGP, *ARGS, f"--config.train.workdir={workdir}"]) == 0
  return workdir


def files(root: pathlib.Path) -> set[str]:
  return {str(p.relative_to(root)) for p in root.rglob("*")}


def damaged(run: pathlib.Path, tmp_path: pathlib.Path, how: str) -> pathlib.Path:
  """A copy of the run whose newest checkpoint (step 4) is cut in half or has flipped bytes.

  ``cut``: every file of the checkpoint loses its second half (orbax's JSON metadata
  first); ``flip``: every 7th byte of the second half of each array data file
  (tensorstore's compressed chunks) is flipped, the metadata left whole.
  """
  copy = tmp_path / f"run_{how}"
  shutil.copytree(run, copy)
  for f in sorted((copy / "checkpoints" / "4").rglob("*")):
    if not f.is_file():
      continue
    raw = bytearray(f.read_bytes())
    if how == "cut":
      f.write_bytes(bytes(raw[: len(raw) // 2]))
    elif f.parent.name == "d" and len(raw) > 64:
      for i in range(len(raw) // 2, len(raw), 7):
        raw[i] ^= 0x5A
      f.write_bytes(bytes(raw))
  return copy


def call(capsys, *argv):
  """``jaxprune ARGV`` in this process: (status, stdout, stderr); an exception escapes."""
  try:
    status = cli.main(list(argv))
  except SystemExit as e:
    status = e.code
  out = capsys.readouterr()
  return status, out.out, out.err


def assert_one_line(status, err, *names):
  assert status == 2
  assert err.count("\n") == 1 and err.endswith("\n"), err
  assert "Traceback" not in err
  for name in names:
    assert str(name) in err, err


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # orbax's leftovers
@pytest.mark.parametrize("command, how", [
  ("eval", "cut"), ("export", "flip"), ("shrink", "cut"), ("prune", "flip"), ("train", "cut"),
])  # fmt: skip
def test_a_damaged_checkpoint_is_one_line_naming_it(run, tmp_path, capsys, command, how):
  broken = damaged(run, tmp_path, how)
  before = files(tmp_path)
  if command == "prune":
    argv = ["prune", "--config", AGP, *ARGS, f"--config.train.workdir={broken}",
            "--config.posttrain.method=magnitude", "--config.posttrain.layers=^fc",
            "--config.posttrain.sequential=False"]  # fmt: skip
  elif command == "train":  # resuming from the damaged checkpoint
    argv = ["train", "--config", AGP, *ARGS, f"--config.train.workdir={broken}"]
  else:
    argv = [command, "--workdir", str(broken)]
  status, out, err = call(capsys, *argv)
  assert_one_line(status, err, f"jaxprune {command}: error: {broken / 'checkpoints' / '4'}: ")
  assert "checkpoint of step 4 cannot be read" in err
  assert command == "train" or out == ""  # train prints what it will do, then resumes
  assert files(tmp_path) == before  # nothing written, into the run or beside it

  with pytest.raises(RunFileError, match="checkpoint of step 4 cannot be read"):
    cli.main([*argv, "--debug"])  # --debug: the exception with its traceback


def test_no_traceback_after_the_error_line(run, tmp_path):
  """Orbax's abandoned reads of the damaged arrays (from tensorstore's threads and at
  interpreter exit), and its cleanup thread in a workdir without checkpoints, printed
  tracebacks after the error line."""
  broken = damaged(run, tmp_path, "flip")
  empty = tmp_path / "no_checkpoints"
  empty.mkdir()
  shutil.copy(run / "config.json", empty / "config.json")
  before = files(tmp_path)
  script = (
    "import sys; from jaxprune import cli\n"
    "for workdir in sys.argv[1:]:\n"
    "  try:\n"
    "    cli.main(['export', '--workdir', workdir])\n"
    "  except SystemExit as e:\n"
    "    print(f'status {e.code}', flush=True)\n"
  )
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = subprocess.run(
    [sys.executable, "-c", script, str(empty), str(broken)],
    capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
  )  # fmt: skip
  assert result.stdout == "status 2\nstatus 2\n", result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 2 and "Traceback" not in result.stderr, result.stderr
  assert lines[0] == (
    f"jaxprune export: error: No checkpoint in {empty / 'checkpoints'}: there is no such directory."
  )
  assert lines[1].startswith(f"jaxprune export: error: {broken / 'checkpoints' / '4'}: ")
  assert files(tmp_path) == before  # the empty workdir got no checkpoints/ either


def test_a_cut_config_json_is_one_line_naming_it(run, tmp_path, capsys):
  copy = tmp_path / "run"
  copy.mkdir()
  text = (run / "config.json").read_text()
  (copy / "config.json").write_text(text[: len(text) // 2])
  status, _, err = call(capsys, "eval", "--workdir", str(copy))
  assert_one_line(status, err, f"jaxprune eval: error: {copy / 'config.json'}: not valid JSON")
  (copy / "config.json").write_text("[1, 2]")
  status, _, err = call(capsys, "shrink", "--workdir", str(copy))
  assert_one_line(status, err, f"{copy / 'config.json'}: not the config of a `jaxprune train` run")
  assert files(copy) == {"config.json"}


def test_prune_of_a_missing_workdir_creates_nothing(tmp_path, capsys):
  missing = tmp_path / "MISSING"
  status, _, err = call(capsys, "prune", "--config", str(ROOT / "configs" / "charlm_wanda.py"),
                        f"--config.train.workdir={missing}")  # fmt: skip
  assert_one_line(status, err, f"No checkpoint in {missing / 'checkpoints'}")
  assert not missing.exists()


@pytest.mark.parametrize("command", ["export", "shrink", "sensitivity"])
def test_out_that_is_a_file_fails_before_any_work(run, tmp_path, capsys, monkeypatch, command):
  monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data loaded before --out"))
  existing = tmp_path / "export.md"
  existing.write_text("")
  source = ["--config", AGP, *ARGS] if command == "sensitivity" else ["--workdir", str(run)]
  for out in (existing, existing / "sub"):
    status, _, err = call(capsys, command, *source, "--out", str(out))
    assert_one_line(status, err, f"jaxprune {command}: error: --out {out}: {existing} is a file")
  assert files(tmp_path) == {"export.md"}


def test_a_field_that_cannot_be_computed_names_the_field_it_follows(capsys):
  """The lottery recipe's prune.every divides by prune.rounds: rounds=0 was a
  ZeroDivisionError from inside ml_collections."""
  status, out, err = call(
    capsys, "train", "--config", LOTTERY, "--config.prune.rounds=0", "--dry-run"
  )
  assert_one_line(status, err, "jaxprune train: error: prune.rounds: must be an integer >= 1")
  assert out == ""


def test_report_of_a_cut_summary_is_one_line_naming_it(run, tmp_path, capsys):
  copy = tmp_path / "run"
  shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
  text = (copy / "summary.json").read_text()
  (copy / "summary.json").write_text(text[: len(text) // 2])
  before = {p: p.stat().st_mtime_ns for p in copy.iterdir()}
  status, _, err = call(capsys, "report", str(copy))
  assert_one_line(status, err, f"jaxprune report: error: {copy / 'summary.json'}: damaged")
  assert {p: p.stat().st_mtime_ns for p in copy.iterdir()} == before


def test_depth_pruning_checks_its_output_folder_before_any_work(tmp_path, capsys, monkeypatch):
  """posttrain.method=shortgpt with posttrain.out a file: one line, before the checkpoint
  is looked for or data loaded (as the other prune recipes)."""
  monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("data loaded before the check"))
  existing = tmp_path / "depth.md"
  existing.write_text("")
  status, _, err = call(
    capsys,
    "prune",
    "--config",
    str(ROOT / "configs" / "charlm.py"),
    "--config.posttrain.method=shortgpt",
    "--config.posttrain.drop_blocks=1",
    f"--config.posttrain.out={existing}",
    f"--config.train.workdir={tmp_path / 'missing'}",
  )
  assert_one_line(status, err, f"jaxprune prune: error: posttrain.out {existing}: ")
  assert files(tmp_path) == {"depth.md"}
