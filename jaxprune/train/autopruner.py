"""The AutoPruner recipe (``prune.method="autopruner"``): a gated conv net, end to end.

:func:`train_recipe` trains :class:`GatedConvNet` with ``cross-entropy + gate_penalty``
while ``alpha`` grows, turns the gates into hard masks, folds them into the convs
(:func:`jaxprune.nn.ungate`), fine-tunes the gate-free model with the removed channels
held at zero, and reports accuracies, keep ratios and the multiply-accumulates saved.

Its config has the schema of every recipe (:func:`jaxprune.train.config.default_config`):
``data`` names the dataset (read and batched by :mod:`jaxprune.train.data`), ``train``
the gate-training steps, learning rate, seed and progress, and the ``autopruner`` group
the rest. ``configs/autopruner.py`` is the recipe; ``jaxprune train`` runs it here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune import masks as masks_lib
from jaxprune import nn as gates_lib
from jaxprune import progress
from jaxprune import tree as tree_lib
from jaxprune.train import config as config_lib
from jaxprune.train import data
from jaxprune.train import step as step_lib
from jaxprune.train.config_type import Config

METHOD = "autopruner"  # the prune.method this runner serves


class GatedConvNet(nnx.Module):
  """``[conv3x3 -> BN -> ReLU -> gate -> maxpool2]`` per width, then a Dense classifier.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.train.autopruner import GatedConvNet
    >>> def logits():
    ...   return GatedConvNet((4, 8), image_size=8, rngs=nnx.Rngs(0))(jnp.ones((2, 8, 8, 1)))
    >>> nnx.eval_shape(logits).shape  # shapes only, nothing computed
    (2, 10)
  """

  def __init__(
    self,
    widths: Sequence[int] = (16, 32),
    image_size: int = 8,
    num_classes: int = 10,
    *,
    channels: int = 1,
    init_std: float | None = None,
    rngs: nnx.Rngs,
  ):
    blocks, c_in = [], channels
    for width in widths:
      conv = nnx.Conv(c_in, width, (3, 3), rngs=rngs)
      norm = nnx.BatchNorm(width, rngs=rngs)
      blocks.append(
        gates_lib.Gated(conv, norm=norm, activation=nnx.relu, init_std=init_std, rngs=rngs)
      )
      c_in = width
    self.blocks = nnx.List(blocks)
    side = image_size // 2 ** len(widths)
    self.head = nnx.Linear(side * side * c_in, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = flax.linen.max_pool(block(x), (2, 2), strides=(2, 2))
    return self.head(x.reshape(x.shape[0], -1))


def conv_net_macs(
  kept: Sequence[int], image_size: int, num_classes: int = 10, channels: int = 1
) -> int:
  """Multiply-accumulates of :class:`GatedConvNet`'s convs and head (gates left out).

  Conv ``i`` at ``s x s`` costs ``s * s * 9 * c_in * c_out``, the head
  ``(s_last^2 * c_last) * classes``, with ``kept`` the output channels of each conv.

  Examples:
    >>> from jaxprune.train.autopruner import conv_net_macs
    >>> conv_net_macs([16, 32], 8)  # 8*8*9*1*16 + 4*4*9*16*32 + 2*2*32*10
    84224
  """
  macs, c_in, side = 0, channels, image_size
  for c_out in kept:
    macs += side * side * 9 * c_in * c_out
    c_in, side = c_out, side // 2
  return macs + side * side * c_in * num_classes


def _accuracy(model: nnx.Module, split: data.Source, batch_size: int) -> float:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return step_lib.accuracy(step_lib.make_eval_step(graphdef), params, rest, split, batch_size)


def _gate_optimizer(params: nnx.State, config: Config):
  """Adam; the gates' FCs (params under a ``gate`` scope) at their own learning rate."""
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: "gate" if "/gate/" in "/" + tree_lib.path_str(path) + "/" else "net", params
  )
  net_tx = optax.adam(config.train.learning_rate)
  gate_tx = optax.adam(config.autopruner.gate_learning_rate)
  return optax.multi_transform({"net": net_tx, "gate": gate_tx}, labels)


