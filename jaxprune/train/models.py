"""The model zoo: Flax NNX classifiers, created by name.

LeNet-300-100 and LeNet-5 (``fc1`` ... ``fc3``), a VGG-style conv-BN-ReLU net and the
CIFAR ResNets of He et al. (2016) (ResNet-20, ResNet-56), and ``charlm``, the
decoder-only language model of :mod:`jaxprune.models.decoder` (token ids in,
next-token logits out; its sizes come from the ``model`` fields). Layer attributes are named so
that natural path order is input -> output: ``conv1, conv2, fc1, fc2, fc3`` for the
LeNets, ``features/0 ... features/N, head`` for the conv nets. ``dense_first`` /
``dense_last`` of a pruner then mean the input and the output layer, and
``prune.overrides={"head": 0.5}`` names the classifier.

Models with BatchNorm normalise with batch statistics (and update the running ones)
until ``model.eval()``; ``model.train()`` switches back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jaxprune.models.decoder import CharLM


class LeNet300(nnx.Module):
  """LeNet-300-100 (LeCun et al. 1998): a 784-300-100-10 ReLU MLP.

  Images are flattened, so any input shape works (``in_features`` = pixels).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = LeNet300(784, 10, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
  """

  def __init__(self, in_features: int = 784, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(in_features, 300, rngs=rngs)
    self.fc2 = nnx.Linear(300, 100, rngs=rngs)
    self.fc3 = nnx.Linear(100, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.fc3(x)


class LeNet5(nnx.Module):
  """LeNet-5: conv(5x5, 6) - maxpool - conv(5x5, 16) - maxpool - fc 120 - fc 84 - fc.

  Both convs use ``SAME`` padding, so 28x28 inputs give 7x7x16 features and 8x8 inputs
  (the ``digits`` set) give 2x2x16; images smaller than 4x4 are rejected.

  Examples:
    >>> from flax import nnx
    >>> model = nnx.eval_shape(lambda: LeNet5((8, 8, 1), 10, rngs=nnx.Rngs(0)))  # shapes only
    >>> model.fc1.kernel.shape  # 2x2x16 features after two pools
    (64, 120)
  """

  def __init__(
    self, input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, *, rngs: nnx.Rngs
  ):
    if len(input_shape) != 3:
      raise ValueError(f"LeNet5 takes (height, width, channels) images, got {input_shape}.")
    height, width, channels = input_shape
    if height < 4 or width < 4:
      raise ValueError(
        f"LeNet5 pools twice by 2, so images must be at least 4x4; got {height}x{width}."
      )
    self.conv1 = nnx.Conv(channels, 6, (5, 5), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(6, 16, (5, 5), padding="SAME", rngs=rngs)
    self.fc1 = nnx.Linear((height // 4) * (width // 4) * 16, 120, rngs=rngs)
    self.fc2 = nnx.Linear(120, 84, rngs=rngs)
    self.fc3 = nnx.Linear(84, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.fc3(x)


def _scaled(width: int, multiplier: float) -> int:
  return max(1, round(width * multiplier))


class ConvBN(nnx.Module):
  """``conv`` (no bias) then ``bn`` (BatchNorm), optionally ReLU.

  Examples:
    >>> from flax import nnx
    >>> layer = nnx.eval_shape(lambda: ConvBN(3, 8, (3, 3), strides=2, rngs=nnx.Rngs(0)))
    >>> layer.conv.kernel.shape, layer.bn.use_running_average
    ((3, 3, 3, 8), False)
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int] = (3, 3),
    *,
    strides: int = 1,
    relu: bool = True,
    rngs: nnx.Rngs,
  ):
    self.conv = nnx.Conv(
      in_features,
      out_features,
      tuple(kernel_size),
      strides=strides,
      padding="SAME",
      use_bias=False,
      kernel_init=nnx.initializers.he_normal(),
      rngs=rngs,
    )
    self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.relu = relu

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.bn(self.conv(x))
    return nnx.relu(x) if self.relu else x


VGG_SMALL = (16, "M", 32, "M", 64)


