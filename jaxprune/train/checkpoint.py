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

import contextlib
import json
import logging
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from jaxprune.train.errors import RunFileError


class Checkpointer:
  """Saves and restores a run's state every ``every`` steps, keeping the ``keep`` newest.

  Args:
    directory: where checkpoints go (created if missing, unless ``read_only``; one
      subdirectory per step).
    every: save when ``step % every == 0`` (and whenever ``force`` is passed).
    keep: how many of the newest checkpoints stay on disk.
    preserve: steps whose checkpoints are never deleted (the end of a phase that a
      later phase builds on).
    read_only: only read: the directory must exist, nothing is created, cleaned up or
      saved (``jaxprune eval``, ``export``, ``shrink``, ``prune``).

  Raises:
    FileNotFoundError: ``read_only`` and there is no such directory.

  A ``Checkpointer`` is a context manager: ``with Checkpointer(...) as ckpt:`` closes it
  on every way out (its threads must stop before the interpreter does).

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
    self,
    directory: str | pathlib.Path,
    *,
    every: int,
    keep: int,
    preserve: Sequence[int] = (),
    read_only: bool = False,
  ):
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"No checkpoint in {self.directory}: there is no such directory.")
    policy = checkpoint_managers.LatestN(keep)
    if preserve:
      policy = checkpoint_managers.AnyPreservationPolicy(
        [policy, checkpoint_managers.CustomSteps(list(preserve))]
      )
    options = ocp.CheckpointManagerOptions(
      create=not read_only, cleanup_tmp_directories=not read_only, preservation_policy=policy
    )
    with _errors_raised_not_logged():
      self._manager = ocp.CheckpointManager(self.directory, options=options)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints on disk, oldest first."""
    with _errors_raised_not_logged():
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

    ``meta`` is JSON data, copied at the call: changing it afterwards (the training loop
    appends to its history) does not change the checkpoint.

    Returns whether a checkpoint was started (``False`` when not due, or when one of
    that step exists already).

    Raises:
      TypeError: ``meta`` is not JSON data (naming the step).
    """
    if not (force or self.due(step)) or step in self._manager.all_steps():
      return False
    # The save finishes in a thread while the caller goes on (appending to the history it
    # passed): the meta written is a copy taken now, checked to be JSON here.
    try:
      meta = json.loads(json.dumps(meta))
    except (TypeError, ValueError) as e:
      raise TypeError(f"The meta of checkpoint {step} is not JSON: {e}.") from e
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
      RunFileError: when the checkpoint cannot be read (damaged, cut short, or of
        another run's shapes); the message names its directory and step.
    """
    self._manager.wait_until_finished()
    step = self.latest() if step is None else step
    if step is None or step not in self.steps():
      raise FileNotFoundError(
        f"No checkpoint {step if step is not None else ''} in {self.directory}."
      )
    abstract = jax.tree.map(_abstract, template)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    try:
      with _errors_raised_not_logged():
        restored = self._manager.restore(step, args=args)
      return restored["state"], dict(restored["meta"])
    except Exception as e:  # tensorstore / orbax / JSON errors of a damaged checkpoint
      raise RunFileError(
        f"{self.directory / str(step)}: checkpoint of step {step} cannot be read: it is "
        "damaged or cut short, or was saved by a run with another model or optimizer "
        f"({_root_cause(e)})"
      ) from e

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and the start-up cleanup, and releases the manager's threads."""
    # Orbax's close() does not wait for the cleanup of unfinished checkpoints that the
    # manager starts in a thread when it opens (only a save does); a thread still running
    # at interpreter exit prints a traceback after the command has ended.
    await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self._manager.wait_until_finished()
    self._manager.close()


@contextlib.contextmanager
def _errors_raised_not_logged() -> Iterator[None]:
  """Orbax's error logs while it reads checkpoints are off: the errors are raised too.

  Reading a damaged checkpoint, orbax logs the same error (``ERROR:absl:Failed to json
  parse ...``) each time it reads the file, then raises it; the raised error is reported
  once, with the checkpoint's path (:class:`RunFileError`).
  """
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _root_cause(error: BaseException) -> str:
  """The innermost cause's first line (tensorstore's: which array, which file, what is wrong)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__  # type: ignore[assignment]
  lines = str(error).strip().splitlines()
  reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
  return reason if len(reason) <= 300 else f"{reason[:300]}..."


def _abstract(leaf: Any) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))
