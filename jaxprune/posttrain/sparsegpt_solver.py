"""SparseGPT (Frantar & Alistarh 2023): prune and update weights from the inputs' Hessian.

For a ``[n_in, n_out]`` kernel ``W`` (Flax layout: input features are rows) and
``H = 2/n X^T X``: dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W_j = 0``; ``H +=
dampening * mean(diag H) * I``; ``U`` is the upper Cholesky factor of ``H^-1``. Input
rows are processed in blocks of ``blocksize``: at a block's start the mask is chosen by
``w^2 / U_ii^2`` (unstructured: over the whole block; N:M: every ``m`` rows of each
column); then row by row ``err = (w_i - q_i) / U_ii`` and ``W[i:] -= U[i, i:]^T err``
inside the block; later blocks are updated once per block, ``W[i2:] -= U[i1:i2,
i2:]^T Err``.

The whole solve is one compiled function per kernel shape (and pattern): ``U`` from one
Cholesky and a triangular inverse (:func:`inverse_cholesky`), then one loop over the
blocks, the same for every block (a partial last block is padded). A block first gathers
the updates of all earlier blocks, ``W[i1:i2] - U[:i1, i1:i2]^T Err[:i1]``, in matmuls of
512 earlier rows (the original's lazy batch updates, applied when the block is reached);
inside the block, rows are taken one by one in sub-blocks of 16 rows (each row's update
reaches the later rows of its sub-block) and one matmul per sub-block updates the rest of
the block.
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
_LEAF = 512  # largest diagonal blocks inverted by a triangular solve in _lower_inverse


def _lower_inverse(m: jax.Array) -> jax.Array:
  """``m^-1`` of a lower triangular ``[n, n]`` ``m``, ``n`` a multiple of ``2^levels``.

  The ``2^levels`` diagonal blocks are inverted in one batched triangular solve; then,
  level by level, each pair of neighbouring spans is joined,
  ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``, all pairs of a level in
  two batched matmuls: about ``n^3 / 3`` multiply-adds and a few ops to compile.
  """
  n = m.shape[0]
  p = n // _leaf_size(n)
  size = n // p
  blocks = jnp.stack([m[i * size : (i + 1) * size, i * size : (i + 1) * size] for i in range(p)])
  eye = jnp.broadcast_to(jnp.eye(size, dtype=m.dtype), blocks.shape)
  inv = lax.linalg.triangular_solve(blocks, eye, left_side=True, lower=True)
  while p > 1:
    lower_left = jnp.stack([
      m[(2 * i + 1) * size : (2 * i + 2) * size, 2 * i * size : (2 * i + 1) * size]
      for i in range(p // 2)
    ])  # fmt: skip
    a_inv, c_inv = inv[0::2], inv[1::2]
    b = -jnp.matmul(c_inv, jnp.matmul(lower_left, a_inv, precision=_HIGHEST), precision=_HIGHEST)
    top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=2)
    inv = jnp.concatenate([top, jnp.concatenate([b, c_inv], axis=2)], axis=1)
    p, size = p // 2, size * 2
  return inv[0]


def _leaf_size(n: int) -> int:
  """``n / 2^levels`` for the fewest levels that make it at most ``_LEAF`` (``n`` padded)."""
  levels = max(0, int(np.ceil(np.log2(max(n, 1) / _LEAF))))
  return -(-n // 2**levels)


def inverse_cholesky(hessian: jax.Array, dampening: float) -> tuple[jax.Array, jax.Array]:
  """``(U, dead)``: the upper Cholesky factor of ``(H')^-1`` and the dead inputs.

  ``H'`` is ``hessian`` with ``H_jj = 1`` where ``H_jj = 0`` and ``dampening * mean(diag)``
  added to the diagonal. With ``P`` the reversal of the inputs and ``P H' P = M M^T``
  (lower ``M``), ``H' = K K^T`` with the upper ``K = P M P``, so ``H'^-1 = (K^-1)^T K^-1``
  and ``U = K^-1 = P M^-1 P``: one Cholesky and one triangular inverse.
  """
  h = hessian.astype(jnp.float32)
  n = h.shape[0]
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  h = h + dampening * jnp.mean(jnp.diagonal(h)) * jnp.eye(n, dtype=jnp.float32)
  lower = jnp.linalg.cholesky(h[::-1, ::-1])
  pad = _leaf_size(n) * (-(-n // _leaf_size(n))) - n  # identity rows: inverse identity
  if pad:
    lower = jnp.pad(lower, ((0, pad), (0, pad)))
    lower = lower + jnp.diag((jnp.arange(n + pad) >= n).astype(jnp.float32))
  return _lower_inverse(lower)[:n, :n][::-1, ::-1], dead


_SUB_ROWS = 16  # rows of a block updated one by one before one matmul updates the block
_CHUNK_ROWS = 512  # rows of earlier errors per matmul when a block gathers its updates


def _sub_rows(blocksize: int, group: int) -> int:
  """Rows per sub-block: the largest divisor of ``blocksize`` that is a multiple of
  ``group`` and at most ``max(_SUB_ROWS, group)``."""
  return max(
    s
    for s in range(group, blocksize + 1, group)
    if blocksize % s == 0 and s <= max(_SUB_ROWS, group)
  )


def _block(w1, u1, removed, fixed, valid, nm: NM | None, group: int):
  """One block ``[b, n_out]``: its pruned weights ``Q``, errors ``Err`` and mask.

  Rows are taken one by one inside sub-blocks of a few rows (each row's update reaches
  only the later rows of its sub-block); then one matmul brings the sub-block's errors
  to the rest of the block.
  """
  b, n_out = w1.shape
  sub = _sub_rows(b, group)
  d = jnp.diagonal(u1)
  if fixed is None and nm is None:
    score = jnp.where(valid[:, None], jnp.square(w1) / jnp.square(d)[:, None], jnp.inf)
    keys = select.sortable_keys(score)
    fixed = select.keep_topk([keys], keys.size - removed)[0].reshape(w1.shape)
  u1_t = u1.T  # lower: u1_t[r, i] = U[i, r], zero for r < i

  def body(s, carry):
    w1, q1, err1, mask1 = carry
    lo = s * sub
    ws = lax.dynamic_slice_in_dim(w1, lo, sub)
    us = lax.dynamic_slice(u1, (lo, lo), (sub, sub))
    ds = lax.dynamic_slice_in_dim(d, lo, sub)
    keep = None if fixed is None else lax.dynamic_slice_in_dim(fixed, lo, sub)
    qs, errs, keeps = [], [], []
    for k in range(sub):
      if fixed is None and k % group == 0:
        assert nm is not None  # without N:M the mask was chosen above, for the whole block
        rows = ws[k : k + group]
        keeps.append(
          nm.keep(jnp.square(rows) / jnp.square(ds[k : k + group])[:, None], jnp.int32(nm.n))
        )
      keep_k = keep[k] if keep is not None else keeps[-1][k % group]
      w_k = ws[k]
      q = jnp.where(keep_k, w_k, 0.0)
      err = (w_k - q) / ds[k]
      if k + 1 < sub:
        ws = ws.at[k + 1 :].add(-us[k, k + 1 :, None] * err[None, :])
      qs.append(q)
      errs.append(err)
    err_s = jnp.stack(errs)
    u_cols = lax.dynamic_slice_in_dim(u1_t, lo, sub, axis=1)
    w1 = w1 - jnp.matmul(u_cols, err_s, precision=_HIGHEST)
    q1 = lax.dynamic_update_slice_in_dim(q1, jnp.stack(qs), lo, 0)
    err1 = lax.dynamic_update_slice_in_dim(err1, err_s, lo, 0)
    kept = keep if keep is not None else jnp.concatenate(keeps)
    mask1 = lax.dynamic_update_slice_in_dim(mask1, kept, lo, 0)
    return w1, q1, err1, mask1

  init = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1), jnp.zeros(w1.shape, bool))
  _, q1, err1, mask1 = lax.fori_loop(0, b // sub, body, init)
  return q1, err1, mask1


@functools.partial(jax.jit, static_argnames=("nm", "blocksize", "group"))
def _solve(kernel, hessian, removed, fixed, dampening, *, nm, blocksize, group):
  """The whole solve, one compiled function per kernel shape (and N:M / fixed mask).

  One loop over the blocks, the same for every block (a last partial block is padded:
  zero weights, identity rows of ``U``, its padding kept): each block first gathers the
  updates of all earlier blocks, ``W0[i1:i2] - U[:i1, i1:i2]^T Err[:i1]``, in matmuls of
  ``_CHUNK_ROWS`` earlier rows (errors of later rows are still zero), then is solved.
  """
  w = kernel.astype(jnp.float32)
  n_in, n_out = w.shape
  u, dead = inverse_cholesky(hessian, dampening)
  w = jnp.where(dead[:, None], 0.0, w)
  b = blocksize
  n_blocks = -(-n_in // b)
  n_pad = n_blocks * b
  chunk = b * max(1, min(n_blocks, _CHUNK_ROWS // b))
  n_err = -(-n_pad // chunk) * chunk
  if n_pad > n_in:
    w = jnp.pad(w, ((0, n_pad - n_in), (0, 0)))
    u = jnp.pad(u, ((0, n_pad - n_in), (0, n_pad - n_in)))
    u = u + jnp.diag((jnp.arange(n_pad) >= n_in).astype(jnp.float32))
    if fixed is not None:
      fixed = jnp.pad(fixed, ((0, n_pad - n_in), (0, 0)), constant_values=True)
  u_t = jnp.pad(u.T, ((0, 0), (0, n_err - n_pad)))  # lower: u_t[r, i] = U[i, r]
  valid = jnp.arange(n_pad) < n_in

  def step(j, carry):
    q, err, mask = carry
    i1 = j * b

    def gather(c, acc):
      e = lax.dynamic_slice_in_dim(err, c * chunk, chunk)
      u_c = lax.dynamic_slice(u_t, (i1, c * chunk), (b, chunk))
      return acc + jnp.matmul(u_c, e, precision=_HIGHEST)

    done = jnp.zeros((b, n_out), jnp.float32)
    done = lax.fori_loop(0, (i1 + chunk - 1) // chunk, gather, done)
    w1 = lax.dynamic_slice_in_dim(w, i1, b) - done
    u1 = lax.dynamic_slice(u, (i1, i1), (b, b))
    fixed1 = None if fixed is None else lax.dynamic_slice_in_dim(fixed, i1, b)
    valid1 = lax.dynamic_slice_in_dim(valid, i1, b)
    q1, err1, m1 = _block(w1, u1, removed[j], fixed1, valid1, nm, group)
    q = lax.dynamic_update_slice_in_dim(q, q1, i1, 0)
    err = lax.dynamic_update_slice_in_dim(err, err1, i1, 0)
    return q, err, lax.dynamic_update_slice_in_dim(mask, m1, i1, 0)

  init = (
    jnp.zeros((n_pad, n_out), jnp.float32),
    jnp.zeros((n_err, n_out), jnp.float32),
    jnp.zeros((n_pad, n_out), bool),
  )
  q, _, mask = lax.fori_loop(0, n_blocks, step, init)
  return q[:n_in].astype(kernel.dtype), mask[:n_in], jnp.all(jnp.isfinite(u))


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
  n_in, n_out = targets.check_kernel(kernel, "sparsegpt_layer", name)
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
    select.check_keeps_some(n_in * n_out, s, f"sparsegpt: layer {name!r}")
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