class VGG(nnx.Module):
  """A VGG-style net: 3x3 conv-BN-ReLU layers and 2x2 max pools, global average pool, Dense.

  Args:
    widths: output channels of each conv, in order, with ``"M"`` for a 2x2 max pool,
      e.g. ``(16, "M", 32, "M", 64)`` (the default, ``"vgg_small"``, sized for 8x8 and
      28x28 digits).
    in_features: input channels.
    num_classes: output logits.
    width: multiplies every conv width.
    rngs: the parameter RNGs.

  Examples:
    >>> from flax import nnx
    >>> model = nnx.eval_shape(lambda: VGG((8, "M", 16), 1, 10, rngs=nnx.Rngs(0)))
    >>> [layer.conv.kernel.shape for layer in model.features], model.head.kernel.shape
    ([(3, 3, 1, 8), (3, 3, 8, 16)], (16, 10))
  """

  def __init__(
    self,
    widths: Sequence[int | str] = VGG_SMALL,
    in_features: int = 1,
    num_classes: int = 10,
    *,
    width: float = 1.0,
    rngs: nnx.Rngs,
  ):
    layers, channels = [], in_features
    for w in widths:
      if w == "M":
        continue
      if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"VGG widths are positive ints or 'M' (max pool), got {w!r}.")
      layers.append(ConvBN(channels, _scaled(w, width), rngs=rngs))
      channels = _scaled(w, width)
    if not layers:
      raise ValueError(f"VGG needs at least one conv width, got {tuple(widths)}.")
    self.widths = tuple(widths)
    self.features = nnx.List(layers)
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    layers = iter(self.features)
    for w in self.widths:
      x = nnx.max_pool(x, (2, 2), strides=(2, 2)) if w == "M" else next(layers)(x)
    return self.head(x.mean(axis=(1, 2)))


