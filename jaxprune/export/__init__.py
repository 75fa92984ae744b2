"""Deployment: a compact file for a pruned model, sparse export, N:M packing.

* :func:`save` / :func:`load`: kept values only, positions as a bitmask or delta-coded
  indices (whichever is smaller per layer), optional int8 or k-means weight sharing
  (``quantize="shared", bits=5``: :func:`kmeans_1d`), JSON structure, xz-compressed;
  :func:`sizes` compares it with dense float32 and ``.npz`` + gzip.
* :func:`to_sparse` / :func:`sparse_apply`: weight matrices as
  ``jax.experimental.sparse`` BCOO / BCSR and a forward pass through ``sparsify``.
* :func:`nm_pack` / :func:`nm_unpack` / :func:`nm_matmul`: N:M (2:4) kernels in the
  layout of sparse tensor cores (values along the contraction axis + 2-bit positions).
"""

from jaxprune.export.bcoo import sparse_apply, to_sparse
from jaxprune.export.file import (
  DamagedFileError,
  from_bytes,
  kmeans_1d,
  load,
  save,
  sizes,
  to_bytes,
)
from jaxprune.export.nm import NMPacked, nm_matmul, nm_matmul_available, nm_pack, nm_unpack

__all__ = [
  "DamagedFileError",
  "from_bytes",
  "kmeans_1d",
  "load",
  "nm_matmul",
  "nm_matmul_available",
  "nm_pack",
  "NMPacked",
  "nm_unpack",
  "save",
  "sizes",
  "sparse_apply",
  "to_bytes",
  "to_sparse",
]
