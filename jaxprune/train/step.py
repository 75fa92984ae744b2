"""The training loop: a config in, a trained (and pruned) model and its numbers out.

:func:`train` runs a recipe: train the model dense, prune it with the pruner that
:func:`jaxprune.train.optim.make_pruner` builds from ``config.prune`` (inside the
optimizer, through :func:`jaxprune.masked`), fine-tune, and report the dense and final
test accuracy with the per-layer sparsity. With ``rethink.enabled`` a second phase
trains the pruned network from scratch (Liu et al. 2019): the final masks, fixed,
on re-initialised weights.

The model is split once into a graph definition and pytrees (``nnx.split``); the
jitted step is a pure function of a :class:`TrainState`, run SPMD over a device mesh
(:mod:`jaxprune.train.sharding`), saved and restored by
:mod:`jaxprune.train.checkpoint`, logged by :mod:`jaxprune.train.metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

import jaxprune
from jaxprune import tree as tree_lib
from jaxprune.train import data
from jaxprune.train import sharding as sharding_lib


class TrainState(NamedTuple):
  """Everything that changes during training: a pytree of arrays, ready to checkpoint.

  Attributes:
    params: the ``nnx.Param`` state of the model (paths like ``"fc1/kernel"``).
    rest: the model's other state (BatchNorm statistics; empty for the LeNets).
    opt_state: the optimizer state (holds the masks: see :func:`jaxprune.masks_of`).
    step: the number of steps taken in this phase (``int32`` scalar): with the seed,
      also the position in the data (:func:`jaxprune.train.data.stream`).
    rng: raw PRNG key data (``uint32[2]``), split once per step for augmentation.
  """

  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState
  step: jax.Array
  rng: jax.Array


def init_state(
  model: nnx.Module, tx: optax.GradientTransformation, *, seed: int, masks: Any = None
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits ``model`` and starts training it with ``tx``.

  Args:
    model: the ``nnx.Module`` to train.
    tx: the optimizer (:func:`jaxprune.masked` or plain optax).
    seed: seeds the state's RNG key.
    masks: fixed masks to start from (the rethinking run): the params are masked and
      the masks put into the :class:`jaxprune.MaskedState` of ``tx``, wherever it sits
      in the state (e.g. inside ``optax.chain``).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)
  if masks is not None:
    params = jaxprune.apply_mask(params, masks)
    opt_state = jaxprune.set_masks(opt_state, masks)
  rng = jax.random.key_data(jax.random.key(seed))
  return graphdef, TrainState(params, rest, opt_state, jnp.zeros((), jnp.int32), rng)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.train import loop
    >>> round(float(loop.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)
    1.3863
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.partial(jax.jit, static_argnames="paths")
def zero_fraction(params: Any, paths: tuple[str, ...]) -> jax.Array:
  """The fraction of exact zeros over the params at ``paths`` (the measured sparsity).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune.train import loop
    >>> float(loop.zero_fraction({"w": jnp.array([0., 1., 0., 2.])}, paths=("w",)))
    0.5
  """
  leaves = dict(tree_lib.leaves_with_paths(params))
  zeros = sum(jnp.sum(leaves[p] == 0, dtype=jnp.float32) for p in paths)
  return zeros / max(1, sum(leaves[p].size for p in paths))


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  *,
  augment: str = "none",
  measured: tuple[str, ...] = (),
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """``(state, images, labels) -> (state, metrics)``: one optimizer step (to be jitted).

  ``tx.update`` receives the params, as :func:`jaxprune.masked` needs, and
  ``optax.apply_updates`` leaves pruned weights exactly zero. The metrics are the
  batch's ``loss`` and ``accuracy`` and the ``sparsity`` of the ``measured`` params
  after the step.
  """

  def loss_fn(params, rest, images, labels):
    model = nnx.merge(graphdef, params, rest, copy=True)  # BatchNorm updates its copy
    logits = model(images)
    return cross_entropy(logits, labels), (logits, nnx.split(model, nnx.Param, ...)[2])

  def train_step(state, images, labels):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    images = data.augment(images, key, augment)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, rest)), grads = grad_fn(state.params, state.rest, images, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(params, rest, opt_state, state.step + 1, jax.random.key_data(rng))
    metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "sparsity": zero_fraction(params, paths=measured),
    }
    return new, metrics

  return train_step


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(graphdef, params, rest, images, labels, valid):
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  logits = model(images)
  return jnp.sum((jnp.argmax(logits, -1) == labels) & valid)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  """``(params, rest, images, labels, valid) -> correct valid predictions`` (eval mode).

  Jitted once per model structure: runs of the same model share the compiled function.
  """
  return functools.partial(_eval_step, graphdef)


def evaluate(
  eval_step: Callable,
  state: TrainState,
  split: data.Source,
  batch_size: int,
  mesh: jax.sharding.Mesh | None = None,
) -> float:
  """Accuracy of the model in ``state`` on a whole split (see :func:`make_eval_step`).

  With a ``mesh``, each batch is split over its devices (and this process reads only
  its rows of each batch).
  """
  correct = 0
  process = sharding_lib.process() if mesh is not None else (0, 1)
  for batch in data.eval_batches(split, batch_size, process=process):
    if mesh is not None:
      batch = sharding_lib.global_batch(batch, sharding_lib.batch_sharding(mesh))
    correct += int(eval_step(state.params, state.rest, *batch))
  return correct / len(split)


@dataclasses.dataclass(frozen=True)
class PhaseResult:
  """The outcome of one phase of a run (``"train"`` or ``"rethink"``).

  Attributes:
    name: the phase.
    final_accuracy: test accuracy after its last step.
    summary: :func:`jaxprune.summary` of its final params over the pruned params.
    state: its final :class:`TrainState`.
    history: its metric records (see :mod:`jaxprune.train.metrics`), in order.
  """

  name: str
  final_accuracy: float
  summary: jaxprune.Summary
  state: TrainState
  history: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a run produced.

  Attributes:
    dense_accuracy: test accuracy just before the first pruning step (``None`` when
      pruning starts at step 0); the final accuracy when nothing is pruned.
    dense_step: the step at which ``dense_accuracy`` was measured.
    final_accuracy: test accuracy after the last step (the fine-tuned model).
    summary: :func:`jaxprune.summary` of the pruned params (all kernels when unpruned).
    state: the final :class:`TrainState`.
    graphdef: rebuilds the model with ``state`` (see :meth:`model`).
    history: metric records of the main phase: ``{"phase", "step", "global_step",
      "epoch", ...}`` with ``loss`` / ``train_accuracy`` / ``learning_rate`` every
      ``log_every`` steps and ``test_accuracy`` at evaluations (see
      :mod:`jaxprune.train.metrics`).
    seconds: wall time of this invocation, compilation included.
    rethink: the from-scratch run of the pruned architecture (``rethink.enabled``).
    resumed_from: the global step of the checkpoint this invocation resumed from.
    regularized: whether a sparsity regularizer (``config.regularize``) trained the
      model before pruning, so the "dense" accuracy is that of the regularized model.
  """

  dense_accuracy: float | None
  dense_step: int
  final_accuracy: float
  summary: jaxprune.Summary
  state: TrainState
  graphdef: nnx.GraphDef
  history: tuple[dict[str, Any], ...]
  seconds: float
  rethink: PhaseResult | None = None
  resumed_from: int | None = None
  regularized: bool = False

  def model(self) -> nnx.Module:
    """The trained model as an ``nnx.Module`` (in eval mode)."""
    model = nnx.merge(self.graphdef, jax.device_get(self.state.params), self.state.rest)
    model.eval()
    return model

  def report(self) -> str:
    """Dense and final accuracy, the sparsity table and the time, as the CLI prints them."""
    dense = (
      "n/a (pruned from step 0)"
      if self.dense_accuracy is None
      else f"{self.dense_accuracy:.2%} (step {self.dense_step})"
    )
    if self.regularized and self.dense_accuracy is not None:
      dense += ", trained with the sparsity regularizer"
    lines = [f"dense accuracy: {dense}", f"final accuracy: {self.final_accuracy:.2%}"]
    if self.rethink is not None:
      lines.append(
        f"from scratch (rethinking, same masks, re-initialised): {self.rethink.final_accuracy:.2%}"
      )
    if self.resumed_from is not None:
      lines.append(f"resumed from checkpoint step {self.resumed_from}")
    return "\n".join([*lines, str(self.summary), f"time: {self.seconds:.1f} s"])


