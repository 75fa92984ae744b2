"""What batching reads: the :class:`Source` protocol, its in-memory splits, :class:`Dataset`.

A split is anything with ``len(split)`` and ``split.take(indices) -> (images, labels)``;
:mod:`jaxprune.train.data` batches any of them, whether they hold arrays
(:class:`Split`), slice another split (:class:`Subset`) or read TFDS records
(:class:`jaxprune.train.tfds_source.TfdsSplit`). Images are ``float32`` in ``[0, 1]``
shaped ``(N, H, W, C)``; labels are ``int32``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


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
class Subset:
  """The examples of ``source`` at ``indices``, in that order (a validation slice).

  Examples:
    >>> import numpy as np
    >>> from jaxprune.train import data
    >>> train = data.load("digits").train
    >>> last = data.Subset(train, np.arange(len(train) - 100, len(train)))
    >>> len(last), last.take(np.array([0]))[0].shape
    (100, (1, 8, 8, 1))
  """

  source: Source
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.source.take(np.asarray(self.indices)[indices])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A named dataset: train and test splits, the image shape and the class count."""

  name: str
  train: Source
  test: Source
  image_shape: tuple[int, ...]
  num_classes: int
