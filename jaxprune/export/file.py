"""A compact file for a pruned model: kept values only, positions coded per layer.

Layout of a ``.jxp`` file (version 3): the 8 bytes ``JAXPRUNE``, one version byte, the
length of the rest of the file (little-endian ``uint64``) and a CRC-32 (``uint32``) of
that length and the rest, then one xz (LZMA, Python's standard ``lzma``) stream holding:
a little-endian ``uint32`` header length, the header (UTF-8 JSON: the tree structure,
and per leaf its dtype, shape, coding and where its bytes are), then the bytes of every
leaf. No pickle: loading reads JSON and raw arrays only. A damaged file (cut short, a
byte changed) is an error that names the file and says what is wrong, never arrays.
Versions 1 and 2 (without length and CRC) are still read.

Per leaf, the smallest of three codings (counted before compression):

* ``dense``: every element;
* ``bitmask``: the kept values, plus one bit per element (``np.packbits``);
* ``delta``: the kept values, plus the gaps between consecutive kept flat indices, in
  the smallest unsigned integer type that holds the largest gap.

Kept values are byte-shuffled (all first bytes, then all second bytes, ...), which
groups the exponent bytes of floats so the compressor finds their redundancy (the
HDF5 / Blosc "shuffle" filter). With ``quantize="int8"`` weight matrices and conv
kernels (float leaves with ``ndim >= 2``) are stored as symmetric int8 with one float32
scale per output channel (:func:`jaxprune.quantize`); zeros stay zeros.

With ``quantize="shared"`` (Deep Compression's weight sharing, Han et al. 2016) each
weight matrix / conv kernel stores a float32 codebook of at most ``2**bits`` centroids
(:func:`kmeans_1d`: 1-D k-means over its kept values, linear initialisation over
``[min, max]``, :data:`KMEANS_ITERATIONS` Lloyd iterations, deterministic) and one
``bits``-bit centroid index per kept value, packed lowest bit first for 1, 2, 4 and 8
bits and one per byte for 3, 5, 6 and 7 (which xz compresses better: see
:func:`_pack_bits`). Pruned positions are
not stored and load as exact zeros; a kept weight loads as its centroid, the mean of its
cluster (zero only if that mean is exactly zero: magnitude-pruned weights keep a gap
around zero, so in practice never). Huffman coding is left to the xz stream.
"""

from __future__ import annotations

import json
import lzma
import os
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import fileio
from jaxprune import tree as tree_lib
from jaxprune.quantization import QuantizedArray, compressed_size, dequantize
from jaxprune.quantization import quantize as int8_quantize

MAGIC = b"JAXPRUNE"
VERSION = 3  # what save writes: versions 1 and 2 plus the length and CRC-32
READS = (1, 2, 3)  # 1: the first format; 2: version 1 with weight-shared leaves
_CHECKED = struct.Struct("<QI")  # version 3: length of what follows the CRC, CRC-32
_LOAD = "jaxprune.export.load: "
QUANTIZE = (None, "int8", "shared")
DEFAULT_BITS = 5
KMEANS_ITERATIONS = 30
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# LZMA2 at preset 9 with no literal context (lc = lp = pb = 0): kept values and gaps are
# close to independent symbols, so order-0 coding beats LZMA's default context (~2%).
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "lc": 0, "lp": 0, "pb": 0}]


class _Writer:
  """Appends leaves' bytes to one buffer and records ``[offset, nbytes]`` for each."""

  def __init__(self):
    self.chunks: list[bytes] = []
    self.offset = 0

  def add(self, data: bytes) -> list[int]:
    self.chunks.append(data)
    self.offset += len(data)
    return [self.offset - len(data), len(data)]


def _shuffle(values: np.ndarray) -> bytes:
  """The bytes of ``values`` grouped by byte position (all first bytes, then all second...)."""
  raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
  return raw.reshape(-1, values.dtype.itemsize).T.tobytes()


def _unshuffle(data: bytes, dtype: np.dtype, count: int) -> np.ndarray:
  raw = np.frombuffer(data, np.uint8).reshape(dtype.itemsize, count)
  return np.ascontiguousarray(raw.T).reshape(-1).view(dtype)