def train(config: ml_collections.ConfigDict, *, dataset: data.Dataset | None = None) -> TrainResult:
  """Runs a recipe: validates the config, trains, prunes, fine-tunes, evaluates.

  A tqdm bar (``config.train.progress``) shows the mean loss and accuracy of the last
  ``train.log_every`` steps, the latest test accuracy (every ``train.eval_every``
  steps) and the sparsity. With a ``train.workdir`` the run writes metrics (CSV and
  TensorBoard), checkpoints (``checkpoint.every`` steps; resumed automatically by the
  same command), the final ``params.npz``, ``summary.json`` and ``report.md``.

  Args:
    config: a config with the fields of :func:`jaxprune.train.config.default_config`.
    dataset: use this dataset instead of loading ``config.data``.

  Returns:
    A :class:`TrainResult`; ``print(result.report())`` shows the numbers.

  Raises:
    ConfigError: before any work, naming a bad field.

  Examples:
    >>> from jaxprune.train import config as config_lib, loop
    >>> config = config_lib.default_config()
    >>> config.data.name, config.train.steps, config.train.progress = "digits", 30, False
    >>> result = loop.train(config)
    >>> result.summary["fc1/kernel"].zeros, round(result.summary.sparsity, 3)
    (17280, 0.9)
  """
  from jaxprune.train import run

  return run.Run(config, dataset=dataset).execute()
