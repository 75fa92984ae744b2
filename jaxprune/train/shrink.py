"""Shrinking a pruned run: ``jaxprune shrink``, a smaller model from a checkpoint.

Structured pruning (``prune.structure`` ``neurons`` or ``filters``) leaves whole
channels with zero weights, but the model still computes them. :func:`shrink_checkpoint`
restores a run's checkpoint, applies the masks kept in its optimizer state
(:func:`jaxprune.masks_of`) and hands the model to :func:`jaxprune.surgery.shrink`,
which cuts out every channel whose producers are all zero (folding their constant
output into the next layer's bias) and checks that the smaller model computes what the
masked one does. Groups that reach the model output are never cut, so the classifier
keeps its classes. It then measures both models on the test split:

* params, and the bytes of the float32 params + batch statistics;
* FLOPs per image, from XLA's cost analysis of the compiled forward pass;
* the size of the saved ``.npz``;
* test accuracy, and how many test predictions of the two models agree.

Into the run's workdir (or ``out``) it writes ``shrunk.npz`` (the smaller model's
variables, keyed like ``params.npz``), ``shrunk.json`` (the new layer widths, what was
removed, the numbers) and ``shrink.md`` (the report); :func:`load_shrunk` rebuilds the
smaller model from them.

Examples:
  >>> from jaxprune.train import shrink
  >>> shrink.SHRUNK_NPZ, shrink.SHRUNK_JSON, shrink.REPORT_NAME
  ('shrunk.npz', 'shrunk.json', 'shrink.md')
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune
from jaxprune import fileio, surgery
from jaxprune import tree as tree_lib
from jaxprune.surgery import rebuild
from jaxprune.train import config as config_lib
from jaxprune.train import data, errors, models
from jaxprune.train import sharding as sharding_lib
from jaxprune.train import state as state_lib
from jaxprune.train.config import config_json
from jaxprune.train.config_type import Config

SHRUNK_NPZ, SHRUNK_JSON, REPORT_NAME = "shrunk.npz", "shrunk.json", "shrink.md"


@dataclasses.dataclass(frozen=True)
class Footprint:
  """What one model costs, and how well it does.

  Attributes:
    params: parameter count.
    flops: FLOPs per image of the forward pass (XLA's cost analysis of the compiled
      evaluation batch, divided by its size).
    bytes: bytes of the params and batch statistics in memory (float32).
    npz_bytes: bytes of the variables saved with ``numpy.savez`` (as ``params.npz``).
    accuracy: test accuracy.
  """

  params: int
  flops: float
  bytes: int
  npz_bytes: int
  accuracy: float


@dataclasses.dataclass(frozen=True)
class ShrinkResult:
  """The masked model of a checkpoint and the smaller one that computes the same.

  Attributes:
    phase: the checkpoint's phase (``"train"`` or ``"rethink"``).
    step: the checkpoint's step.
    shrunk: what :func:`jaxprune.surgery.shrink` returned (``.model`` is the small
      ``nnx.Module``, ``.widths`` its new layer sizes, ``.report()`` the groups).
    masked: the numbers of the masked model (the architecture that was trained).
    small: the numbers of the shrunk model.
    agree: test images on which both models predict the same class.
    total: test images.
    out_dir: where the files were written (``None``: not written).
  """

  phase: str
  step: int
  shrunk: surgery.Shrunk
  masked: Footprint
  small: Footprint
  agree: int
  total: int
  out_dir: pathlib.Path | None

  @property
  def model(self) -> nnx.Module:
    """The shrunk ``nnx.Module`` (eval mode)."""
    return self.shrunk.model

  @property
  def removed_any(self) -> bool:
    """Whether any channel was removed."""
    return any(self.shrunk.removed.values())

  def table(self) -> str:
    """The before/after numbers as a markdown table."""
    m, s = self.masked, self.small
    rows = [
      ("params", f"{m.params:,}", f"{s.params:,}", _ratio(s.params, m.params)),
      ("FLOPs per image (XLA)", _count(m.flops), _count(s.flops), _ratio(s.flops, m.flops)),
      ("float32 params + batch stats", _size(m.bytes), _size(s.bytes), _ratio(s.bytes, m.bytes)),
      ("saved .npz", _size(m.npz_bytes), _size(s.npz_bytes), _ratio(s.npz_bytes, m.npz_bytes)),
      ("test accuracy", f"{m.accuracy:.2%}", f"{s.accuracy:.2%}", ""),
    ]
    lines = ["| | masked | shrunk | shrunk / masked |", "|---|---:|---:|---:|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows])

  def report(self) -> str:
    """What ``jaxprune shrink`` prints (and writes to ``shrink.md``)."""
    lines = [f"checkpoint: {self.phase} step {self.step}"]
    if not self.removed_any:
      lines.append(
        "nothing to remove: no channel has all of its producers' weights zero in this "
        "checkpoint (unstructured pruning zeroes single weights; prune.structure=neurons or "
        "filters zeroes whole channels). The shrunk model is the masked model."
      )
    lines += ["channels per group (before -> after):"]
    lines += ["  " + line for line in self.shrunk.report().splitlines()]
    lines += ["", self.table(), ""]
    same = "identical" if self.agree == self.total else "DIFFERENT"
    lines.append(
      f"predictions: {same} on {self.agree:,} of {self.total:,} test images "
      f"(check on random inputs: max |shrunk - masked| = {self.shrunk.max_error:.2g})"
    )
    if self.out_dir is None:
      lines.append("not saved: the run has no train.workdir; pass --out DIR")
    else:
      lines.append(
        f"saved: {self.out_dir / SHRUNK_NPZ} (variables), {self.out_dir / SHRUNK_JSON} "
        f"(widths), {self.out_dir / REPORT_NAME} (this report)"
      )
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
  return f"{a / b:.2f}x" if b else ""


def _count(n: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f}"


def _size(n: int) -> str:
  for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n} B"


def _variables(model: nnx.Module) -> tuple[Any, Any]:
  """The params and the other variables (batch statistics) of ``model``."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return params, rest