def _nonzero_bits(x: np.ndarray) -> np.ndarray:
  """Where ``x`` is not all-zero bits (``-0.0`` and NaN count as values to keep)."""
  raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
  return np.asarray(raw.reshape(*x.shape, x.dtype.itemsize).any(-1))


def _as_array(x: Any, path: str) -> np.ndarray:
  """``x`` as a numpy array of numbers, or a ``TypeError`` naming the leaf."""
  dtype = getattr(x, "dtype", None)
  if tree_lib.is_key(x):
    raise TypeError(
      f"jaxprune.export.save: {path!r} is a PRNG key array ({dtype}), which the file cannot "
      "hold; save jax.random.key_data(key) (uint32) and rebuild it with "
      "jax.random.wrap_key_data, or leave the key out."
    )
  array = np.asarray(x)
  numeric = array.dtype.kind in "biufc" or (
    array.dtype.kind == "V" and array.dtype.type.__module__.startswith("ml_dtypes")
  )
  if not numeric or array.dtype.fields is not None:
    raise TypeError(
      f"jaxprune.export.save: {path!r} has dtype {array.dtype}; the file holds arrays of "
      "booleans, integers, floats (bfloat16 and float8 included) and complex numbers."
    )
  if not array.dtype.isnative:  # '>f4' (np.load of a big-endian .npy): the file is little-endian
    array = array.astype(array.dtype.newbyteorder("="))
  return array


def _index_dtype(largest: int) -> np.dtype:
  for dtype in (np.uint8, np.uint16, np.uint32):
    if largest <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  return np.dtype(np.uint64)


def _assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """Index of the nearest of the sorted ``centroids``; a tie goes to the lower one."""
  return np.searchsorted((centroids[:-1] + centroids[1:]) / 2, values, side="left")


def kmeans_1d(
  values: Any, bits: int = DEFAULT_BITS, iterations: int = KMEANS_ITERATIONS
) -> tuple[np.ndarray, np.ndarray]:
  """Deep Compression's weight sharing: a codebook and one centroid index per value.

  1-D k-means in float64: ``min(2**bits, len(values))`` centroids initialised evenly
  over ``[min, max]`` (Han et al.'s linear initialisation), ``iterations`` Lloyd steps
  (nearest centroid, a tie to the lower; an empty cluster keeps its centroid), then
  every centroid the mean of its final cluster. Unused centroids are dropped, so the
  codebook is sorted and holds at most ``2**bits`` entries. Deterministic.

  Args:
    values: the values to share (any shape; flattened).
    bits: index width, 1 to 8.
    iterations: Lloyd steps.

  Returns:
    ``(codebook, index)``: float32 centroids and ``uint8`` indices, ``codebook[index]``
    the shared values.

  Raises:
    ValueError: ``bits`` is not in 1..8, or a value is NaN, infinite or beyond float32's
      range.

  Examples:
    >>> from jaxprune.export import kmeans_1d
    >>> codebook, index = kmeans_1d([-1.0, -0.9, 0.5, 0.6, 2.0], bits=2)
    >>> codebook.tolist(), index.tolist()
    ([-0.949999988079071, 0.5, 0.6000000238418579, 2.0], [0, 0, 1, 2, 3])
  """
  _check_bits(bits)
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size == 0:
    return np.zeros(0, np.float32), np.zeros(0, np.uint8)
  if not np.isfinite(v).all():
    raise ValueError("jaxprune.export: weight sharing needs finite values (found NaN or inf).")
  if np.abs(v).max() > _FLOAT32_MAX:  # float64 values: the codebook would hold inf
    raise ValueError(
      f"jaxprune.export: weight sharing stores float32 centroids; found {v[np.abs(v).argmax()]}, "
      "beyond float32's range."
    )
  centroids = np.unique(np.linspace(v.min(), v.max(), min(1 << bits, v.size)))
  for _ in range(iterations):
    index = _assign(v, centroids)
    counts = np.bincount(index, minlength=centroids.size)
    sums = np.bincount(index, weights=v, minlength=centroids.size)
    centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
  index = _assign(v, centroids)
  counts = np.bincount(index, minlength=centroids.size)
  sums = np.bincount(index, weights=v, minlength=centroids.size)
  used = np.flatnonzero(counts)
  renumber = np.zeros(centroids.size, np.int64)
  renumber[used] = np.arange(used.size)
  return (sums[used] / counts[used]).astype(np.float32), renumber[index].astype(np.uint8)


