"""Multi-device training: a 1-D ``data`` mesh, batch sharding and (optionally) FSDP params.

Every array of a run gets a ``NamedSharding`` on one mesh with a single axis,
``"data"``:

* batches are split along their first axis (data parallelism; each process feeds its
  own rows with ``jax.make_array_from_process_local_data``);
* params are replicated, or with ``shard_params`` (FSDP-style) each kernel is split
  along its largest axis that the device count divides (:func:`fsdp_spec`);
* everything else in the state follows the same rule by shape, so Adam moments and
  masks, which have their param's shape, shard exactly like their param, and scalars
  (step counts) are replicated.

The jitted step then runs SPMD: XLA inserts the gradient all-reduce (and, with FSDP,
the all-gathers of each kernel where it is used), and global top-k mask selection
runs on the sharded params (counts and comparisons reduce across devices; see
``docs/multi_host.md``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxprune import tree as tree_lib

AXIS = "data"


def make_mesh(devices: int = 0) -> Mesh:
  """A 1-D mesh named ``"data"`` over the first ``devices`` devices (0: all of them).

  Examples:
    >>> from jaxprune.train import sharding
    >>> mesh = sharding.make_mesh()
    >>> mesh.axis_names, mesh.size == jax.device_count()
    (('data',), True)
  """
  available = jax.devices()
  n = devices or len(available)
  if n > len(available):
    raise ValueError(f"Asked for {n} devices; there are {len(available)}.")
  return Mesh(np.asarray(available[:n]), (AXIS,))


def fsdp_spec(shape: tuple[int, ...], n_devices: int, *, min_size: int = 1024) -> PartitionSpec:
  """Shards the largest axis that ``n_devices`` divides, for arrays with ``ndim >= 2``.

  Small arrays (fewer than ``min_size`` elements), vectors and scalars are replicated:
  splitting them saves no memory worth the communication.

  Examples:
    >>> from jaxprune.train import sharding
    >>> sharding.fsdp_spec((784, 300), 8), sharding.fsdp_spec((3, 3, 16, 32), 8)
    (P('data', None), P(None, None, None, 'data'))
    >>> sharding.fsdp_spec((300,), 8), sharding.fsdp_spec((5, 7), 8, min_size=1)
    (P(), P())
  """
  if len(shape) < 2 or int(np.prod(shape)) < min_size or n_devices == 1:
    return PartitionSpec()
  candidates = [i for i, d in enumerate(shape) if d % n_devices == 0]
  if not candidates:
    return PartitionSpec()
  axis = max(candidates, key=lambda i: (shape[i], i))
  return PartitionSpec(*(AXIS if i == axis else None for i in range(len(shape))))


def state_shardings(tree: Any, mesh: Mesh, *, shard_params: bool) -> Any:
  """A ``NamedSharding`` for every array leaf of ``tree`` (replicated unless FSDP).

  ``tree`` may hold arrays or ``jax.ShapeDtypeStruct`` s; ``None`` leaves stay ``None``.
  """

  def one(leaf):
    if leaf is None:
      return None
    spec = fsdp_spec(tuple(leaf.shape), mesh.size) if shard_params else PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same value on every device."""
  return NamedSharding(mesh, PartitionSpec())


def process() -> tuple[int, int]:
  """``(jax.process_index(), jax.process_count())``: which rows of a batch this host reads."""
  return jax.process_index(), jax.process_count()


def global_batch(local: Any, sharding: NamedSharding) -> Any:
  """Turns this process's rows of a batch into global arrays sharded along the batch.

  With one process the local rows are the whole batch. With several (after
  ``jax.distributed.initialize()``), each passes the rows it read
  (:func:`jaxprune.train.data.stream` with ``process=``) and gets the same global array.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def to_host(tree: Any) -> Any:
  """Numpy copies of a tree's arrays, whole, on every process.

  With several processes, sharded arrays are gathered with
  ``multihost_utils.process_allgather``: a collective, so every process must call it.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def flat_arrays(tree: Any) -> dict[str, np.ndarray]:
  """``{path: numpy array}`` of a tree's array leaves, gathered (what ``params.npz`` holds)."""
  return {p: np.asarray(x) for p, x in tree_lib.leaves_with_paths(to_host(tree))}


def describe(tree: Any) -> dict[str, str]:
  """``{path: partition spec}`` of the sharded leaves: how a state is laid out."""
  out = {}
  for path, leaf in tree_lib.leaves_with_paths(tree):
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    if spec is not None and any(a is not None for a in spec):
      out[path] = str(spec)
  return out