def _npz(model: nnx.Module) -> bytes:
  params, rest = _variables(model)
  buffer = io.BytesIO()
  arrays = sharding_lib.flat_arrays({"params": params, "rest": rest})
  # The cast: pyright checks the arrays against savez's `allow_pickle: bool`; passing
  # allow_pickle=False instead would add an array of that name on numpy < 2.1.
  np.savez(buffer, **cast(dict[str, Any], arrays))
  return buffer.getvalue()


def _evaluate(model: nnx.Module, split: data.Source, batch_size: int) -> tuple[float, np.ndarray]:
  """FLOPs per image of the compiled forward pass, and the predicted classes."""
  graphdef, state = nnx.split(model)

  def forward(state, images):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(images)

  compiled, preds = None, []
  for images, _, valid in data.eval_batches(split, batch_size):
    if compiled is None:
      compiled = jax.jit(forward).lower(state, jnp.asarray(images)).compile()
    preds.append(np.argmax(np.asarray(compiled(state, jnp.asarray(images))), -1)[valid])
  if compiled is None:
    raise ValueError("shrink: the test split has no examples to evaluate on.")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  if cost is None:
    raise RuntimeError("shrink: the compiled forward pass has no cost analysis (FLOPs).")
  return float(cost.get("flops", float("nan"))) / batch_size, np.concatenate(preds)


def _footprint(model: nnx.Module, npz: bytes, flops: float, accuracy: float) -> Footprint:
  params, rest = _variables(model)
  n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  nbytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves((params, rest)))
  return Footprint(n, flops, nbytes, len(npz), accuracy)


def shrink_checkpoint(
  config: Config,
  *,
  step: int | None = None,
  out: str | pathlib.Path | None = None,
  keep: tree_lib.Where = (),
  multiple_of: int = 1,
  dataset: data.Dataset | None = None,
) -> ShrinkResult:
  """Removes the pruned channels of checkpoint ``step`` (default: the newest) of a run.

  Args:
    config: the run's config (as ``jaxprune eval`` takes it).
    step: the checkpoint's step.
    out: where to write ``shrunk.npz``, ``shrunk.json`` and ``shrink.md`` (default:
      the run's ``train.workdir``; nothing is written without either).
    keep: layers whose output channels must all stay (regexes over param paths).
    multiple_of: round every new width up to a multiple (e.g. 8 for GPU tensor cores).
    dataset: use this dataset instead of loading ``config.data``.

  Returns:
    A :class:`ShrinkResult`; ``print(result.report())`` shows the numbers.

  Raises:
    ConfigError: when the config names no checkpoint directory.
    FileNotFoundError: when the directory holds no (such) checkpoint.
  """
  config_lib.validate_config(config)
  errors.check_out_dir(out, "out")
  state_lib.require_checkpoints(config, "shrink", step)
  ds = dataset or data.from_config(config.data)
  restored = state_lib.restore(config, ds.image_shape, ds.num_classes, step=step, purpose="shrink")
  graphdef, state, meta = restored.graphdef, restored.state, restored.meta
  params, rest = sharding_lib.to_host((state.params, state.rest))
  masked_states = jax.tree.leaves(
    state.opt_state, is_leaf=lambda x: isinstance(x, jaxprune.MaskedState)
  )
  masks = None  # an optimizer without jaxprune.masked: only exact zeros count
  if any(isinstance(s, jaxprune.MaskedState) for s in masked_states):
    masks = sharding_lib.to_host(jaxprune.masks_of(state.opt_state))
  if masks is not None:
    params = jaxprune.apply_mask(params, masks)
  masked = nnx.merge(graphdef, params, rest)
  masked.eval()
  example = jnp.zeros((1, *ds.image_shape), jnp.float32)
  shrunk = surgery.shrink(
    masked, masks=masks, example_input=example, keep=keep, multiple_of=multiple_of
  )
  small = shrunk.model
  small.eval()

  batch = config.data.eval_batch_size
  labels = np.concatenate([y[v] for _, y, v in data.eval_batches(ds.test, batch)])
  flops_masked, preds_masked = _evaluate(masked, ds.test, batch)
  flops_small, preds_small = _evaluate(small, ds.test, batch)
  npz_masked, npz_small = _npz(masked), _npz(small)
  result = ShrinkResult(
    phase=meta["phase"],
    step=meta["step"],
    shrunk=shrunk,
    masked=_footprint(masked, npz_masked, flops_masked, float(np.mean(preds_masked == labels))),
    small=_footprint(small, npz_small, flops_small, float(np.mean(preds_small == labels))),
    agree=int(np.sum(preds_masked == preds_small)),
    total=len(labels),
    out_dir=pathlib.Path(out or config.train.workdir) if (out or config.train.workdir) else None,
  )
  if result.out_dir is not None and jax.process_index() == 0:
    _write(result.out_dir, result, config, ds, npz_small)
  return result


