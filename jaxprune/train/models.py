"""The model zoo: Flax NNX classifiers, created by name.

Layer attributes are named so that natural path order is input -> output (``conv1``,
``conv2``, ``fc1``, ``fc2``, ``fc3``): ``dense_first`` / ``dense_last`` of a pruner then
mean the input and the output layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from flax import nnx


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
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = LeNet5((8, 8, 1), 10, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
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


ModelFn = Callable[[tuple[int, ...], int, nnx.Rngs], nnx.Module]

MODELS: dict[str, ModelFn] = {
  "lenet300": lambda shape, classes, rngs: LeNet300(math.prod(shape), classes, rngs=rngs),
  "lenet5": lambda shape, classes, rngs: LeNet5(shape, classes, rngs=rngs),
}


def names() -> list[str]:
  """The model names :func:`create` knows."""
  return sorted(MODELS)


def create(name: str, input_shape: Sequence[int], num_classes: int, *, seed: int = 0) -> nnx.Module:
  """Creates a model of the zoo for images of ``input_shape`` ``(H, W, C)``.

  Args:
    name: one of :func:`names` (``"lenet300"``, ``"lenet5"``).
    input_shape: the shape of one image, ``(height, width, channels)``.
    num_classes: the number of output logits.
    seed: seeds the parameter initialisation.

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
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(names())}.")
  return MODELS[name](tuple(input_shape), num_classes, nnx.Rngs(seed))
