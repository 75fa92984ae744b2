"""Training metrics to ``metrics.csv`` and TensorBoard event files, resumable.

Every record is one row: ``phase`` (``train``, or ``rethink`` for the from-scratch
run), the phase's ``step``, the global step across phases, the ``epoch`` (fractional)
and the metrics present (``loss``, ``train_accuracy``, ``test_accuracy``,
``sparsity``, ``target_sparsity``, ``learning_rate``, and for a language model
``test_loss`` and ``test_perplexity``); absent ones are empty cells.
TensorBoard gets ``<phase>/<metric>`` scalars at the global step.

When a run resumes from the checkpoint of global step ``s``, rows after ``s`` (written
after that checkpoint by the run that was killed) are dropped and TensorBoard purges
its events from ``s + 1`` on, so both files read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import math
import pathlib
from typing import Any

from jaxprune import fileio

COLUMNS: tuple[str, ...] = (
  "phase",
  "step",
  "global_step",
  "epoch",
  "loss",
  "train_accuracy",
  "test_accuracy",
  "sparsity",
  "target_sparsity",
  "learning_rate",
  "test_loss",
  "test_perplexity",
)
CSV_NAME = "metrics.csv"
EVENTS_DIR = "tensorboard"


class MetricsWriter:
  """Appends records to ``workdir/metrics.csv`` and ``workdir/tensorboard/``.

  Args:
    workdir: the run's directory (created if missing).
    resume_step: the global step of the checkpoint a run resumes from (``None``: a
      fresh run, which starts a new CSV).
    tensorboard: also write TensorBoard events (tensorboardX).

  Examples:
    >>> import tempfile
    >>> from jaxprune.train import metrics
    >>> workdir = tempfile.mkdtemp()
    >>> with metrics.MetricsWriter(workdir, tensorboard=False) as writer:
    ...   writer.write({"phase": "train", "step": 10, "global_step": 10, "loss": 0.5})
    >>> [(r["step"], r["loss"], r["test_accuracy"]) for r in metrics.read_csv(workdir)]
    [(10, 0.5, None)]
  """

  def __init__(
    self, workdir: str | pathlib.Path, *, resume_step: int | None = None, tensorboard: bool = True
  ):
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    path = self.workdir / CSV_NAME
    kept = []
    if resume_step is not None and path.exists():
      kept = [r for r in read_csv(self.workdir) if r["global_step"] <= resume_step]
    # The header and the rows kept replace the file in one step (a run killed here
    # leaves the old rows); new rows are appended to it.
    with fileio.atomic_write(path, "w", newline="") as f:
      rewrite = csv.DictWriter(f, COLUMNS)
      rewrite.writeheader()
      for row in kept:
        rewrite.writerow({k: "" if v is None else v for k, v in row.items()})
    self._file = open(path, "a", newline="")  # noqa: SIM115 (closed in close())
    self._csv = csv.DictWriter(self._file, COLUMNS)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(str(self.workdir / EVENTS_DIR), purge_step=purge)

  def write(self, record: dict[str, Any]) -> None:
    """Writes one record (keys from :data:`COLUMNS`; ``phase`` and ``global_step`` needed)."""
    unknown = set(record) - set(COLUMNS)
    if unknown:
      raise KeyError(f"Unknown metric columns {sorted(unknown)}; known: {COLUMNS}.")
    self._csv.writerow({k: record.get(k, "") for k in COLUMNS})
    if self._tb is not None:
      for name, value in record.items():
        if name not in ("phase", "step", "global_step", "epoch"):
          self._tb.add_scalar(f"{record['phase']}/{name}", value, record["global_step"])

  def flush(self) -> None:
    """Puts everything written so far on disk (called before each checkpoint)."""
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _value(column: str, text: str) -> Any:
  if text == "":
    return None
  if column == "phase":
    return text
  if column in ("step", "global_step"):
    return int(text)
  value = float(text)
  return None if math.isnan(value) else value


def read_csv(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.csv``, with numbers parsed and ``None`` for blanks.

  A last row without its line end (a run killed while appending it) is left out.
  """
  with open(pathlib.Path(workdir) / CSV_NAME, newline="") as f:
    text = f.read()
  lines = text.splitlines(keepends=True)
  if lines and not lines[-1].endswith(("\n", "\r")):
    lines.pop()
  return [{k: _value(k, row.get(k) or "") for k in COLUMNS} for row in csv.DictReader(lines)]
