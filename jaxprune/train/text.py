"""Character-level text that ships with CPython, served like the digits.

``"pydoc_topics"``: the help texts of ``pydoc_data.topics`` (the standard library's
``help()`` topics, joined in sorted key order): 464,970 characters and 103 distinct
ones on Python 3.11 (the text changes between Python versions). The first 90% is the
training text, the rest the validation text; the vocabulary is every character of the
whole text, sorted.

A split is a :class:`~jaxprune.train.sources.Source` of windows: ``take(indices)``
returns ``(inputs, targets)``, both ``int32 (N, seq_len)``, the targets being the inputs
shifted by one character (next-character prediction). Training windows start at every
character (``stride=1``); validation windows do not overlap (``stride=seq_len``), so
each validation character is predicted once. :class:`~jaxprune.train.sources.Dataset`
gets ``image_shape=(seq_len,)`` and ``num_classes=`` the vocabulary size.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxprune.train.sources import Dataset

NAME = "pydoc_topics"
VALIDATION_FRACTION = 0.1


@functools.cache
def topics_text() -> str:
  """The text of ``pydoc_data.topics``: every topic, in sorted key order.

  Examples:
    >>> import sys
    >>> text = topics_text()
    >>> (len(text), len(set(text))) if sys.version_info[:2] == (3, 11) else (464970, 103)
    (464970, 103)
  """
  from pydoc_data import topics

  return "".join(topics.topics[key] for key in sorted(topics.topics))


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Characters <-> ids (the characters sorted by code point).

  Examples:
    >>> vocab = Vocabulary.of("hello")
    >>> vocab.chars, vocab.encode("hole").tolist(), vocab.decode([2, 3])
    ('ehlo', [1, 3, 2, 0], 'lo')
  """

  chars: str

  @classmethod
  def of(cls, text: str) -> Vocabulary:
    return cls("".join(sorted(set(text))))

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(self.chars)}
    unknown = sorted(set(text) - set(lookup))
    if unknown:
      raise ValueError(f"Characters outside the vocabulary: {unknown[:10]!r}.")
    return np.fromiter((lookup[c] for c in text), np.int32, len(text))

  def decode(self, ids: np.ndarray | list[int]) -> str:
    return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))


@dataclasses.dataclass(frozen=True)
class Windows:
  """Windows of ``seq_len + 1`` ids starting every ``stride`` ids: ``(inputs, targets)``.

  Examples:
    >>> import numpy as np
    >>> w = Windows(np.arange(10, dtype=np.int32), seq_len=4, stride=4)
    >>> len(w), [a.tolist() for a in w.take(np.array([1]))]
    (2, [[[4, 5, 6, 7]], [[5, 6, 7, 8]]])
  """

  ids: np.ndarray
  seq_len: int
  stride: int

  def __len__(self) -> int:
    return max(0, (len(self.ids) - self.seq_len - 1) // self.stride + 1)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.asarray(indices, np.int64)[:, None] * self.stride
    window = self.ids[starts + np.arange(self.seq_len + 1)]
    return window[:, :-1], window[:, 1:]


@functools.cache
def load(seq_len: int = 128) -> Dataset:
  """The ``pydoc_topics`` dataset in windows of ``seq_len`` characters (cached).

  Raises:
    ValueError: ``seq_len`` below 1 or longer than the validation text.

  Examples:
    >>> ds = load(64)
    >>> ds.image_shape, ds.num_classes, len(ds.test)
    ((64,), 103, 726)
    >>> x, y = ds.train.take(np.array([0]))
    >>> bool((x[0, 1:] == y[0, :-1]).all())
    True
  """
  text = topics_text()
  vocab = Vocabulary.of(text)
  ids = vocab.encode(text)
  ids.setflags(write=False)
  n_train = round(len(ids) * (1 - VALIDATION_FRACTION))
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}.")
  if seq_len >= len(ids) - n_train:
    raise ValueError(
      f"seq_len {seq_len} is longer than the validation text ({len(ids) - n_train} chars)."
    )
  return Dataset(
    name=NAME,
    train=Windows(ids[:n_train], seq_len, 1),
    test=Windows(ids[n_train:], seq_len, seq_len),
    image_shape=(seq_len,),
    num_classes=len(vocab),
  )


def vocabulary() -> Vocabulary:
  """The vocabulary of ``pydoc_topics`` (ids as in :func:`load`)."""
  return Vocabulary.of(topics_text())
