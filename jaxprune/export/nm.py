"""N:M (2:4) kernels packed into the layout sparse tensor cores consume.

A Flax kernel ``W`` of shape ``[..., in, out]`` computes ``y = x @ W`` over the
contraction axes ``K = prod(shape[:-1])``. The sparse operand of the hardware product is
``A = W.reshape(K, out).T`` (``[out, K]``, contraction minor); N:M keeps ``n`` of every
``m`` consecutive entries of a row of ``A`` (``jaxprune.n_m`` groups the input axis
exactly so). Packed, ``A`` is:

* ``values``: ``[out, K * n / m]``, the kept entries of each group in order;
* ``metadata``: ``uint8 [out, ceil(K * n / m * b / 8)]``, the position (``b = 2`` bits
  for ``m = 4``) of each kept entry inside its group, lowest bits first. For 2:4 and
  ``K % 16 == 0``, ``metadata.view(np.uint16)`` is the metadata of NVIDIA's sparse MMA
  (and of ``nm_pack`` in JAX releases that had ``jax.experimental.sparse.nm``).

2:4 halves the values; the metadata adds 1/8 of a 16-bit kernel (1/16 of float32).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMPacked:
  """An N:M kernel in the hardware layout: ``values`` and ``metadata`` (see the module)."""

  values: Any
  metadata: Any
  n: int = dataclasses.field(metadata={"static": True})
  m: int = dataclasses.field(metadata={"static": True})
  shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})


def _bits(m: int) -> int:
  """Bits per position index: 1, 2, 4 or 8 (a divisor of 8, so bytes hold whole indices)."""
  need = max(1, (m - 1).bit_length())
  return next(b for b in (1, 2, 4, 8) if b >= need)


def _check_pattern(n: Any, m: Any, who: str) -> None:
  """``n`` of every ``m``: integers with ``1 <= n <= m <= 256`` (positions fit a byte)."""
  if type(n) is not int or type(m) is not int:
    raise TypeError(f"{who}: n and m must be integers, got n={n!r}, m={m!r}.")
  if not 1 <= n <= m <= 256:
    raise ValueError(
      f"{who}: an N:M pattern keeps n of every m entries, 1 <= n <= m <= 256; got n={n}, m={m}."
    )


def nm_pack(
  kernel: Any, n: int = 2, m: int = 4, mask: Any = None, name: str = "kernel"
) -> NMPacked:
  """Packs an N:M-sparse kernel: ``n`` values of every ``m`` along the contraction axis.

  Args:
    kernel: a Flax kernel ``[..., in, out]`` (Dense ``[in, out]``, Conv
      ``[h, w, in, out]``) with at most ``n`` nonzeros in every group of ``m``
      consecutive inputs.
    n, m: the pattern (2:4 for NVIDIA Ampere / Hopper sparse tensor cores).
    mask: optional bool mask (e.g. from ``jaxprune.n_m``); its kept entries are the
      ones stored (the kernel must be zero elsewhere). Without it, the nonzeros are
      kept, and a group with fewer than ``n`` takes zeros at its first free positions.
    name: the kernel's name in error messages.

  Returns:
    An :class:`NMPacked`; :func:`nm_unpack` gives the kernel back exactly.

  Raises:
    TypeError: ``n`` or ``m`` is not an integer.
    ValueError: not ``1 <= n <= m <= 256``, the mask's shape is not the kernel's, the
      input axis is not a multiple of ``m``, or a group keeps more than ``n`` entries
      (the message counts them and names the first).

  Examples:
    >>> import jax, jaxprune
    >>> from jaxprune.export import nm_pack, nm_unpack
    >>> w = jax.random.normal(jax.random.key(0), (8, 3))
    >>> mask = jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)).masks({"w": w})["w"]
    >>> packed = nm_pack(w * mask, mask=mask)
    >>> packed.values.shape, packed.metadata.shape, packed.metadata.dtype.name
    ((3, 4), (3, 1), 'uint8')
    >>> bool((nm_unpack(packed) == w * mask).all())
    True
  """
  _check_pattern(n, m, "nm_pack")
  w = np.asarray(kernel)
  if mask is not None and np.shape(mask) != w.shape:
    raise ValueError(
      f"nm_pack: the mask of {name!r} has shape {np.shape(mask)}, the kernel {w.shape}; "
      "pass the kernel's own mask (same shape)."
    )
  if w.ndim < 2:
    raise ValueError(
      f"nm_pack: {name!r} has shape {w.shape}; N:M packs a kernel (ndim >= 2: inputs on "
      "axis -2, outputs on axis -1), not a bias or a scalar."
    )
  if w.shape[-2] % m:
    raise ValueError(
      f"nm_pack: {name!r} has shape {w.shape}; {n}:{m} groups {m} consecutive inputs, so "
      f"the input axis (shape[-2]) must be a multiple of {m}."
    )
  out, k = w.shape[-1], int(np.prod(w.shape[:-1]))  # sizes, not -1: out may be 0
  a = w.reshape(k, out).T.reshape(out, k // m, m)  # [out, groups, m]
  kept = np.asarray(mask, bool).reshape(k, out).T.reshape(a.shape) if mask is not None else a != 0
  if mask is not None and (a[~kept] != 0).any():
    raise ValueError(f"nm_pack: {name!r} has nonzero entries where its mask prunes.")
  counts = kept.sum(-1)
  if (counts > n).any():
    row, group = np.argwhere(counts > n)[0]
    raise ValueError(
      f"nm_pack: {name!r} is not {n}:{m} sparse: {int((counts > n).sum())} groups keep more "
      f"than {n} of {m} (first: output {row}, inputs {group * m}..{group * m + m - 1} keep "
      f"{counts[row, group]})."
    )
  # Fill groups short of n with their first free positions (zeros), then take the n
  # kept positions of each group in increasing order: a stable sort of "not kept".
  need = n - counts
  free_rank = np.cumsum(~kept, axis=-1)
  chosen = kept | (~kept & (free_rank <= need[..., None]))
  index = np.sort(np.argsort(~chosen, axis=-1, kind="stable")[..., :n], axis=-1)
  values = np.take_along_axis(a, index, axis=-1).reshape(out, k // m * n)
  bits = _bits(m)
  per_byte = 8 // bits
  flat = index.reshape(out, k // m * n).astype(np.uint8)
  pad = -flat.shape[1] % per_byte
  flat = np.pad(flat, ((0, 0), (0, pad))).reshape(out, (flat.shape[1] + pad) // per_byte, per_byte)
  shifts = (np.arange(per_byte) * bits).astype(np.uint8)
  metadata = np.bitwise_or.reduce(flat << shifts, axis=-1).astype(np.uint8)
  return NMPacked(values, metadata, n, m, tuple(w.shape))


def nm_unpack(packed: NMPacked) -> np.ndarray:
  """The dense kernel of an :class:`NMPacked` (exactly the packed one).

  Raises:
    TypeError: ``packed`` is not an :class:`NMPacked`.
    ValueError: its arrays do not match its ``n``, ``m`` and ``shape``.
  """
  if not isinstance(packed, NMPacked):
    raise TypeError(
      f"nm_unpack: takes the NMPacked that nm_pack returns, got {type(packed).__name__}."
    )
  n, m = packed.n, packed.m
  _check_pattern(n, m, "nm_unpack")
  values = np.asarray(packed.values)
  out = packed.shape[-1] if packed.shape else 0
  k = int(np.prod(packed.shape[:-1])) if packed.shape else 0
  bits = _bits(m)
  per_byte = 8 // bits
  stored = k // m * n
  want = (out, stored), (out, -(-stored // per_byte))
  got = values.shape, np.shape(packed.metadata)
  if len(packed.shape) < 2 or k % m or got != want:
    raise ValueError(
      f"nm_unpack: values {got[0]} and metadata {got[1]} do not fit a {n}:{m} kernel of "
      f"shape {packed.shape} (expected {want[0]} and {want[1]})."
    )
  shifts = (np.arange(per_byte) * bits).astype(np.uint8)
  meta = np.asarray(packed.metadata, np.uint8)[..., None]
  index = ((meta >> shifts) & ((1 << bits) - 1)).reshape(out, want[1][1] * per_byte)[:, :stored]
  groups = stored // n
  index = index.reshape(out, groups, n)
  if (index >= m).any() or (np.diff(index.astype(np.int16), axis=-1) <= 0).any():
    raise ValueError(
      f"nm_unpack: the metadata holds positions that are not {n} increasing indices "
      f"below {m} per group (damaged, or not from nm_pack)."
    )
  dense = np.zeros((out, groups, m), values.dtype)
  np.put_along_axis(dense, index, values.reshape(out, groups, n), -1)
  return dense.reshape(out, k).T.reshape(packed.shape)


def nm_matmul_available() -> bool:
  """Whether the installed JAX has a sparse N:M matmul (``jax.experimental.sparse.nm``)."""
  return importlib.util.find_spec("jax.experimental.sparse.nm") is not None


def nm_matmul(x: jax.Array, packed: NMPacked) -> jax.Array:
  """``x @ kernel`` with the packed kernel on the GPU's sparse tensor cores.

  Only where the installed JAX ships ``jax.experimental.sparse.nm`` (``nm_spmm``: 2:4,
  16-bit inputs, CUDA / ROCm); JAX 0.10.2, the release jaxprune installs, does not.

  Raises:
    NotImplementedError: the installed JAX has no sparse N:M matmul; the message says
      what to do instead (``x @ nm_unpack(packed)``, a dense matmul).
  """
  if not nm_matmul_available():
    raise NotImplementedError(
      f"nm_matmul: JAX {jax.__version__} has no sparse N:M matmul "
      "(jax.experimental.sparse.nm with nm_spmm, lowered to a sparse dot on Ampere/Hopper "
      "GPUs, is not in this release). Use jnp.asarray(nm_unpack(packed)) with a dense "
      "matmul, or a JAX release that ships jax.experimental.sparse.nm on an NVIDIA GPU."
    )
  if (packed.n, packed.m) != (2, 4) or len(packed.shape) != 2:
    raise NotImplementedError(
      f"nm_matmul: the GPU sparse dot takes 2:4 Dense kernels, got {packed.n}:{packed.m} "
      f"of shape {packed.shape}."
    )
  from jax.experimental.sparse import nm  # pyright: ignore[reportAttributeAccessIssue]

  dtype = jnp.bfloat16
  values = jnp.asarray(packed.values, dtype)
  metadata = jnp.asarray(np.asarray(packed.metadata).view(np.uint16))
  out = nm.nm_spmm(
    values, jnp.asarray(x, dtype), metadata, (((1,), (1,)), ((), ())), 0, jnp.float32
  )
  return out.T
