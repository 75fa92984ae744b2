"""TFDS datasets as random-access sources, through ``tfds.data_source`` (no TensorFlow).

``tfds.data_source`` reads the ArrayRecord files of a prepared dataset, one example at
a time, in any order: exactly what deterministic shuffling and resuming need. Nothing
is downloaded unless asked (``download=True``): on a machine without network a
missing dataset raises :class:`DatasetNotPrepared`, whose message says how to prepare
it elsewhere and where to copy it.

Tests use ``tfds.testing.mock_data``, which serves ``tfds.data_source`` with random
examples of the right shapes and the real metadata (class count, image shape), no
files and no TensorFlow needed (tensorflow-datasets 4.9.10). Its mocked source lacks a
working batched ``__getitems__``, so :class:`TfdsSplit` reads examples one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxprune.train.sources import Dataset

IMAGE_KEY, LABEL_KEY = "image", "label"


class DatasetNotPrepared(FileNotFoundError):
  """A TFDS dataset is not in ``data_dir`` and may not be downloaded here."""


def base_name(name: str) -> str:
  """``"cifar10/config:3.0.2"`` -> ``"cifar10"``."""
  return name.split(":")[0].split("/")[0]


def is_tfds_name(name: str) -> bool:
  """Whether TFDS knows a builder of this name (no data is looked for)."""
  import tensorflow_datasets as tfds

  return base_name(name) in tfds.list_builders(with_community_datasets=False)


def how_to_prepare(name: str, data_dir: str | None, dataset_dir: str) -> str:
  """The instructions of :class:`DatasetNotPrepared`."""
  target = data_dir or "~/tensorflow_datasets"
  return (
    f"TFDS dataset {name!r} is not prepared in {dataset_dir} and it is not downloaded "
    "here (data.download=False, or no network). Either\n"
    "  * on a machine with network (and TensorFlow, which most builders need to "
    "prepare), run\n"
    f'      python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, '
    f"data_dir='DIR', file_format='array_record').download_and_prepare()\"\n"
    f"    then copy DIR/{base_name(name)} into {target}; or\n"
    f"  * copy an already prepared {base_name(name)}/ directory (ArrayRecord files and "
    f"dataset_info.json) into {target}.\n"
    "tfds.data_source reads only the array_record file format. Then pass "
    f"--config.data.data_dir={target} (or set TFDS_DATA_DIR)."
  )


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
  """A TFDS split as a :class:`jaxprune.train.sources.Source`: images in ``[0, 1]``.

  Attributes:
    source: the ``tfds.data_source`` of one split (``len`` and ``[i]`` give dicts).
    image_key: the feature holding the image (``uint8`` ``(H, W, C)``).
    label_key: the feature holding the integer class.
  """

  source: Sequence[Any]
  image_key: str = IMAGE_KEY
  label_key: str = LABEL_KEY

  def __len__(self) -> int:
    return len(self.source)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    records = [self.source[int(i)] for i in indices]
    images = np.stack([r[self.image_key] for r in records]).astype(np.float32) / np.float32(255)
    labels = np.asarray([r[self.label_key] for r in records], np.int32)
    return images, labels


def load(
  name: str,
  *,
  data_dir: str | None = None,
  download: bool = False,
  train_split: str = "train",
  test_split: str = "test",
) -> Dataset:
  """A prepared TFDS image-classification dataset as a :class:`~jaxprune.train.sources.Dataset`.

  Args:
    name: a TFDS name, optionally with config and version (``"cifar10:3.0.2"``).
    data_dir: the TFDS data directory (``None``: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    download: let TFDS download and prepare the dataset when it is missing.
    train_split: the split to train on (TFDS split syntax: ``"train[:90%]"``...).
    test_split: the split to evaluate on.

  Returns:
    The dataset; examples are decoded when a batch takes them.

  Raises:
    ValueError: for a name TFDS does not know, or features that are not fixed-size
      ``image`` and ``label``.
    DatasetNotPrepared: when the data is not in ``data_dir`` and not downloaded.
  """
  import tensorflow_datasets as tfds

  if not is_tfds_name(name):
    raise ValueError(f"Unknown TFDS dataset {name!r} (see tfds.list_builders()).")
  builder = tfds.builder(name, data_dir=data_dir)
  features = builder.info.features
  if not isinstance(features, tfds.features.FeaturesDict):
    raise ValueError(
      f"TFDS dataset {name!r} has features {features!r}; the training pipeline "
      f"needs a dict of {IMAGE_KEY!r} and {LABEL_KEY!r} (image classification)."
    )
  for key in (IMAGE_KEY, LABEL_KEY):
    if key not in features:
      raise ValueError(
        f"TFDS dataset {name!r} has features {list(features)}; the training pipeline "
        f"needs {IMAGE_KEY!r} and {LABEL_KEY!r} (image classification)."
      )
  image_shape, label = features[IMAGE_KEY].shape, features[LABEL_KEY]
  num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
  if not isinstance(image_shape, tuple) or num_classes is None:
    raise ValueError(
      f"TFDS dataset {name!r} has {IMAGE_KEY!r} {features[IMAGE_KEY]!r} and {LABEL_KEY!r} "
      f"{label!r}; the training pipeline needs one image array and a class label."
    )
  shape = tuple(image_shape)
  if None in shape:
    raise ValueError(f"TFDS dataset {name!r} has images of varying size {shape}; need fixed.")
  try:
    train, test = tfds.data_source(
      name, split=[train_split, test_split], data_dir=data_dir, download=download
    )
  except Exception as e:
    if builder.is_prepared():
      raise
    raise DatasetNotPrepared(how_to_prepare(name, data_dir, str(builder.data_dir))) from e
  return Dataset(
    name=name,
    train=TfdsSplit(train),
    test=TfdsSplit(test),
    image_shape=shape,
    num_classes=int(num_classes),
  )
