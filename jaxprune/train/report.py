"""The markdown report of a run, with its plots, written from the run's files only.

A finished run leaves in its workdir ``config.json``, ``metrics.csv`` and
``summary.json`` (accuracies, per-layer zeros). :func:`write_report` turns them into
``report.md`` with three PNG files next to it (Agg, no display needed):

* ``accuracy_vs_sparsity.png``: test accuracy against the measured sparsity at each
  evaluation, in training order (and the from-scratch run, if any);
* ``layer_sparsity.png``: one bar per pruned layer;
* ``training_curves.png``: loss, accuracies and sparsity over the steps.

``jaxprune report WORKDIR`` regenerates it, e.g. after editing the plots' code.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

from jaxprune import fileio
from jaxprune.masks import LeafStats, Summary
from jaxprune.train import metrics as metrics_lib
from jaxprune.train.errors import RunFileError

if TYPE_CHECKING:
  from matplotlib.figure import Figure

SUMMARY_NAME, REPORT_NAME = "summary.json", "report.md"
PLOTS = {
  "accuracy_vs_sparsity": "accuracy_vs_sparsity.png",
  "layer_sparsity": "layer_sparsity.png",
  "training_curves": "training_curves.png",
}
RETHINK_NOTE = (
  "**From scratch** follows Liu et al. (2019), *Rethinking the Value of Network "
  "Pruning*: the pruned network is re-initialised (seed {seed}) and trained for {steps} "
  "steps. The masks here are {structure}, so the pruned architecture is the same masks, "
  "kept fixed during training, on new random weights; only the pruning criterion's "
  "choice of *which* weights survive is carried over, not their values."
)


def _rows(summary: Summary) -> list[dict[str, Any]]:
  return [
    {"path": r.path, "shape": list(r.shape), "size": r.size, "zeros": r.zeros} for r in summary.rows
  ]


def summary_from_rows(rows: list[dict[str, Any]]) -> Summary:
  """The :class:`jaxprune.Summary` of ``summary.json`` layer rows."""
  return Summary(
    tuple(LeafStats(r["path"], tuple(r["shape"]), r["size"], r["zeros"]) for r in rows)
  )


def write_summary(workdir: str | pathlib.Path, config: Any, result: Any) -> pathlib.Path:
  """Writes ``summary.json``: the numbers of a :class:`~jaxprune.train.loop.TrainResult`."""
  p = config.prune
  out = {
    "model": config.model.name,
    "data": config.data.name,
    "steps": config.train.steps,
    "pruning": "none"
    if p.method == "none"
    else f"{p.method} ({p.scope}, {p.structure}), {p.schedule} to {p.sparsity:.0%}",
    "dense_accuracy": result.dense_accuracy,
    "dense_step": result.dense_step,
    "final_accuracy": result.final_accuracy,
    "layers": _rows(result.summary),
    "rethink": None,
    "seconds": result.seconds,
    "resumed_from": result.resumed_from,
  }
  if result.rethink is not None:
    out["rethink"] = {
      "final_accuracy": result.rethink.final_accuracy,
      "steps": config.rethink.steps or config.train.steps,
      "seed": config.rethink.seed,
      "structure": p.structure,
      "layers": _rows(result.rethink.summary),
    }
  path = pathlib.Path(workdir) / SUMMARY_NAME
  fileio.write_json(path, out, indent=2)
  return path


def _figure(width: float, height: float) -> Figure:
  # matplotlib on first use: 0.6 s of every CLI start (train, prune, eval) that plots nothing
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def plot_accuracy_vs_sparsity(records: list[dict[str, Any]], path: pathlib.Path) -> None:
  """Test accuracy against measured sparsity, one line per phase, in training order."""
  fig = _figure(5, 3.5)
  ax = fig.add_subplot()
  labels = {"train": "prune + fine-tune", "rethink": "from scratch"}
  for phase, label in labels.items():
    evals = [r for r in records if r["phase"] == phase and r["test_accuracy"] is not None]
    if not evals:
      continue
    xs = [100 * r["sparsity"] for r in evals]
    ys = [100 * r["test_accuracy"] for r in evals]
    ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.annotate(f"step {evals[-1]['step']}", (xs[-1], ys[-1]), fontsize=7)
  ax.set_xlabel("sparsity of the pruned layers (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("accuracy vs sparsity over training")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fileio.save_figure(fig, path, dpi=100)


def plot_layer_sparsity(summary: Summary, path: pathlib.Path) -> None:
  """A horizontal bar per layer: its final sparsity."""
  fig = _figure(6, 0.6 + 0.28 * max(1, len(summary.rows)))
  ax = fig.add_subplot()
  names = [r.path.removesuffix("/kernel") for r in summary.rows]
  ax.barh(range(len(names)), [100 * r.sparsity for r in summary.rows], color="C0")
  ax.set_yticks(range(len(names)), names, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlim(0, 100)
  ax.set_xlabel("sparsity (%)")
  ax.set_title(f"per-layer sparsity (total {summary.sparsity:.1%})")
  fileio.save_figure(fig, path, dpi=100)


def plot_training_curves(records: list[dict[str, Any]], path: pathlib.Path) -> None:
  """Loss, train and test accuracy and sparsity against the global step, per phase."""
  fig = _figure(7, 3.2)
  loss_ax, acc_ax = fig.subplots(1, 2)
  for phase, style in (("train", "-"), ("rethink", ":")):
    logged = [r for r in records if r["phase"] == phase and r["loss"] is not None]
    evals = [r for r in records if r["phase"] == phase and r["test_accuracy"] is not None]
    if not logged:
      continue
    suffix = "" if phase == "train" else " (from scratch)"
    steps = [r["global_step"] for r in logged]
    loss_ax.plot(steps, [r["loss"] for r in logged], style, color="C3", label="loss" + suffix)
    acc_ax.plot(
      steps, [100 * r["train_accuracy"] for r in logged], style, color="C0", alpha=0.6,
      label="train acc." + suffix,
    )  # fmt: skip
    acc_ax.plot(
      [r["global_step"] for r in evals], [100 * r["test_accuracy"] for r in evals], style,
      color="C1", marker="o", markersize=3, label="test acc." + suffix,
    )  # fmt: skip
    acc_ax.plot(
      steps, [100 * r["sparsity"] for r in logged], "--", color="C2",
      label="sparsity" if phase == "train" else None,
    )  # fmt: skip
    if phase == "rethink":
      for ax in (loss_ax, acc_ax):
        ax.axvline(logged[0]["global_step"] - logged[0]["step"], color="gray", lw=0.8)
  loss_ax.set_ylabel("training loss")
  acc_ax.set_ylabel("%")
  acc_ax.legend(fontsize=7)
  for ax in (loss_ax, acc_ax):
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fileio.save_figure(fig, path, dpi=100)


def _pct(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2%}"


def markdown_table(summary: Summary) -> str:
  """The per-layer sparsity table in markdown."""
  lines = ["| param | shape | size | zeros | sparsity |", "|---|---|--:|--:|--:|"]
  for r in summary.rows:
    shape = "x".join(map(str, r.shape))
    lines.append(f"| `{r.path}` | {shape} | {r.size:,} | {r.zeros:,} | {r.sparsity:.2%} |")
  lines.append(f"| **total** | | {summary.size:,} | {summary.zeros:,} | {summary.sparsity:.2%} |")
  return "\n".join(lines)


def write_report(workdir: str | pathlib.Path) -> pathlib.Path:
  """Writes ``report.md`` and its plots from a workdir's ``summary.json`` and metrics.

  Args:
    workdir: the ``train.workdir`` of a finished run.

  Returns:
    The path of ``report.md``.

  Raises:
    FileNotFoundError: when the workdir lacks ``summary.json`` or ``metrics.csv``
      (the run has not finished).
    RunFileError: when one of them is damaged (cut short); the message names it.
  """
  workdir = pathlib.Path(workdir)
  for name in (SUMMARY_NAME, metrics_lib.CSV_NAME):
    if not (workdir / name).is_file():
      raise FileNotFoundError(
        f"{workdir / name} is missing: not the workdir of a finished `jaxprune train` run."
      )
  try:
    info = json.loads((workdir / SUMMARY_NAME).read_text())
    summary = summary_from_rows(info["layers"])
  except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
    raise RunFileError(f"{workdir / SUMMARY_NAME}: damaged or cut short ({e!r}).") from e
  try:
    records = metrics_lib.read_csv(workdir)
  except (ValueError, KeyError, TypeError) as e:
    raise RunFileError(f"{workdir / metrics_lib.CSV_NAME}: damaged or cut short ({e!r}).") from e
  plot_accuracy_vs_sparsity(records, workdir / PLOTS["accuracy_vs_sparsity"])
  plot_layer_sparsity(summary, workdir / PLOTS["layer_sparsity"])
  plot_training_curves(records, workdir / PLOTS["training_curves"])

  dense_step = info["dense_step"]
  rows = [
    "| model | test accuracy | sparsity |",
    "|---|--:|--:|",
    f"| dense (step {dense_step}) | {_pct(info['dense_accuracy'])} | 0.00% |",
    f"| pruned + fine-tuned (step {info['steps']}) | {_pct(info['final_accuracy'])} "
    f"| {summary.sparsity:.2%} |",
  ]
  rethink = info.get("rethink")
  if rethink is not None:
    scratch = summary_from_rows(rethink["layers"])
    rows.append(
      f"| pruned architecture from scratch ({rethink['steps']} steps) "
      f"| {_pct(rethink['final_accuracy'])} | {scratch.sparsity:.2%} |"
    )
  lines = [
    f"# {info['model']} on {info['data']}",
    "",
    f"Pruning: {info['pruning']}; {info['steps']} training steps"
    + (f"; resumed from step {info['resumed_from']}" if info.get("resumed_from") else "")
    + ".",
    "",
    "## Results",
    "",
    *rows,
    "",
  ]
  if rethink is not None:
    structure = "unstructured" if rethink["structure"] == "unstructured" else "structured"
    note = RETHINK_NOTE.format(seed=rethink["seed"], steps=rethink["steps"], structure=structure)
    lines += [note, ""]
  lines += [
    "## Per-layer sparsity",
    "",
    markdown_table(summary),
    "",
    f"![per-layer sparsity]({PLOTS['layer_sparsity']})",
    "",
    "## Over training",
    "",
    f"![accuracy vs sparsity]({PLOTS['accuracy_vs_sparsity']})",
    "",
    f"![training curves]({PLOTS['training_curves']})",
    "",
    "Metrics per step: `metrics.csv`; TensorBoard: `tensorboard --logdir "
    f"{workdir / metrics_lib.EVENTS_DIR}`.",
    "",
  ]
  path = workdir / REPORT_NAME
  fileio.write_text(path, "\n".join(lines))
  return path
