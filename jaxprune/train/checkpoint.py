"""Orbax checkpoints of a training run: atomic, keep-N, resumable bit for bit.

A checkpoint holds two items:

* ``state``: the whole :class:`~jaxprune.train.loop.TrainState` (params, batch
  statistics, the optimizer state with the masks, the step and the RNG key), saved
  with ``StandardSave`` and restored onto the shardings of a template, so a sharded
  run restores sharded;
* ``meta``: JSON with the phase, the step, the data position (epoch and batch within
  it), the metrics history so far and the config.

Orbax writes each checkpoint into a temporary directory and renames it when complete,
so a run killed at any moment (``kill -9`` included) leaves only whole checkpoints;
the next run with the same command restores the newest one and continues. Since the
data order is a function of ``(seed, epoch)`` and every state array comes back
exactly, the resumed run ends with the same bits as one that was never interrupted.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpointer:
  """Saves and restores a run's state every ``every`` steps, keeping the ``keep`` newest.

  Args:
    directory: where checkpoints go (created if missing; one subdirectory per step).
    every: save when ``step % every == 0`` (and whenever ``force`` is passed).
    keep: how many of the newest checkpoints stay on disk.
    preserve: steps whose checkpoints are never deleted (the end of a phase that a
      later phase builds on).

  Examples:
    >>> import tempfile, jax.numpy as jnp
    >>> from jaxprune.train.checkpoint import Checkpointer
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), every=10, keep=2)
    >>> for step in (10, 20, 30):
    ...   _ = ckpt.save(step, {"w": jnp.full(3, step)}, {"phase": "train"})
    >>> ckpt.wait()
    >>> ckpt.steps()
    [20, 30]
    >>> state, meta = ckpt.restore({"w": jnp.zeros(3, jnp.int32)})
    >>> state["w"].tolist(), meta
    ([30, 30, 30], {'phase': 'train'})
    >>> ckpt.close()
  """

  def __init__(
    self, directory: str | pathlib.Path, *, every: int, keep: int, preserve: Sequence[int] = ()
  ):
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    policy = checkpoint_managers.LatestN(keep)
    if preserve:
      policy = checkpoint_managers.AnyPreservationPolicy(
        [policy, checkpoint_managers.CustomSteps(list(preserve))]
      )
    options = ocp.CheckpointManagerOptions(
      create=True, cleanup_tmp_directories=True, preservation_policy=policy
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints on disk, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest(self) -> int | None:
    """The newest complete checkpoint's step, or ``None``."""
    steps = self.steps()
    return steps[-1] if steps else None

  def due(self, step: int) -> bool:
    """Whether :meth:`save` at ``step`` writes a checkpoint without ``force``."""
    return step % self.every == 0

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Starts saving ``state`` and ``meta`` as checkpoint ``step`` (asynchronously).

    Returns whether a checkpoint was started (``False`` when not due, or when one of
    that step exists already).
    """
    if not (force or self.due(step)) or step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return bool(self._manager.save(step, args=args, force=True))

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The state and meta of checkpoint ``step`` (default: the newest).

    Args:
      template: a tree with the state's structure whose leaves are arrays or
        ``jax.ShapeDtypeStruct`` s (with ``sharding``): restored arrays get their
        shapes, dtypes and shardings.
      step: which checkpoint.

    Raises:
      FileNotFoundError: when there is no checkpoint (of that step).
    """
    self._manager.wait_until_finished()
    step = self.latest() if step is None else step
    if step is None or step not in self.steps():
      raise FileNotFoundError(
        f"No checkpoint {step if step is not None else ''} in {self.directory}."
      )
    abstract = jax.tree.map(_abstract, template)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()


def _abstract(leaf: Any) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))
