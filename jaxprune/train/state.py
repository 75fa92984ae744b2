"""A run's training state from its config: built fresh on the mesh, or restored.

:func:`initial` builds the model, the optimizer and the first :class:`TrainState` of
the ``train`` phase (what :class:`jaxprune.train.run.Run` trains, and the template a
checkpoint is restored onto); :func:`restore` reads a checkpoint of a run without
building the run: ``jaxprune eval``, ``shrink`` and ``sensitivity`` need only the
state, the image shape and the class count.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import optax
from flax import nnx

import jaxprune
from jaxprune.train import checkpoint as checkpoint_lib
from jaxprune.train import config as config_lib
from jaxprune.train import models, optim, structured
from jaxprune.train import sharding as sharding_lib
from jaxprune.train.config_type import Config
from jaxprune.train.step import TrainState, init_state


@dataclasses.dataclass(frozen=True)
class Initial:
  """The start of the ``train`` phase.

  Attributes:
    graphdef: rebuilds the model with a state's ``params`` and ``rest``.
    tx: the optimizer (:func:`jaxprune.train.optim.make_optimizer`).
    learning_rate: its schedule over ``train.steps``.
    state: the first :class:`TrainState`, placed on the mesh.
  """

  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  state: TrainState


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint of a run: its state, the graph to rebuild the model, its meta.

  Attributes:
    graphdef: rebuilds the model with ``state.params`` and ``state.rest``.
    state: the restored :class:`TrainState`.
    meta: the checkpoint's JSON (``phase``, ``step``, ``history``, ``config``, ...).
    directory: the checkpoint directory it came from.
  """

  graphdef: nnx.GraphDef
  state: TrainState
  meta: dict[str, Any]
  directory: pathlib.Path


def place(state: TrainState, mesh: jax.sharding.Mesh, *, shard_params: bool) -> TrainState:
  """``state`` on ``mesh``: batch-replicated, or FSDP-sharded params (``shard_params``)."""
  return jax.device_put(state, sharding_lib.state_shardings(state, mesh, shard_params=shard_params))


def initial(
  config: Config,
  pruner: jaxprune.Pruner | None,
  image_shape: tuple[int, ...],
  num_classes: int,
  mesh: jax.sharding.Mesh,
) -> Initial:
  """The model of ``config.model`` seeded by ``train.seed``, its optimizer and first state.

  A channel method (:mod:`jaxprune.train.structured`) starts from all-``True`` masks,
  which it replaces at ``prune.begin``.
  """
  m, t = config.model, config.train
  model = models.from_config(m, image_shape, num_classes, seed=t.seed)
  masks = None
  if structured.is_channel_method(config):
    masks = structured.full_masks(nnx.state(model, nnx.Param))
  lr = optim.make_learning_rate(config, t.steps)
  tx = optim.make_optimizer(config, pruner, lr, masks=masks)
  graphdef, state = init_state(model, tx, seed=t.seed)
  return Initial(graphdef, tx, lr, place(state, mesh, shard_params=config.parallel.shard_params))


def checkpoint_dir(config: Config) -> str:
  """``checkpoint.dir``, else ``<train.workdir>/checkpoints``, else ``""`` (none)."""
  if config.checkpoint.dir:
    return config.checkpoint.dir
  return str(pathlib.Path(config.train.workdir) / "checkpoints") if config.train.workdir else ""


def checkpointer(config: Config, *, read_only: bool = False) -> checkpoint_lib.Checkpointer | None:
  """The run's :class:`~jaxprune.train.checkpoint.Checkpointer` (``None`` without a dir).

  With ``rethink.enabled`` the last checkpoint of the ``train`` phase is never deleted:
  the ``rethink`` phase starts from its masks. ``read_only``: to read a run's
  checkpoints; nothing is created (``FileNotFoundError`` when the directory is missing).
  """
  directory = checkpoint_dir(config)
  if not directory:
    return None
  c = config.checkpoint
  preserve = (config.train.steps,) if config.rethink.enabled else ()
  return checkpoint_lib.Checkpointer(
    directory, every=c.every, keep=c.keep, preserve=preserve, read_only=read_only
  )


def checkpoint_steps(config: Config) -> list[int]:
  """The steps of the run's checkpoints on disk (``[]`` when there are none); creates nothing."""
  directory = checkpoint_dir(config)
  if not directory or not pathlib.Path(directory).is_dir():
    return []
  ckpt = checkpointer(config, read_only=True)
  if ckpt is None:  # checkpoint_dir named one
    return []
  with ckpt:
    return ckpt.steps()


def require_checkpoints(config: Config, purpose: str, step: int | None = None) -> list[int]:
  """The steps of the run's checkpoints; raises unless there is one (of ``step``).

  Reads the directory only (creates nothing, loads no data), so a command that needs a
  checkpoint fails at once.

  Raises:
    ConfigError: when ``config`` names no checkpoint directory.
    FileNotFoundError: when the directory is missing or holds no checkpoint, or none
      of ``step`` (the message lists the steps there).
  """
  directory = checkpoint_dir(config)
  if not directory:
    raise config_lib.ConfigError(
      f"checkpoint.dir: no checkpoints to {purpose}; set checkpoint.dir or train.workdir "
      "to the directory of a run."
    )
  path = pathlib.Path(directory).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"No checkpoint in {path}: there is no such directory.")
  steps = checkpoint_steps(config)
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {path}: has the run started?")
  if step is not None and step not in steps:
    raise FileNotFoundError(
      f"No checkpoint of step {step} in {path}; its checkpoints are of "
      f"steps {', '.join(map(str, steps))}."
    )
  return steps


def restore(
  config: Config,
  image_shape: tuple[int, ...],
  num_classes: int,
  *,
  step: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  purpose: str = "restore",
) -> Restored:
  """Checkpoint ``step`` (default: the newest) of the run that ``config`` describes.

  The state is restored onto the template :func:`initial` builds (the optimizer of
  ``config``; ``mesh`` default: ``parallel.devices``), so it comes back with the
  shardings a run would give it. Nothing is written to the checkpoint directory.

  Raises:
    ConfigError: when the config names no checkpoint directory.
    FileNotFoundError: when the directory holds no checkpoint, or none of ``step``
      (the message lists the steps there).
    RunFileError: when the checkpoint cannot be read (damaged or cut short); the
      message names its directory and step.
  """
  require_checkpoints(config, purpose, step)
  mesh = sharding_lib.make_mesh(config.parallel.devices) if mesh is None else mesh
  ckpt = checkpointer(config, read_only=True)
  if ckpt is None:  # require_checkpoints found a checkpoint dir
    raise RuntimeError(f"no checkpointer for the checkpoint dir of the run to {purpose}.")
  with ckpt:
    start = initial(config, optim.make_pruner(config), image_shape, num_classes, mesh)
    state, meta = ckpt.restore(start.state, step)
  return Restored(start.graphdef, state, meta, ckpt.directory)
