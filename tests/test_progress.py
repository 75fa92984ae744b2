import io

import numpy as np
import pytest
import tqdm

from jaxprune import analysis, progress
from jaxprune.train import config as config_lib
from jaxprune.train import loop


class Terminal(io.StringIO):
  def isatty(self):
    return True


def _count(stream, total, every=progress.EVERY, postfix=False):
  with progress.bar(total=total, desc="train", unit="step", file=stream, every=every) as b:
    for i in range(total):
      if postfix:
        b.set_postfix({"loss": f"{1 / (i + 1):.4f}"}, refresh=False)
      b.update()
  return stream.getvalue()


def test_a_file_gets_a_plain_line_every_few_percent():
  text = _count(io.StringIO(), 5000, postfix=True)
  lines = text.splitlines()
  assert "\r" not in text
  assert len(lines) == 100 // 5 + 1  # 0%, 5%, ..., 100%
  assert lines[-1].startswith("train: 100% 5000/5000 [") and "loss=0.0002" in lines[-1]
  assert "|" not in text  # no bar drawn with block characters


def test_a_terminal_keeps_the_tqdm_bar():
  text = _count(Terminal(), 300)
  assert isinstance(progress.bar(total=1, file=Terminal()), tqdm.tqdm)
  assert text.count("\r") > 1  # redrawn in place


def test_line_bar_details():
  log = io.StringIO()
  with progress.bar(total=200, initial=100, desc="resumed", file=log, every=10) as b:
    for _ in range(50):
      b.update()
  lines = log.getvalue().splitlines()  # stopped at 75%: 50%, 60%, 70% and the end
  assert [line.split()[1] for line in lines] == ["50%", "60%", "70%", "75%"]
  log = io.StringIO()
  with progress.bar(total=None, desc="open", file=log, every=10) as b:
    for _ in range(25):
      b.update()
  assert len(log.getvalue().splitlines()) == 4  # every 10 updates, and the end
  assert progress.bar(total=10, file=io.StringIO(), disable=True).disable
  with pytest.raises(ValueError, match="every must be a percentage > 0"):
    progress.bar(total=10, file=io.StringIO(), every=0)


def test_training_to_a_log_writes_no_redraws(capsys):
  config = config_lib.default_config()
  config.data.name, config.train.steps = "digits", 200
  config.train.update(log_every=1, eval_every=100)
  loop.train(config)
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = [line for line in err.splitlines() if line.startswith("lenet300 on digits:")]
  assert 2 <= len(lines) <= 100 // progress.EVERY + 2
  assert "200/200" in lines[-1] and "loss=" in lines[-1]


def test_sensitivity_sweep_to_a_log_writes_no_redraws(capsys):
  params = {"a": {"kernel": np.ones((4, 4))}, "b": {"kernel": np.ones((4, 4))}}
  analysis.sensitivity(params, lambda p: 1.0, np.linspace(0, 0.9, 10))
  err = capsys.readouterr().err
  assert "\r" not in err and err.splitlines()[-1].startswith("sensitivity: 100% 20/20")
