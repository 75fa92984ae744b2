"""Post-training pruning over a device mesh: FSDP params, calibration batches split.

Everything is JAX's own SPMD: arrays get a ``NamedSharding`` and the jitted programs are
partitioned by XLA.

* Each linear layer's weight is split over ``param_axis`` along its first **output**
  axis (:attr:`~jaxprune.surgery.linear.Layer.out_axes`, found from the traced
  ``dot_general``, whatever the layout): as the ``[n_in, n_out]`` matrix that Wanda and
  SparseGPT see, each device holds a contiguous range of output columns. Other arrays
  with two or more axes (embeddings) are split along their largest divisible axis;
  vectors (norms, biases) are replicated. A weight whose output axis does not divide by
  the axis size stays whole on every device (a warning names it).
* Calibration batches are split along their leading axis over ``batch_axis``; the
  statistics (``||X_j||^2``, ``X^T X``) are sums over tokens, so XLA all-reduces them
  and they come back replicated.
* Wanda ranks within each output column and SparseGPT's weight update is independent
  per output column given ``H^-1`` (replicated): both run on each device's columns. For
  N:M no collective is needed at all; SparseGPT's unstructured mask, chosen over all
  the columns of a block of ``blocksize`` input rows, gathers that block's scores
  (``[blocksize, n_out]``), never the whole weight.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune import tree as tree_lib
from jaxprune.surgery.linear import Layer


def check_axes(mesh: Mesh, batch_axis: str | None, param_axis: str | None) -> tuple[str, str]:
  """``(batch_axis, param_axis)`` checked against ``mesh``.

  ``batch_axis`` defaults to the mesh's axis when it has exactly one; ``param_axis`` to
  ``batch_axis`` (FSDP: the devices that split the data each hold a slice of every
  weight).

  Raises:
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
    ValueError: an axis that is not one of the mesh's (listing them), or no
      ``batch_axis`` for a mesh of several axes.
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  names = tuple(mesh.axis_names)
  if batch_axis is None:
    if len(names) != 1:
      raise ValueError(
        f"batch_axis: the mesh has axes {names}; name the one that splits the calibration "
        "batches (e.g. batch_axis='data')."
      )
    batch_axis = str(names[0])
  param_axis = batch_axis if param_axis is None else param_axis
  for what, axis in (("batch_axis", batch_axis), ("param_axis", param_axis)):
    if axis not in names:
      raise ValueError(f"{what}={axis!r} is not an axis of the mesh {names}.")
  return batch_axis, param_axis


def leaf_spec(leaf: Any, layer: Layer | str | None, axis: str, size: int) -> PartitionSpec:
  """How one variable is split over a mesh axis of ``size`` devices.

  A linear layer's weight (``layer`` a :class:`Layer`): its first output axis, if
  ``size`` divides it, else replicated. Another array with ``ndim >= 2``: its largest
  axis that ``size`` divides (the later one on equal sizes). Vectors, scalars and
  non-arrays: replicated.

  Examples:
    >>> import numpy as np
    >>> from jaxprune.surgery.linear import Layer
    >>> w = np.zeros((16, 32))  # read as einsum("bi,oi->bo"): inputs on axis 1
    >>> leaf_spec(w, Layer("w", (16, 32), (1,), (), ()), "data", 8)
    P('data', None)
    >>> leaf_spec(np.zeros((12, 64)), None, "data", 8), leaf_spec(np.zeros(64), None, "data", 8)
    (P(None, 'data'), P())
  """
  shape = tuple(getattr(leaf, "shape", ()))
  if size == 1 or len(shape) < 2:
    return PartitionSpec()
  if isinstance(layer, Layer):
    candidates = [layer.out_axes[0]] if layer.out_axes else []
  else:
    candidates = list(range(len(shape)))
  candidates = [a for a in candidates if shape[a] % size == 0]
  if not candidates:
    return PartitionSpec()
  axis_index = max(candidates, key=lambda a: (shape[a], a))
  return PartitionSpec(*(axis if a == axis_index else None for a in range(len(shape))))


def leaf_shardings(
  paths: Sequence[str],
  leaves: Sequence[Any],
  found: Mapping[str, Layer | str],
  mesh: Mesh,
  axis: str,
) -> list[NamedSharding]:
  """A ``NamedSharding`` per leaf by :func:`leaf_spec`; warns naming the linear layers
  left whole because their output axis does not divide by the axis size."""
  size = int(mesh.shape[axis])
  out, whole = [], []
  for path, leaf in zip(paths, leaves):
    layer = found.get(path)
    spec = leaf_spec(leaf, layer, axis, size)
    if isinstance(layer, Layer) and size > 1 and spec == PartitionSpec():
      whole.append(f"{path} {layer.shape} (output axes {layer.out_axes})")
    out.append(NamedSharding(mesh, spec))
  if whole:
    warnings.warn(
      f"Mesh axis {axis!r} has {size} devices, which divides no first output axis of "
      f"{whole}: these weights are kept whole (replicated) on every device.",
      stacklevel=4,
    )
  return out


def check_batch(inputs: tuple, mesh: Mesh, axis: str) -> None:
  """Raises ``ValueError`` unless every input's leading axis splits over ``axis``."""
  size = int(mesh.shape[axis])
  for x in jax.tree.leaves(inputs):
    rows = np.shape(x)[0] if np.ndim(x) else None
    if rows is None or rows % size:
      raise ValueError(
        f"`batches`: a calibration batch of shape {tuple(np.shape(x))} cannot be split along "
        f"its leading axis over mesh axis {axis!r} ({size} devices); give batches whose "
        f"leading size is a multiple of {size}."
      )


def batch_sharding(mesh: Mesh, axis: str) -> NamedSharding:
  """Splits an array's leading (batch) axis over ``axis``."""
  return NamedSharding(mesh, PartitionSpec(axis))


def split_batch(inputs: Any, mesh: Mesh | None, axis: str | None) -> Any:
  """``inputs`` (any pytree) split along their leading axis over ``axis``; unchanged
  without a mesh.

  Raises:
    ValueError: an input whose leading axis does not split (:func:`check_batch`).
  """
  if mesh is None:
    return inputs
  assert axis is not None
  check_batch(inputs, mesh, axis)
  return jax.device_put(inputs, batch_sharding(mesh, axis))


def put_like(tree: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
  """``{path: x}`` of ``tree`` placed on the sharding of ``like[path]`` (a solve's outputs
  on their weights' shardings)."""
  return {p: jax.device_put(x, like[p].sharding) for p, x in tree.items()}


def device_bytes(tree: Any) -> dict[str, int]:
  """``{device: bytes}`` that the arrays of ``tree`` occupy on each device (the sum of
  their addressable shards), to measure how params are spread over a mesh.

  Examples:
    >>> import jax.numpy as jnp
    >>> sum(device_bytes({"w": jnp.zeros((4, 4))}).values())
    64
  """
  out: dict[str, int] = {}
  for _, leaf in tree_lib.leaves_with_paths(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      key = str(shard.device)
      out[key] = out.get(key, 0) + int(shard.data.nbytes)
  return out