def _check_bits(bits: Any) -> None:
  if type(bits) is not int or not 1 <= bits <= 8:
    raise ValueError(f"jaxprune.export: bits must be an integer from 1 to 8, got {bits!r}.")


def _pack_bits(index: np.ndarray, bits: int) -> bytes:
  """``bits`` low bits of each ``uint8`` index, concatenated lowest bit first.

  Widths that do not divide 8 (3, 5, 6, 7) keep one index per byte instead: xz codes
  bytes, and indices straddling byte boundaries hide their skewed distribution from it
  (LeNet-300-100 at 5 bits: 28,821 bytes packed, 27,209 one per byte).
  """
  if 8 % bits:
    return index.astype(np.uint8).tobytes()
  planes = np.unpackbits(index.reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
  return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
  if 8 % bits:
    return np.frombuffer(data, np.uint8, count=count)
  stream = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits, bitorder="little")
  return np.packbits(stream.reshape(count, bits), axis=1, bitorder="little").reshape(-1)


def _positions(
  kept: np.ndarray, value_bytes: float, allow_dense: bool = True
) -> tuple[str, bytes, str | None]:
  """The smallest coding of the kept positions: ``(coding, bytes, index dtype)``."""
  flat = kept.reshape(-1)
  nnz, size = int(flat.sum()), flat.size
  index = np.flatnonzero(flat)
  gaps = np.diff(index, prepend=-1) - 1
  gap_dtype = _index_dtype(int(gaps.max()) if nnz else 0)
  options = {
    "dense": size * value_bytes,
    "bitmask": nnz * value_bytes + -(-size // 8),
    "delta": nnz * value_bytes + nnz * gap_dtype.itemsize,
  }
  if not allow_dense:
    del options["dense"]
  coding = min(options, key=lambda k: (options[k], k != "dense"))
  if coding == "bitmask":
    return coding, np.packbits(flat).tobytes(), None
  if coding == "delta":
    return coding, gaps.astype(gap_dtype).tobytes(), gap_dtype.name
  return coding, b"", None


def _kept_positions(size: int, record: dict, data: bytes) -> np.ndarray:
  """Flat indices of the kept values, decoded from a leaf's record."""
  start, nbytes = record["positions"]
  if record["coding"] == "bitmask":
    bits = np.unpackbits(np.frombuffer(data[start : start + nbytes], np.uint8), count=size)
    return np.flatnonzero(bits)
  gaps = np.frombuffer(data[start : start + nbytes], np.dtype(record["index_dtype"]))
  return np.cumsum(gaps.astype(np.int64) + 1) - 1


def _check_finite(array: np.ndarray, path: str) -> None:
  """int8 scales come from each output channel's largest |w|: NaN or inf would spoil it."""
  bad = ~np.isfinite(array)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    channels = np.flatnonzero(bad.reshape(-1, array.shape[-1]).any(0)).tolist()
    raise ValueError(
      f"jaxprune.export.save: {path!r} has {array[index]} at {list(index)}, in output "
      f"channel {index[-1]} ({len(channels)} channel(s) with NaN or inf: {channels[:8]}); "
      "quantize='int8' needs finite weights (their channel's scale is max |w| / 127)."
    )
  # float64 weights: in float32 their scale would be inf and their values NaN
  if array.dtype.itemsize > 4 and (big := np.abs(array) > _FLOAT32_MAX).any():
    index = tuple(int(i) for i in np.argwhere(big)[0])
    raise ValueError(
      f"jaxprune.export.save: {path!r} has {array[index]} at {list(index)}, beyond float32's "
      "range; quantize='int8' computes in float32 (scales max |w| / 127)."
    )


def _encode_leaf(
  x: Any, mask: Any, path: str, quantize: str | None, bits: int, out: _Writer
) -> dict:
  array = _as_array(x, path)
  record: dict[str, Any] = {"dtype": array.dtype.name, "shape": list(array.shape)}
  if mask is not None:
    kept = np.asarray(mask, bool)
    if kept.shape != array.shape:
      raise ValueError(
        f"jaxprune.export.save: the mask of {path!r} is {kept.shape}, the param {array.shape}."
      )
    if (array[~kept] != 0).any():  # -0.0 (what w * mask gives) is zero; NaN is not
      raise ValueError(
        f"jaxprune.export.save: {path!r} has nonzero values where its mask prunes; save "
        "jaxprune.apply_mask(params, masks), or pass masks=None to keep every nonzero."
      )
  else:
    kept = _nonzero_bits(array)
  values = array
  if quantize == "shared" and tree_lib.default_where(path, array):
    try:
      codebook, index = kmeans_1d(array[kept], bits)
    except ValueError as e:
      raise ValueError(f"jaxprune.export.save: {path!r}: {e}") from None
    coding, positions, index_dtype = _positions(kept, bits / 8, allow_dense=False)
    record.update(coding=coding, bits=bits, nnz=int(kept.sum()))
    record["codebook"] = out.add(codebook.tobytes())
    record["positions"] = out.add(positions)
    if index_dtype is not None:
      record["index_dtype"] = index_dtype
    record["indices"] = out.add(_pack_bits(index, bits))
    return record
  if quantize == "int8" and tree_lib.default_where(path, array):
    _check_finite(array, path)
    q = int8_quantize({"w": array}, where=lambda *_: True)["w"]
    values = np.asarray(q.values)
    record["scale"] = out.add(np.asarray(q.scale, np.float32).tobytes())
    record["scale_shape"] = list(np.shape(q.scale))
  record["values_dtype"] = values.dtype.name
  coding, positions, index_dtype = _positions(kept, values.dtype.itemsize)
  record["coding"] = coding
  if coding != "dense":
    record["positions"] = out.add(positions)
    record["nnz"] = int(kept.sum())
    if index_dtype is not None:
      record["index_dtype"] = index_dtype
    values = values[kept]
  elif mask is not None:  # -0.0 where the mask prunes loads as 0.0, as in the other codings
    values = np.where(kept, values, np.zeros((), values.dtype))
  record["values"] = out.add(_shuffle(values))
  return record


def _decode_shared(record: dict, data: bytes, shape: tuple, size: int) -> np.ndarray:
  start, nbytes = record["codebook"]
  codebook = np.frombuffer(data[start : start + nbytes], np.float32)
  start, nbytes = record["indices"]
  index = _unpack_bits(data[start : start + nbytes], record["bits"], record["nnz"])
  full = np.zeros(size, np.float32)
  full[_kept_positions(size, record, data)] = codebook[index]
  return full.reshape(shape).astype(np.dtype(jnp.dtype(record["dtype"])))


def _decode_leaf(record: dict, data: bytes) -> np.ndarray:
  shape = tuple(record["shape"])
  size = int(np.prod(shape, dtype=np.int64))
  if "codebook" in record:
    return _decode_shared(record, data, shape, size)
  values_dtype = np.dtype(jnp.dtype(record["values_dtype"]))
  start, nbytes = record["values"]
  count = size if record["coding"] == "dense" else record["nnz"]
  values = _unshuffle(data[start : start + nbytes], values_dtype, count)
  if record["coding"] == "dense":
    full = values.reshape(shape)
  else:
    full = np.zeros(size, values_dtype)
    full[_kept_positions(size, record, data)] = values
    full = full.reshape(shape)
  dtype = np.dtype(jnp.dtype(record["dtype"]))
  if "scale" in record:
    start, nbytes = record["scale"]
    scale = np.frombuffer(data[start : start + nbytes], np.float32).reshape(record["scale_shape"])
    quantized = QuantizedArray(jnp.asarray(full), jnp.asarray(scale))
    return np.asarray(dequantize(quantized)).astype(dtype)
  return full.astype(dtype, copy=False)


_PLAIN = {
  "dict": "a dict (dict(d), flax.core.unfreeze(params), nnx.to_pure_dict(state))",
  "list": "a list",
  "tuple": "a dict (x._asdict() for a NamedTuple) or a tuple",
}


def _encode(node: Any, mask: Any, path: str, quantize: str | None, bits: int, out: _Writer) -> Any:
  """The JSON structure of ``node``; leaves' bytes go to ``out``."""
  if node is None:
    return None
  if type(node) not in (dict, list, tuple) and isinstance(node, Mapping | list | tuple):
    kind = "dict" if isinstance(node, Mapping) else "list" if isinstance(node, list) else "tuple"
    raise TypeError(
      f"jaxprune.export.save: {path or '/'!r} is a {type(node).__name__}, which would load "
      f"as a plain {kind} (another pytree structure); save {_PLAIN[kind]} instead."
    )
  if isinstance(node, Mapping):
    if not all(isinstance(k, str) or type(k) is int for k in node):
      raise TypeError(
        f"jaxprune.export.save: the dict at {path or '/'!r} has keys other than strings and "
        "integers (nnx.List layers give integer keys)."
      )
    masks = mask if isinstance(mask, Mapping) else {}
    return {
      "dict": [
        [k, _encode(v, masks.get(k), f"{path}/{k}" if path else k, quantize, bits, out)]
        for k, v in node.items()
      ]
    }
  if isinstance(node, list | tuple):
    masks = mask if isinstance(mask, list | tuple) else [None] * len(node)
    kind = "list" if isinstance(node, list) else "tuple"
    return {
      kind: [
        _encode(v, m, f"{path}/{i}" if path else str(i), quantize, bits, out)
        for i, (v, m) in enumerate(zip(node, masks))
      ]
    }
  if isinstance(node, jax.Array | np.ndarray | np.generic | int | float | bool):
    return {"leaf": _encode_leaf(node, mask, path, quantize, bits, out)}
  raise TypeError(
    f"jaxprune.export.save: cannot store {type(node).__name__} at {path or '/'!r}; the file "
    "holds dicts, lists, tuples, None and arrays (for an nnx.State, save "
    "nnx.to_pure_dict(state))."
  )


def _decode(node: Any, data: bytes) -> Any:
  if node is None:
    return None
  if "dict" in node:
    return {k: _decode(v, data) for k, v in node["dict"]}
  if "list" in node:
    return [_decode(v, data) for v in node["list"]]
  if "tuple" in node:
    return tuple(_decode(v, data) for v in node["tuple"])
  return _decode_leaf(node["leaf"], data)


def _check_masks(params: Any, masks: Any) -> Any:
  """``masks`` in the containers of ``params`` (same leaf paths, else ``ValueError``).

  Paths compare as strings, so a mask dict keyed ``"0"`` for params keyed ``0`` (an
  ``nnx.List``), or an ``nnx.State`` of masks for a plain dict, fits; re-housing it in
  the params' containers lets ``_encode`` look each mask up by the param's own key.
  """
  if masks is None:
    return None
  tree_lib.check_same_structure(params, masks)
  return tree_lib.restructure(params, masks)


def to_bytes(
  params: Any, masks: Any = None, quantize: str | None = None, bits: int | None = None
) -> bytes:
  """The bytes :func:`save` writes (see :func:`save` for the arguments)."""
  if quantize not in QUANTIZE:
    raise ValueError(
      f"jaxprune.export.save: quantize must be None, 'int8' or 'shared', got {quantize!r}."
    )
  if bits is not None and quantize != "shared":
    raise ValueError(
      f"jaxprune.export.save: bits={bits!r} is for quantize='shared' (got quantize={quantize!r})."
    )
  bits = DEFAULT_BITS if bits is None else bits
  _check_bits(bits)
  masks = _check_masks(params, masks)
  out = _Writer()
  structure = _encode(params, masks, "", quantize, bits, out)
  header = json.dumps({"format": "jaxprune", "version": VERSION, "tree": structure}).encode()
  payload = struct.pack("<I", len(header)) + header + b"".join(out.chunks)
  stream = lzma.compress(payload, format=lzma.FORMAT_XZ, filters=_FILTERS)
  length = struct.pack("<Q", len(stream))
  crc = zlib.crc32(stream, zlib.crc32(length))
  return MAGIC + bytes([VERSION]) + length + struct.pack("<I", crc) + stream


class DamagedFileError(ValueError):
  """A ``.jxp`` file that is cut short or altered: its message names the file and the damage."""


def _stream(blob: bytes, source: str) -> bytes:
  """The xz stream of ``blob`` after its magic, version and (version 3) length and CRC."""
  start = len(MAGIC) + 1
  if len(blob) < start and blob == MAGIC[: len(blob)]:
    raise DamagedFileError(f"{_LOAD}{source} is damaged (truncated at byte {len(blob)}).")
  if blob[: len(MAGIC)] != MAGIC:
    same = sum(a == b for a, b in zip(blob[: len(MAGIC)], MAGIC))
    if same >= len(MAGIC) - 2 and len(blob) > start and blob[len(MAGIC)] in READS:
      raise DamagedFileError(f"{_LOAD}{source} is damaged (its JAXPRUNE header is altered).")
    raise ValueError(f"{_LOAD}{source} is not a jaxprune file (no JAXPRUNE header).")
  version = blob[len(MAGIC)]
  if version not in READS:
    raise ValueError(
      f"{_LOAD}{source} has file version {version}; this jaxprune reads "
      f"versions {', '.join(map(str, READS))} (a newer jaxprune wrote it, or the file is damaged)."
    )
  if version < 3:
    return blob[start:]
  end = start + _CHECKED.size
  if len(blob) < end:
    raise DamagedFileError(f"{_LOAD}{source} is damaged (truncated at byte {len(blob)}).")
  length, crc = _CHECKED.unpack(blob[start:end])
  stream = blob[end:]
  if zlib.crc32(stream, zlib.crc32(blob[start : start + 8])) == crc and len(stream) == length:
    return stream
  if len(stream) < length:
    raise DamagedFileError(
      f"{_LOAD}{source} is damaged (truncated at byte {len(blob)} of {end + length})."
    )
  raise DamagedFileError(f"{_LOAD}{source} is damaged (checksum mismatch).")


def _read(blob: bytes, source: str) -> Any:
  stream = _stream(blob, source)
  try:
    payload = lzma.decompress(stream, format=lzma.FORMAT_XZ)
  except lzma.LZMAError as e:  # versions 1 and 2: the xz stream's own checks
    if "ended before" in str(e):
      raise DamagedFileError(
        f"{_LOAD}{source} is damaged (truncated at byte {len(blob)})."
      ) from None
    raise DamagedFileError(f"{_LOAD}{source} is damaged (corrupt data: {e}).") from None
  try:
    (length,) = struct.unpack("<I", payload[:4])
    header = json.loads(payload[4 : 4 + length])
    return _decode(header["tree"], payload[4 + length :])
  except (ValueError, KeyError, TypeError, IndexError, struct.error) as e:
    raise DamagedFileError(f"{_LOAD}{source} is damaged (unreadable content: {e}).") from None


def from_bytes(blob: bytes) -> Any:
  """The pytree in bytes written by :func:`to_bytes` / :func:`save`.

  Raises:
    DamagedFileError: the bytes are cut short or altered (a ``ValueError``).
    ValueError: they are not a jaxprune file, or of a newer version.
  """
  return _read(bytes(blob), "the data")


def save(
  path: str | os.PathLike,
  params: Any,
  masks: Any = None,
  quantize: str | None = None,
  bits: int | None = None,
) -> int:
  """Writes a pruned params pytree to a compact file; returns its size in bytes.

  Only the kept values are stored, with their positions as a bitmask or delta-coded
  indices (whichever is smaller for the layer); leaves where neither saves bytes are
  stored dense. The structure and dtypes are JSON, the whole file one xz stream with
  its length and CRC-32. The file is replaced atomically (:mod:`jaxprune.fileio`): a save
  that fails or is killed leaves the file that was there whole.

  Args:
    path: the file to write (``.jxp`` by convention).
    params: a pytree of dicts (string or integer keys), lists, tuples, ``None`` and arrays (a
      Linen params dict; for an ``nnx.State`` pass ``nnx.to_pure_dict(state)``). Other
      containers (a NamedTuple, a FrozenDict) would load as plain tuples and dicts, so
      they are refused (``TypeError``), as are PRNG keys and non-numeric arrays.
    masks: optional bool masks with the structure of ``params`` (``None`` leaves:
      unpruned). With masks, a leaf's positions are its mask and its pruned entries
      must be zero (else ``ValueError``; ``-0.0``, as ``w * mask`` gives, is zero and
      loads as ``0.0``); without, every leaf keeps its nonzero entries (by bits:
      ``-0.0`` is kept).
    quantize: ``None`` (values as they are: float32, bfloat16, ...), ``"int8"``
      (weight matrices and conv kernels as int8 with per-output-channel scales) or
      ``"shared"`` (weight matrices and conv kernels as a float32 codebook of at most
      ``2**bits`` k-means centroids per leaf and a ``bits``-bit index per kept weight:
      :func:`kmeans_1d`); other leaves (biases, norms) are stored as they are. Which
      leaves are quantized is what pruning selects by default
      (:func:`jaxprune.tree.default_where`: float leaves with ``ndim >= 2`` not named
      ``bias``, so the 2-D ``(heads, head_dim)`` biases of attention / ``DenseGeneral``
      layers stay as they are). The int8 output channel is the last axis: ``head_dim`` for a
      ``DenseGeneral`` kernel ``[in, heads, head_dim]`` (one scale shared by the heads),
      the input axis for a kernel stored ``[out, in]``.
    bits: index width for ``quantize="shared"``, 1 to 8 (default 5, Deep
      Compression's choice for fully connected layers); an error with other modes.

  Returns:
    The number of bytes written.

  Raises:
    TypeError: a container other than dict / list / tuple, a PRNG key or a non-numeric
      array (the message names the leaf).
    ValueError: a mask that does not fit its leaf or keeps a pruned value nonzero, a NaN
      or inf weight with ``quantize="int8"`` or ``"shared"`` (or a float64 one beyond
      float32's range, which their float32 scales / codebooks cannot hold), a bad
      ``quantize`` / ``bits``.

  Examples:
    >>> import os, tempfile, numpy as np, jax, jaxprune
    >>> from jaxprune import export
    >>> w = {"w": jax.random.normal(jax.random.key(0), (300, 100)), "b": np.zeros(100)}
    >>> pruned = jaxprune.apply_mask(w, jaxprune.magnitude(0.9).masks(w))
    >>> path = os.path.join(tempfile.mkdtemp(), "model.jxp")
    >>> export.save(path, pruned) < 300 * 100 * 4 / 5
    True
    >>> bool((export.load(path)["w"] == pruned["w"]).all())
    True
  """
  blob = to_bytes(params, masks, quantize, bits)
  fileio.write_bytes(path, blob)
  return len(blob)


def load(path: str | os.PathLike) -> Any:
  """Reads a file written by :func:`save`: the same pytree, with numpy arrays.

  Float leaves come back bitwise equal; int8-quantized leaves come back as the
  dequantized values (``jaxprune.dequantize(jaxprune.quantize(w))``) in their dtype;
  weight-shared leaves as their centroids (exact zeros where pruned) in their dtype.

  Raises:
    DamagedFileError: the file is cut short or altered; the message names the file and
      says "truncated at byte N" or "checksum mismatch" (a ``ValueError``).
    ValueError: the file is not a jaxprune file, or of a newer version.
  """
  with open(path, "rb") as f:
    blob = f.read()
  return _read(blob, f"file {os.fspath(path)!r}")


def baseline_sizes(params: Any) -> dict[str, int]:
  """The first two of :func:`sizes`: ``{"dense float32": ..., ".npz + gzip": ...}`` bytes."""
  leaves = [x for x in jax.tree.leaves(params) if x is not None]
  return {
    "dense float32": sum(int(np.size(x)) * 4 for x in leaves),
    ".npz + gzip": compressed_size(params),
  }


def sizes(params: Any, masks: Any = None, bits: int = DEFAULT_BITS) -> dict[str, int]:
  """Bytes of ``params`` five ways: dense float32, ``.npz`` + gzip, this file, int8, shared.

  The last key is ``f"jaxprune shared {bits}-bit"`` (``quantize="shared"``).

  Examples:
    >>> import jax, jaxprune
    >>> from jaxprune import export
    >>> w = {"w": jax.random.normal(jax.random.key(0), (300, 100))}
    >>> s = export.sizes(jaxprune.apply_mask(w, jaxprune.magnitude(0.9).masks(w)))
    >>> list(s), s["dense float32"]
    (['dense float32', '.npz + gzip', 'jaxprune float32', 'jaxprune int8', 'jaxprune shared 5-bit'], 120000)
  """
  return {
    **baseline_sizes(params),
    "jaxprune float32": len(to_bytes(params, masks)),
    "jaxprune int8": len(to_bytes(params, masks, quantize="int8")),
    f"jaxprune shared {bits}-bit": len(to_bytes(params, masks, quantize="shared", bits=bits)),
  }
