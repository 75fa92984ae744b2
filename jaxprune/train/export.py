"""``jaxprune export``: a finished run's checkpoint as a compact file, with its sizes.

Restores a checkpoint (the newest by default), takes the masks from its optimizer state
(:func:`jaxprune.masks_of`; without ``jaxprune.masked``, the exact zeros), writes
``export.jxp`` (float32 values), ``export-int8.jxp`` (int8 weight matrices and
kernels) and ``export-shared{4,5,6}.jxp`` (k-means weight sharing, 4 / 5 / 6-bit
indices) with :func:`jaxprune.export.save`, loads them back, and measures the test
accuracy of the loaded models: the size table says what a file costs and what it
computes.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune
from jaxprune import export as export_lib
from jaxprune import fileio
from jaxprune.export import file as file_lib
from jaxprune.table import markdown_table
from jaxprune.train import config as config_lib
from jaxprune.train import data, errors
from jaxprune.train import sharding as sharding_lib
from jaxprune.train import state as state_lib
from jaxprune.train.config_type import Config

FLOAT_FILE = "export.jxp"
INT8_FILE = "export-int8.jxp"
SHARED_BITS = (4, 5, 6)  # weight sharing: Deep Compression used 5 bits for FC layers


def shared_file(bits: int) -> str:
  return f"export-shared{bits}.jxp"


def shared_name(bits: int) -> str:
  return f"jaxprune shared {bits}-bit"


REPORT_NAME = "export.md"


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What ``jaxprune export`` measured.

  Attributes:
    phase, step: the checkpoint's.
    sizes: bytes of the params: ``dense float32``, ``.npz + gzip``, ``jaxprune float32``,
      ``jaxprune int8`` (:func:`jaxprune.export.sizes`) and ``jaxprune shared B-bit``
      for B in :data:`SHARED_BITS`.
    accuracy: test accuracy of the checkpoint's masked model and of each loaded file
      (``masked``, ``jaxprune float32``, ``jaxprune int8``, ``jaxprune shared B-bit``).
    out_dir: where the files were written (``None``: not written).
  """

  phase: str
  step: int
  sizes: dict[str, int]
  accuracy: dict[str, float]
  out_dir: pathlib.Path | None

  def table(self) -> str:
    dense = self.sizes["dense float32"]
    rows = []
    for name, size in self.sizes.items():
      acc = self.accuracy.get(name, self.accuracy["masked"] if name != "dense float32" else None)
      rows.append((name, f"{size:,}", f"{dense / size:.1f}x", "" if acc is None else f"{acc:.2%}"))
    return markdown_table(("params", "bytes", "smaller than dense", "test accuracy"), rows)

  def report(self) -> str:
    lines = [f"checkpoint: {self.phase} step {self.step}", "", self.table(), ""]
    if self.out_dir is None:
      lines.append("not saved: the run has no train.workdir; pass --out DIR")
    else:
      files = [FLOAT_FILE, INT8_FILE, *(shared_file(b) for b in SHARED_BITS)]
      lines.append("saved: " + ", ".join(str(self.out_dir / f) for f in files))
    return "\n".join(lines)


def _accuracy(model: nnx.Module, split: data.Source, batch_size: int) -> float:
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, images):
    m = nnx.merge(graphdef, state)
    m.eval()
    return jnp.argmax(m(images), -1)

  correct = total = 0
  for images, labels, valid in data.eval_batches(split, batch_size):
    preds = np.asarray(predict(state, jnp.asarray(images)))
    correct += int((preds == labels)[valid].sum())
    total += int(valid.sum())
  return correct / total


def export_checkpoint(
  config: Config,
  *,
  step: int | None = None,
  out: str | pathlib.Path | None = None,
  dataset: data.Dataset | None = None,
) -> ExportResult:
  """Writes checkpoint ``step`` (default: the newest) of a run as compact files.

  Args:
    config: the run's config (as ``jaxprune eval`` takes it).
    step: the checkpoint's step.
    out: where to write ``export.jxp``, ``export-int8.jxp``, ``export-sharedB.jxp`` and
      ``export.md``
      (default: the run's ``train.workdir``; nothing is written without either).
    dataset: use this dataset instead of loading ``config.data``.

  Raises:
    ConfigError: when the config names no checkpoint directory.
    FileNotFoundError: when the directory holds no (such) checkpoint.
  """
  config_lib.validate_config(config)
  errors.check_out_dir(out, "out")
  state_lib.require_checkpoints(config, "export", step)
  ds = dataset or data.from_config(config.data)
  restored = state_lib.restore(config, ds.image_shape, ds.num_classes, step=step, purpose="export")
  state, meta = restored.state, restored.meta
  params_state, rest = sharding_lib.to_host((state.params, state.rest))
  is_masked = lambda x: isinstance(x, jaxprune.MaskedState)  # noqa: E731
  masks = None
  if any(is_masked(s) for s in jax.tree.leaves(state.opt_state, is_leaf=is_masked)):
    masks = sharding_lib.to_host(jaxprune.masks_of(state.opt_state))
    params_state = jaxprune.apply_mask(params_state, masks)
    masks = nnx.to_pure_dict(masks)
  params = nnx.to_pure_dict(params_state)
  blobs = {  # each file encoded once: its length is its size in the table
    "jaxprune float32": export_lib.to_bytes(params, masks),
    "jaxprune int8": export_lib.to_bytes(params, masks, quantize="int8"),
  }
  for bits in SHARED_BITS:
    blobs[shared_name(bits)] = export_lib.to_bytes(params, masks, quantize="shared", bits=bits)
  sizes = {**file_lib.baseline_sizes(params), **{k: len(b) for k, b in blobs.items()}}

  def accuracy_of(pure: dict) -> float:
    p = jax.tree.map(lambda x: x, params_state)
    nnx.replace_by_pure_dict(p, jax.tree.map(jnp.asarray, pure))
    return _accuracy(nnx.merge(restored.graphdef, p, rest), ds.test, config.data.eval_batch_size)

  accuracy = {"masked": accuracy_of(params)}
  accuracy.update({name: accuracy_of(export_lib.from_bytes(b)) for name, b in blobs.items()})
  out_dir = (
    pathlib.Path(out)
    if out
    else (pathlib.Path(config.train.workdir) if config.train.workdir else None)
  )
  result = ExportResult(meta["phase"], meta["step"], sizes, accuracy, out_dir)
  if out_dir is not None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_bytes(out_dir / FLOAT_FILE, blobs["jaxprune float32"])
    fileio.write_bytes(out_dir / INT8_FILE, blobs["jaxprune int8"])
    for bits in SHARED_BITS:
      fileio.write_bytes(out_dir / shared_file(bits), blobs[shared_name(bits)])
    fileio.write_text(out_dir / REPORT_NAME, result.report() + "\n")
  return result
