"""SparseGPT (Frantar & Alistarh 2023): prune and update weights from the inputs' Hessian.

For a ``[n_in, n_out]`` kernel ``W`` (Flax layout: input features are rows) and
``H = 2/n X^T X``: dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W_j = 0``; ``H +=
dampening * mean(diag H) * I``; ``U`` is the upper Cholesky factor of ``H^-1``. Input
rows are processed in blocks of ``blocksize``: at a block's start the mask is chosen by
``w^2 / U_ii^2`` (unstructured: over the whole block; N:M: every ``m`` rows of each
column); then row by row ``err = (w_i - q_i) / U_ii`` and ``W[i:] -= U[i, i:]^T err``
inside the block; later blocks are updated once per block, ``W[i2:] -= U[i1:i2,
i2:]^T Err``.

The whole solve is one compiled function per kernel shape: the Cholesky factors, then
the blocks in a few segments (``lax.fori_loop`` over a segment's blocks, whose lazy
update covers the rest of the segment; one matmul per segment updates the later
segments, so the lazy updates cost about ``1 + 1/n_segments`` times the exact
triangular work while only ``n_segments`` copies of the loop are compiled), and the rows
inside a block (``lax.fori_loop``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import select
from jaxprune.posttrain import targets
from jaxprune.posttrain.stats import InputStats
from jaxprune.structures import NM

_HIGHEST = lax.Precision.HIGHEST


def inverse_cholesky(hessian: jax.Array, dampening: float) -> tuple[jax.Array, jax.Array]:
  """``(U, dead)``: the upper Cholesky factor of ``(H')^-1`` and the dead inputs.

  ``H'`` is ``hessian`` with ``H_jj = 1`` where ``H_jj = 0`` and ``dampening * mean(diag)``
  added to the diagonal.
  """
  h = hessian.astype(jnp.float32)
  n = h.shape[0]
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  h = h + dampening * jnp.mean(jnp.diagonal(h)) * jnp.eye(n, dtype=jnp.float32)
  lower = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(n, dtype=jnp.float32))
  return jnp.linalg.cholesky(h_inv).T, dead


def _block(w1, u1, removed, fixed, nm: NM | None, group: int):
  """One block ``[b, n_out]``: its mask, its pruned weights ``Q`` and errors ``Err``."""
  b = w1.shape[0]
  d = jnp.diagonal(u1)
  if fixed is None and nm is None:
    score = jnp.square(w1) / jnp.square(d)[:, None]
    keys = select.sortable_keys(score)
    fixed = select.keep_topk([keys], keys.size - removed)[0].reshape(w1.shape)

  def body(g, carry):
    w1, err1, mask1 = carry
    lo = g * group
    if fixed is None:
      assert nm is not None  # without N:M the mask was chosen above, for the whole block
      rows = lax.dynamic_slice_in_dim(w1, lo, group)
      d_rows = lax.dynamic_slice_in_dim(d, lo, group)
      keep = nm.keep(jnp.square(rows) / jnp.square(d_rows)[:, None], jnp.int32(nm.n))
    else:
      keep = lax.dynamic_slice_in_dim(fixed, lo, group)
    for k in range(group):  # row i's update reaches every later row of the block
      i = lo + k
      w_i = lax.dynamic_index_in_dim(w1, i, keepdims=False)
      q = jnp.where(keep[k], w_i, 0.0)
      err = (w_i - q) / d[i]
      u_i = lax.dynamic_index_in_dim(u1, i, keepdims=False)
      w1 = lax.dynamic_update_index_in_dim(w1 - u_i[:, None] * err[None, :], q, i, 0)
      err1 = lax.dynamic_update_index_in_dim(err1, err, i, 0)
    mask1 = lax.dynamic_update_slice_in_dim(mask1, keep, lo, 0)
    return w1, err1, mask1

  init = (w1, jnp.zeros_like(w1), jnp.zeros(w1.shape, bool))
  return lax.fori_loop(0, b // group, body, init)


def _segments(n_in: int, blocksize: int, n_segments: int) -> list[tuple[int, int, int]]:
  """``(start, blocks, size)``: runs of equal blocks, about ``n_in / n_segments`` rows each."""
  full = n_in // blocksize
  per = -(-full // n_segments) if full else 0
  out = [(s * blocksize, min(per, full - s), blocksize) for s in range(0, full, per or 1)]
  if n_in % blocksize:
    out.append((full * blocksize, 1, n_in % blocksize))
  return out


@functools.partial(jax.jit, static_argnames=("nm", "blocksize", "group", "n_segments"))
def _solve(kernel, hessian, removed, fixed, dampening, *, nm, blocksize, group, n_segments=4):
  w = kernel.astype(jnp.float32)
  n_in = w.shape[0]
  u, dead = inverse_cholesky(hessian, dampening)
  w = jnp.where(dead[:, None], 0.0, w)
  masks = []
  for start, n_blocks, size in _segments(n_in, blocksize, n_segments):
    end = start + n_blocks * size
    u_seg = u[start:end, start:end]
    first = start // blocksize

    def step(b, carry, u_seg=u_seg, size=size, first=first, start=start):
      w_seg, err_seg, mask_seg = carry
      i1 = b * size
      w1 = lax.dynamic_slice_in_dim(w_seg, i1, size)
      u1 = lax.dynamic_slice(u_seg, (i1, i1), (size, size))
      fixed1 = None if fixed is None else lax.dynamic_slice_in_dim(fixed, start + i1, size)
      q1, err1, m1 = _block(w1, u1, removed[first + b], fixed1, nm, group)
      # Lazy update of the segment's later rows (U is upper triangular: earlier rows get
      # zeros; the block's own rows are then overwritten by q1).
      u_rows = lax.dynamic_slice_in_dim(u_seg, i1, size)
      w_seg = w_seg - jnp.matmul(u_rows.T, err1, precision=_HIGHEST)
      w_seg = lax.dynamic_update_slice_in_dim(w_seg, q1, i1, 0)
      err_seg = lax.dynamic_update_slice_in_dim(err_seg, err1, i1, 0)
      return w_seg, err_seg, lax.dynamic_update_slice_in_dim(mask_seg, m1, i1, 0)

    w_seg = w[start:end]
    init = (w_seg, jnp.zeros_like(w_seg), jnp.zeros(w_seg.shape, bool))
    q_seg, err_seg, mask_seg = lax.fori_loop(0, n_blocks, step, init)
    w = w.at[start:end].set(q_seg)
    if end < n_in:  # later segments: one matmul per segment
      w = w.at[end:].add(-jnp.matmul(u[start:end, end:].T, err_seg, precision=_HIGHEST))
    masks.append(mask_seg)
  return w.astype(kernel.dtype), jnp.concatenate(masks), jnp.all(jnp.isfinite(u))


def block_counts(n_in: int, n_out: int, sparsity: float, blocksize: int) -> np.ndarray:
  """Weights removed in each block of rows: exactly ``round(sparsity * n_in * n_out)`` in all.

  Block ``b`` removes ``round(s * end_b * n_out) - round(s * start_b * n_out)`` (Python's
  float64 ``round``), so every block removes its share and the layer's total is exact.
  """
  edges = [min(i, n_in) for i in range(0, n_in + blocksize, blocksize)]
  edges = sorted(set(edges))
  cum = [int(select.n_pruned(e * n_out, sparsity)) for e in edges]
  return np.diff(np.asarray(cum, np.int32))


def check_options(blocksize: Any, dampening: Any) -> None:
  """Raises ``ValueError`` for a ``blocksize`` that is not a positive int or a
  ``dampening`` that is not a finite number ``>= 0``."""
  if isinstance(blocksize, bool) or not isinstance(blocksize, int | np.integer) or blocksize < 1:
    raise ValueError(
      f"sparsegpt: blocksize must be a positive int (input rows per block; the paper's "
      f"128), got {blocksize!r}."
    )
  if (
    isinstance(dampening, bool)
    or not isinstance(dampening, int | float | np.number)
    or not (np.isfinite(dampening) and dampening >= 0)
  ):
    raise ValueError(
      f"sparsegpt: dampening must be a finite number >= 0 (a fraction of mean(diag H); "
      f"the paper's 0.01), got {dampening!r}."
    )


def sparsegpt_layer(
  kernel: jax.Array,
  hessian: jax.Array,
  sparsity: float | None = None,
  *,
  structure: Any = None,
  mask: jax.Array | None = None,
  blocksize: int = 128,
  dampening: float = 0.01,
  name: str = "kernel",
) -> tuple[jax.Array, jax.Array]:
  """SparseGPT on one ``[n_in, n_out]`` kernel: ``(updated kernel, mask)``.

  Args:
    kernel: ``[n_in, n_out]``, input features are rows (a Flax Dense kernel).
    hessian: ``[n_in, n_in]``, ``2/n X^T X`` (:meth:`InputStats.hessian`).
    sparsity: unstructured: exactly ``round(sparsity * n_in * n_out)`` weights removed
      (each block of rows its share, chosen adaptively at the block's start); ``None``
      is 0.5 (or ``1 - n/m`` for N:M).
    structure: ``None`` or ``jaxprune.n_m(n, m)``: ``n`` kept of every ``m`` consecutive
      input rows of each column, chosen when the group is reached.
    mask: a fixed ``[n_in, n_out]`` bool mask (True = kept) instead of choosing one; the
      weights are still updated (OBS reconstruction for a given mask).
    blocksize: rows per block (the paper's B = 128).
    dampening: fraction of the mean diagonal added to ``H`` (the paper's 1%).
    name: the layer's name in error messages.

  Returns:
    The updated kernel (pruned weights exactly zero, dead inputs zero) and the mask.

  Raises:
    ValueError: bad sparsity, ``blocksize`` not a positive int, ``dampening`` not a
      finite number >= 0, rows not divisible by ``m`` (or ``blocksize`` not by ``m``),
      shapes that do not match, NaN or inf in the Hessian (naming the input feature),
      or a Hessian that Cholesky cannot factor.
  """
  n_in, n_out = kernel.shape
  if hessian.shape != (n_in, n_in):
    raise ValueError(
      f"Layer {name!r}: a kernel with {n_in} input features needs a [{n_in}, {n_in}] Hessian, "
      f"got {hessian.shape}."
    )
  check_options(blocksize, dampening)
  if select.is_concrete(hessian):
    finite = np.isfinite(np.asarray(hessian))
    # A non-finite input feature j makes H_jj (its squared norm) NaN or inf.
    bad = np.flatnonzero(~np.diagonal(finite))
    bad = bad if bad.size else np.flatnonzero(~finite.all(axis=1))
    if bad.size:
      raise ValueError(
        f"Layer {name!r}: the Hessian is NaN or inf at input feature {int(bad[0])} "
        f"({bad.size} of {n_in}): the calibration inputs of that feature were not finite."
      )
  s, nm = targets.resolve_target(sparsity, structure, "sparsegpt")
  targets.check_nm(nm, name, n_in)
  if nm is not None and blocksize % nm.m:
    raise ValueError(f"sparsegpt: blocksize {blocksize} must divide by m={nm.m}.")
  removed = np.zeros(-(-n_in // blocksize), np.int32)
  if mask is not None:
    if mask.shape != kernel.shape:
      raise ValueError(f"Layer {name!r}: mask shape {mask.shape} != kernel shape {kernel.shape}.")
    nm, mask = None, jnp.asarray(mask, bool)
  elif nm is None:
    removed = block_counts(n_in, n_out, s, blocksize)
  group = nm.m if nm is not None else 1
  new, kept, finite = _solve(
    kernel, hessian, jnp.asarray(removed), mask, jnp.float32(dampening),
    nm=nm, blocksize=blocksize, group=group,
  )  # fmt: skip
  if not bool(finite):
    raise ValueError(
      f"Layer {name!r}: the Cholesky factorisation of the damped Hessian failed (not "
      f"positive definite in float32); raise dampening (now {dampening})."
    )
  return new, kept


def sparsegpt(
  params: Any,
  stats: dict[str, InputStats],
  sparsity: float | None = None,
  *,
  structure: Any = None,
  blocksize: int = 128,
  dampening: float = 0.01,
) -> tuple[Any, Any]:
  """SparseGPT on every layer with statistics: ``(updated params, masks)``.

  Each kernel is seen as ``[inputs, outputs]`` (:class:`~jaxprune.surgery.linear.Layer`:
  the axes the traced ``dot_general`` contracts, in the weight's own order, flattened
  into the input features, whatever the weight's layout); N:M groups are ``m``
  consecutive inputs of the stored weight (in its memory order). Layers are solved one after the other, each in one
  compiled function.

  Args:
    params: the params (Linen dict or ``nnx.State``); paths matched to ``stats`` exactly.
    stats: ``{path: InputStats}`` with ``X^T X`` (``calibrate(..., hessian=True)``).
    sparsity: fraction removed per layer, exactly ``round(s * size)``; default 0.5.
    structure: ``None`` or ``jaxprune.n_m(n, m)``.
    blocksize: rows per block (128 in the paper).
    dampening: fraction of ``mean(diag H)`` added to the diagonal (0.01 in the paper).

  Returns:
    Params of the same structure with the pruned layers' kernels updated (others as
    they were), and a mask tree (``None`` for unpruned params) for
    ``jaxprune.masked(inner, masks)``.

  Raises:
    ValueError: as :func:`sparsegpt_layer`, naming the layer; a layer missing from
      ``params``, with no captured inputs or with NaN / inf among them (naming the
      input feature).
  """
  check_options(blocksize, dampening)
  s, nm = targets.resolve_target(sparsity, structure, "sparsegpt")
  new, masks = {}, {}
  for path, kernel, st in targets.pairs(params, stats, "sparsegpt"):
    layer = st.layer
    w, m = sparsegpt_layer(
      layer.as_matrix(kernel), st.hessian(), s, structure=nm,
      blocksize=blocksize, dampening=dampening, name=path,
    )  # fmt: skip
    new[path], masks[path] = layer.from_matrix(w), layer.from_matrix(m)
  return targets.to_tree(params, new, default=lambda x: x), targets.to_tree(params, masks)