def _gate_step(graphdef, tx, alpha_fn, r, scale):
  def loss_fn(params, rest, x, y, alpha):
    model = nnx.merge(graphdef, params, rest, copy=True)
    gates_lib.set_alpha(model, alpha)
    ce = step_lib.cross_entropy(model(x), y)
    vectors = gates_lib.gate_vectors(model)
    loss = ce + gates_lib.gate_penalty(vectors, r, scale)
    ratios = {
      p: (gates_lib.keep_ratio(v), gates_lib.keep_ratio(v > 0.5)) for p, v in vectors.items()
    }
    return loss, (nnx.split(model, nnx.Param, ...)[2], (ce, ratios))

  @jax.jit
  def step(params, rest, opt_state, t, x, y):
    (loss, (rest, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, rest, x, y, alpha_fn(t)
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, (loss, *stats)

  return step


def _masked_step(graphdef, tx, param_masks):
  def loss_fn(params, rest, x, y):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return step_lib.cross_entropy(model(x), y), nnx.split(model, nnx.Param, ...)[2]

  @jax.jit
  def step(params, rest, opt_state, x, y):
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
    grads = masks_lib.apply_mask(grads, param_masks)  # removed channels stay exactly zero
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  return step


@dataclasses.dataclass
class RecipeResult:
  """What :func:`train_recipe` measured, and the pruned model.

  Attributes:
    keep_ratios: per gate, the fraction of channels kept by the hard masks, and
      ``"total"`` over all gated channels.
    accuracy_dense: test accuracy after pretraining (all gates 0.5), or ``None``
      without pretraining.
    accuracy_pruned: test accuracy of the gate-free masked model, before fine-tuning.
    accuracy_finetuned: the same after fine-tuning.
    macs_dense, macs_pruned: multiply-accumulates per image with all / kept channels.
    seconds: wall time of the whole recipe (data loading and compilation included).
    model: the fine-tuned gate-free model (removed channels exactly zero).
    masks: its param masks (see :func:`jaxprune.nn.ungate`).
  """

  keep_ratios: dict[str, float]
  accuracy_dense: float | None
  accuracy_pruned: float
  accuracy_finetuned: float
  macs_dense: int
  macs_pruned: int
  seconds: float
  model: nnx.Module
  masks: Any

  @property
  def keep_ratio(self) -> float:
    return self.keep_ratios["total"]

  @property
  def mac_reduction(self) -> float:
    """``1 - pruned / dense`` MACs."""
    return 1.0 - self.macs_pruned / self.macs_dense

  def report(self) -> str:
    """What ``jaxprune train`` prints: keep ratios, accuracies, MACs and the time."""
    return str(self)

  def __str__(self) -> str:
    per_layer = ", ".join(f"{p}: {v:.3f}" for p, v in self.keep_ratios.items())
    dense = "-" if self.accuracy_dense is None else f"{self.accuracy_dense:.4f}"
    return (
      f"keep ratios {per_layer}\n"
      f"accuracy: dense {dense}, pruned {self.accuracy_pruned:.4f}, "
      f"fine-tuned {self.accuracy_finetuned:.4f}\n"
      f"MACs {self.macs_pruned:,} / {self.macs_dense:,} "
      f"({self.mac_reduction:.1%} fewer), {self.seconds:.1f} s"
    )


def train_recipe(config: Config) -> RecipeResult:
  """Runs the AutoPruner recipe of ``config`` (see ``configs/autopruner.py``).

  With ``a = config.autopruner``:

  1. Pretrain :class:`GatedConvNet` (``a.widths``) for ``a.pretrain_steps`` with
     ``alpha = 0`` (every gate is 0.5 and learns nothing: a trained model, as the
     paper starts from).
  2. Train it ``train.steps`` more on ``cross-entropy + gate_penalty(v, a.keep_ratio)``
     with ``alpha = alpha_schedule(a.alpha_start, a.alpha_end, train.steps,
     every=a.alpha_every, mode=a.alpha_mode)``; Adam at ``train.learning_rate``, the
     gates' FCs at ``a.gate_learning_rate``.
  3. Hard masks (``v > 0.5``) from one pass over the whole training split with
     BatchNorm in training mode (as the gates were trained; running averages lag),
     folded into the convs and BatchNorms by :func:`jaxprune.nn.ungate`.
  4. Fine-tune the gate-free model for ``a.finetune_steps`` at
     ``a.finetune_learning_rate`` with the removed channels' gradients masked, so they
     stay exactly zero.

  Batches are :func:`jaxprune.train.data.stream` of ``config.data`` (seeded by
  ``train.seed``), one stream through the three stages; accuracies are on its test
  split. ``train.progress`` shows a progress bar (loss and soft/hard keep ratios every
  ``train.log_every`` steps).

  Returns:
    A :class:`RecipeResult` (``print`` it for a summary).

  Raises:
    ConfigError: for a bad config, before any data is loaded.

  Examples:
    >>> from jaxprune.train import autopruner, config as config_lib
    >>> config = config_lib.load_config("configs/autopruner.py")  # doctest: +SKIP
    >>> result = autopruner.train_recipe(config)  # a minute on 2 CPU cores  # doctest: +SKIP
    >>> result.keep_ratio  # doctest: +SKIP
    0.5
  """
  config_lib.validate_config(config)
  start = time.perf_counter()
  a, t = config.autopruner, config.train
  ds = data.from_config(config.data)
  image_size, eval_batch = ds.image_shape[0], config.data.eval_batch_size
  model = GatedConvNet(
    tuple(a.widths),
    image_size,
    ds.num_classes,
    channels=ds.image_shape[-1],
    init_std=a.init_std or None,
    rngs=nnx.Rngs(t.seed),
  )
  schedule = gates_lib.alpha_schedule(
    a.alpha_start, a.alpha_end, t.steps, every=a.alpha_every, mode=a.alpha_mode
  )
  warmup = a.pretrain_steps

  def alpha_fn(step):  # alpha = 0 while pretraining
    return jnp.where(step < warmup, 0.0, schedule(jnp.maximum(step - warmup, 0)))

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = _gate_optimizer(params, config)
  opt_state = tx.init(params)
  gate_step = _gate_step(graphdef, tx, alpha_fn, a.keep_ratio, a.lambda_scale)
  batches = data.stream(ds.train, config.data.batch_size, seed=t.seed)
  accuracy_dense = None
  total = warmup + t.steps + a.finetune_steps
  with progress.bar(total=total, desc="autopruner", unit="step", disable=not t.progress) as bar:
    for step in range(warmup + t.steps):
      if step == warmup and warmup:
        dense = nnx.merge(graphdef, params, rest, copy=True)
        accuracy_dense = _accuracy(dense, ds.test, eval_batch)
      x, y = next(batches)
      params, rest, opt_state, stats = gate_step(params, rest, opt_state, step, x, y)
      if step % t.log_every == 0 or step == warmup + t.steps - 1:
        loss, ce, ratios = jax.device_get(stats)
        soft_hard = " ".join(f"{s:.3f}/{h:.3f}" for s, h in ratios.values())
        postfix = {"alpha": f"{float(alpha_fn(step)):.1f}", "loss": f"{loss:.4f}"}
        bar.set_postfix({**postfix, "ce": f"{ce:.4f}", "keep": soft_hard}, refresh=False)
      bar.update()
    model = nnx.merge(graphdef, params, rest, copy=True)

    calibration = nnx.clone(model)
    calibration(jnp.asarray(ds.train.take(np.arange(len(ds.train)))[0]))
    masks = gates_lib.hard_masks(gates_lib.gate_vectors(calibration))
    plain, param_masks = gates_lib.ungate(model, masks)
    accuracy_pruned = _accuracy(plain, ds.test, eval_batch)

    tx = optax.adam(a.finetune_learning_rate)
    graphdef, params, rest = nnx.split(plain, nnx.Param, ...)
    opt_state = tx.init(params)
    masked_step = _masked_step(graphdef, tx, param_masks)
    for _ in range(a.finetune_steps):
      params, rest, opt_state, _ = masked_step(params, rest, opt_state, *next(batches))
      bar.update()
  plain = nnx.merge(graphdef, params, rest, copy=True)

  kept = [int(np.sum(m)) for m in masks.values()]
  result = RecipeResult(
    keep_ratios=gates_lib.keep_ratios(masks),
    accuracy_dense=accuracy_dense,
    accuracy_pruned=accuracy_pruned,
    accuracy_finetuned=_accuracy(plain, ds.test, eval_batch),
    macs_dense=conv_net_macs(a.widths, image_size, ds.num_classes, ds.image_shape[-1]),
    macs_pruned=conv_net_macs(kept, image_size, ds.num_classes, ds.image_shape[-1]),
    seconds=time.perf_counter() - start,
    model=plain,
    masks=param_masks,
  )
  return result