class BasicBlock(nnx.Module):
  """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs.

  The shortcut is the identity, or a 1x1 conv + BN projection (``shortcut``) when the
  block changes the width or the stride.

  Examples:
    >>> from flax import nnx
    >>> block = nnx.eval_shape(lambda: BasicBlock(8, 16, strides=2, rngs=nnx.Rngs(0)))
    >>> block.shortcut.conv.kernel.shape, block.conv1.conv.strides
    ((1, 1, 8, 16), 2)
  """

  def __init__(self, in_features: int, out_features: int, *, strides: int = 1, rngs: nnx.Rngs):
    self.conv1 = ConvBN(in_features, out_features, strides=strides, rngs=rngs)
    self.conv2 = ConvBN(out_features, out_features, relu=False, rngs=rngs)
    self.shortcut = (
      ConvBN(in_features, out_features, (1, 1), strides=strides, relu=False, rngs=rngs)
      if strides != 1 or in_features != out_features
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    identity = x if self.shortcut is None else self.shortcut(x)
    return nnx.relu(self.conv2(self.conv1(x)) + identity)


class ResNet(nnx.Module):
  """A CIFAR ResNet (He et al. 2016): ``depth = 6n + 2`` layers in 3 stages of n blocks.

  ``features/0`` is the 3x3 stem conv-BN-ReLU (16 channels), ``features/1 ...
  features/3n`` the :class:`BasicBlock` s (16, 32, 64 channels, times ``width``; the
  first block of stages 2 and 3 halves the resolution with stride 2 and a 1x1
  projection shortcut), then global average pooling and the ``head`` Dense layer.
  ResNet-20 has 0.27M parameters at ``width=1`` for 10 classes.

  Args:
    depth: ``6n + 2``: 20, 32, 44, 56, 110, ...
    in_features: input channels.
    num_classes: output logits.
    width: multiplies the stage widths 16/32/64.
    rngs: the parameter RNGs.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> resnet56 = nnx.eval_shape(lambda: ResNet(56, rngs=nnx.Rngs(0)))  # shapes only
    >>> sum(x.size for x in jax.tree.leaves(nnx.state(resnet56, nnx.Param))), len(resnet56.features)
    (855770, 28)
    >>> graphdef, state = nnx.split(resnet56)
    >>> x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    >>> jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x).shape
    (2, 10)
  """

  def __init__(
    self,
    depth: int = 20,
    in_features: int = 3,
    num_classes: int = 10,
    *,
    width: float = 1.0,
    rngs: nnx.Rngs,
  ):
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
      raise ValueError(f"A CIFAR ResNet has depth 6n + 2 (20, 32, 56, ...), got {depth!r}.")
    n = (depth - 2) // 6
    widths = [_scaled(w, width) for w in (16, 32, 64)]
    layers: list[nnx.Module] = [ConvBN(in_features, widths[0], rngs=rngs)]
    channels = widths[0]
    for stage, w in enumerate(widths):
      for i in range(n):
        strides = 2 if stage > 0 and i == 0 else 1
        layers.append(BasicBlock(channels, w, strides=strides, rngs=rngs))
        channels = w
    self.depth = depth
    self.features = nnx.List(layers)
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.features:
      x = layer(x)
    return self.head(x.mean(axis=(1, 2)))


ModelFn = Callable[..., nnx.Module]

MODELS: dict[str, ModelFn] = {
  "lenet300": lambda shape, classes, rngs: LeNet300(math.prod(shape), classes, rngs=rngs),
  "lenet5": lambda shape, classes, rngs: LeNet5(shape, classes, rngs=rngs),
  "vgg_small": lambda shape, classes, rngs, width=1.0: VGG(
    VGG_SMALL, shape[-1], classes, width=width, rngs=rngs
  ),
  "resnet20": lambda shape, classes, rngs, width=1.0: ResNet(
    20, shape[-1], classes, width=width, rngs=rngs
  ),
  "resnet56": lambda shape, classes, rngs, width=1.0: ResNet(
    56, shape[-1], classes, width=width, rngs=rngs
  ),
}
SCALABLE = ("resnet20", "resnet56", "vgg_small")  # the models that take a width multiplier
# Models of token ids: input_shape is (seq_len,), num_classes the vocabulary; their sizes
# are create()'s `sizes` (the config's model.dim, depth, heads, kv_heads, mlp_dim).
LANGUAGE_MODELS = {"charlm": CharLM}


def names() -> list[str]:
  """The model names :func:`create` knows."""
  return sorted([*MODELS, *LANGUAGE_MODELS])


def create(
  name: str,
  input_shape: Sequence[int],
  num_classes: int,
  *,
  seed: int = 0,
  width: float = 1.0,
  sizes: Mapping[str, Any] | None = None,
) -> nnx.Module:
  """Creates a model of the zoo for images of ``input_shape`` ``(H, W, C)``.

  Args:
    name: one of :func:`names` (``"lenet300"``, ``"lenet5"``, ``"vgg_small"``,
      ``"resnet20"``, ``"resnet56"``).
    input_shape: the shape of one image, ``(height, width, channels)``.
    num_classes: the number of output logits.
    seed: seeds the parameter initialisation.
    width: multiplies the channel widths of the conv nets (:data:`SCALABLE`); the
      LeNets have fixed widths and take only ``1.0``.
    sizes: a language model's keyword arguments (``dim``, ``depth``, ``num_heads``,
      ``num_kv_heads``, ``mlp_dim``; :class:`~jaxprune.models.decoder.Decoder`);
      ignored by the image models.

  Returns:
    An ``nnx.Module`` mapping ``(batch, *input_shape)`` images to ``(batch, classes)``.

  Raises:
    ValueError: for an unknown name (listing the known ones) or an unsuitable shape.

  Examples:
    >>> from flax import nnx
    >>> from jaxprune.train import models
    >>> model = models.create("lenet300", (28, 28, 1), 10)
    >>> list(nnx.state(model, nnx.Param))
    ['fc1', 'fc2', 'fc3']
    >>> model = nnx.eval_shape(lambda: models.create("resnet20", (32, 32, 3), 10))
    >>> sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    272474
  """
  if name in LANGUAGE_MODELS:
    if width != 1:
      raise ValueError(f"{name} takes its sizes from `sizes`; width must be 1.0, got {width!r}.")
    return LANGUAGE_MODELS[name](num_classes, **dict(sizes or {}), rngs=nnx.Rngs(seed))
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(names())}.")
  if name in SCALABLE:
    return MODELS[name](tuple(input_shape), num_classes, nnx.Rngs(seed), width=width)
  if width != 1:
    raise ValueError(f"{name} has fixed layer widths; width must be 1.0, got {width!r}.")
  return MODELS[name](tuple(input_shape), num_classes, nnx.Rngs(seed))


def from_config(
  model_config: Any, input_shape: Sequence[int], num_classes: int, *, seed: int = 0
) -> nnx.Module:
  """:func:`create` with a run's ``config.model`` fields (name, width, the LM's sizes).

  Examples:
    >>> from jaxprune.train import config as config_lib, models
    >>> m = config_lib.default_config().model
    >>> m.update(name="charlm", dim=32, depth=1, heads=4, kv_heads=2, mlp_dim=64)
    >>> model = nnx.eval_shape(lambda: models.from_config(m, (16,), 50))
    >>> model.blocks[0].attn.q_proj.kernel.shape, model.head.kernel.shape
    ((32, 32), (32, 50))
  """
  m = model_config
  return create(m.name, input_shape, num_classes, seed=seed, width=m.width, sizes=lm_sizes(m))


def lm_sizes(model_config: Any) -> dict[str, int]:
  """The language model's constructor sizes from ``config.model``."""
  m = model_config
  return {
    "dim": m.dim,
    "depth": m.depth,
    "num_heads": m.heads,
    "num_kv_heads": m.kv_heads,
    "mlp_dim": m.mlp_dim,
  }