def _write(
  out: pathlib.Path, result: ShrinkResult, config: Any, ds: data.Dataset, npz: bytes
) -> None:
  out.mkdir(parents=True, exist_ok=True)
  fileio.write_bytes(out / SHRUNK_NPZ, npz)
  info = {
    "model": {"name": config.model.name, "width": config.model.width},
    "input_shape": list(ds.image_shape),
    "num_classes": ds.num_classes,
    "checkpoint": {"phase": result.phase, "step": result.step},
    "widths": result.shrunk.widths,
    "removed": result.shrunk.removed,
    "kept_constant": result.shrunk.kept_constant,
    "why_kept": result.shrunk.why_kept,
    "stayed": result.shrunk.stayed,
    "masked": dataclasses.asdict(result.masked),
    "shrunk": dataclasses.asdict(result.small),
    "agree": result.agree,
    "total": result.total,
    "config": config_json(config),
  }
  fileio.write_json(out / SHRUNK_JSON, info, indent=2)
  fileio.write_text(out / REPORT_NAME, f"# Shrunk model\n\n{result.report()}\n")


def load_shrunk(directory: str | pathlib.Path) -> nnx.Module:
  """Rebuilds the shrunk model that :func:`shrink_checkpoint` saved in ``directory``.

  The model of ``shrunk.json`` is created from shapes only, its variables are replaced
  by those of ``shrunk.npz`` and its layers' sizes set from them (they must match the
  saved widths).

  Returns:
    The smaller ``nnx.Module``, in eval mode.

  Raises:
    FileNotFoundError: when ``shrunk.json`` or ``shrunk.npz`` is missing.
    ValueError: when the files do not fit the model they name.
  """
  directory = pathlib.Path(directory)
  for name in (SHRUNK_JSON, SHRUNK_NPZ):
    if not (directory / name).is_file():
      raise FileNotFoundError(f"{directory / name} is missing: run `jaxprune shrink` first.")
  info = json.loads((directory / SHRUNK_JSON).read_text())
  m = info["model"]
  abstract = nnx.eval_shape(
    lambda: models.create(
      m["name"], tuple(info["input_shape"]), info["num_classes"], width=m["width"]
    )
  )
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  with np.load(directory / SHRUNK_NPZ) as npz:
    arrays = dict(npz)

  def fill(prefix):
    def one(path, leaf):
      key = f"{prefix}/{tree_lib.path_str(path)}"
      if key not in arrays:
        raise ValueError(f"{directory / SHRUNK_NPZ} has no {key!r}: not a {m['name']} model.")
      return jnp.asarray(arrays.pop(key))

    return one

  params = jax.tree_util.tree_map_with_path(fill("params"), params)
  rest = jax.tree_util.tree_map_with_path(fill("rest"), rest)
  if arrays:
    raise ValueError(f"{directory / SHRUNK_NPZ} has arrays {m['name']} lacks: {sorted(arrays)}")
  model = nnx.merge(graphdef, params, rest)
  widths = rebuild.fix_nnx_attributes(model)
  if widths != info["widths"]:
    raise ValueError(
      f"The arrays of {directory / SHRUNK_NPZ} give widths {widths}, but {SHRUNK_JSON} "
      f"says {info['widths']}."
    )
  model.eval()
  return model
