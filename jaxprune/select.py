"""Selectors: scores + sparsity -> boolean mask, with exactly k kept.

Exact top-k without sorting. Scores are mapped to order-preserving ``uint32`` keys,
and the k-th largest key is found with two 16-bit histogram passes (radix select), so
selection costs a few linear passes instead of an ``O(n log n)`` argsort. Ties at the
threshold are broken deterministically: the lower flat index (row-major, and for the
global scope the earlier leaf) is kept; two more passes, over the digits of the
position, run only when the threshold has more copies than places left. Masks equal
those of a stable descending argsort exactly. The passes are one compiled loop whose
body holds one histogram pass per array (a pass takes its digit from the key or from
the position): on XLA:CPU compile time goes with the number of kernels, so the
selector is written to have few. Each pass walks the scores in blocks and computes
their keys there: no array as long as the scores is stored.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import core as jax_core
from jax import lax

from jaxprune import tree as tree_lib
from jaxprune._compile import eager_jit


def check_sparsity(sparsity: Any, name: str = "sparsity") -> None:
  """Raises ``ValueError`` unless a concrete sparsity lies in ``[0, 1)``.

  Traced values (inside ``jit``) cannot be checked and are clipped by the selector.
  """
  if not is_concrete(sparsity):
    return
  if isinstance(sparsity, str):
    raise TypeError(f"{name} must be a number in [0, 1), got {sparsity!r}.")
  try:
    value = float(sparsity)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a number in [0, 1), got {sparsity!r}.") from e
  if not 0.0 <= value < 1.0:
    raise ValueError(
      f"{name} must be in [0, 1): the fraction of weights removed; got {value}. "
      "1.0 would remove every weight of a layer."
    )


def score_dtype(dtype: Any) -> Any:
  """The dtype scores are computed in: at least float32 (float64 stays float64: ranking
  it in float32 would merge neighbours)."""
  return jnp.promote_types(dtype, jnp.float32)


def sortable_keys(scores: jax.Array) -> jax.Array:
  """Flat unsigned keys whose order is the order of ``scores`` (see :func:`element_keys`)."""
  return jnp.ravel(element_keys(scores))


def element_keys(scores: jax.Array) -> jax.Array:
  """Unsigned keys whose order is the order of ``scores``, element-wise (a sharded array
  stays sharded, where flattening would gather it).

  Exact for every real dtype: ``uint32`` keys for floats of up to 32 bits (widened to
  float32, which holds them exactly) and for integers of up to 32 bits (``int32`` and
  ``uint32`` on their bits: float32 would merge neighbours above ``2**24``); ``uint64``
  keys for 64-bit floats and integers (with ``jax_enable_x64``). NaN (either sign) ranks
  above everything, ``-0.0`` equals ``0.0``. Complex scores are refused.
  """
  x = jnp.asarray(scores)
  dtype = jnp.dtype(x.dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating) or not (
    jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_
  ):
    raise TypeError(f"scores must be real numbers to rank, got {dtype}.")
  if jnp.issubdtype(dtype, jnp.unsignedinteger) and dtype.itemsize >= 4:
    return x
  if jnp.issubdtype(dtype, jnp.signedinteger) and dtype.itemsize >= 4:
    bits = dtype.itemsize * 8
    unsigned = jnp.uint32 if bits == 32 else jnp.uint64
    sign = jnp.array(1 << (bits - 1), unsigned)
    return lax.bitcast_convert_type(x, unsigned) ^ sign
  wide = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 8
  signed, unsigned = (jnp.int64, jnp.uint64) if wide else (jnp.int32, jnp.uint32)
  bits = 64 if wide else 32
  if not wide:
    x = x.astype(jnp.float32)
  i = lax.bitcast_convert_type(x, signed)
  lowest = jnp.array(-(1 << (bits - 1)), signed)
  # -0.0 -> +0.0 on the bits: a float compare would also zero denormals (XLA:CPU flushes
  # them), ranking 1e-45 equal to 0.
  i = jnp.where(i == lowest, jnp.zeros((), signed), i)
  i = jnp.where(i < 0, i ^ jnp.array((1 << (bits - 1)) - 1, signed), i)
  u = lax.bitcast_convert_type(i, unsigned) ^ jnp.array(1 << (bits - 1), unsigned)
  return jnp.where(jnp.isnan(x), jnp.array((1 << bits) - 1, unsigned), u)  # NaN ranks first


def _keep_topk_sorted(keys: list[jax.Array], groups: list[int], k: jax.Array) -> list[jax.Array]:
  """:func:`keep_topk_groups` by a stable sort of each group's keys (any unsigned dtype).

  For 64-bit keys, which the radix select (32-bit keys) does not take: ``O(n log n)``.
  """
  out: list[Any] = [None] * len(keys)
  for g in sorted(set(groups)):
    ix = [i for i, h in enumerate(groups) if h == g]
    joined = jnp.concatenate([keys[i] for i in ix])
    order = jnp.argsort(~joined, stable=True)  # descending; ties keep the lower position
    rank = jnp.zeros(joined.size, jnp.int32).at[order].set(jnp.arange(joined.size, dtype=jnp.int32))
    keep = rank < k[g]
    start = 0
    for i in ix:
      out[i] = keep[start : start + keys[i].size]
      start += keys[i].size
  return out


_DIGIT = 16  # bits per radix digit: two digits make a key
_BINS = 1 << _DIGIT
# Each pass walks a long array in blocks of this many entries (a loop): the keys,
# digits and positions of one block stay in cache, and no array as long as the scores
# is ever allocated (on XLA:CPU a fresh 40 MB temporary costs more than the pass).
_BLOCK = 1 << 19
_PARTS = 2  # partial histograms per pass


def _total(arrays: list[jax.Array]) -> jax.Array:
  out = arrays[0]
  for a in arrays[1:]:
    out = out + a
  return out


def _blocks(n: int) -> tuple[int, int]:
  """``(full, step)``: ``full`` loop blocks of ``step`` entries, then a static tail."""
  return (n // _BLOCK, _BLOCK) if n > _BLOCK else (0, n)


def _scan_blocks(x: jax.Array, fn, init):
  """``fn(block, start, acc)`` over consecutive blocks of the flat ``x``, then its tail."""
  full, step = _blocks(x.size)
  acc = init
  if full:

    def body(i, acc):
      start = i * step
      return fn(lax.dynamic_slice(x, (start,), (step,)), start.astype(jnp.uint32), acc)

    acc = lax.fori_loop(0, full, body, acc)
  if full * step < x.size:
    acc = fn(x[full * step :], jnp.uint32(full * step), acc)
  return acc


def _upper(n: int) -> jax.Array:
  """``(n, n)`` int32, 1 where the row >= the column: ``x @ _upper(n)`` are the suffix sums
  of ``x`` (a dot compiles to one kernel; a sum over a masked square or a cumsum to
  several)."""
  i = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  j = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return (i >= j).astype(jnp.int32)


def _locate(counts: jax.Array, need: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row of ``counts``: the last bin ``b`` with ``sum(counts[b:]) >= need`` (0 if none)
  and ``sum(counts[b+1:])``.

  ``counts`` is ``(groups, 4**j)`` int32 and ``need`` ``(groups,)``. Each row is searched
  as a square grid: suffix sums of the grid's row totals, then of the one grid row that
  holds ``b`` (no scan over all bins: cheap to run). Sums are int32 dots (with ones, or
  with ``_upper``): on XLA:CPU each compiles to one kernel, where a reduction compiles
  to two (its operand and itself), and compile time goes with the number of kernels.
  """
  groups, bins = counts.shape
  side = 1 << ((bins.bit_length() - 1) // 2)
  grid = counts.reshape(groups, side, side)
  ones, upper = jnp.ones(side, jnp.int32), _upper(side)
  totals = jnp.dot(grid, ones)
  rows = jnp.dot(totals, upper)  # rows[g, r] = #(in grid rows >= r)
  need = need[:, None]
  r = jnp.maximum(jnp.dot((rows >= need).astype(jnp.int32), ones) - 1, 0)[:, None]
  row = jnp.take_along_axis(grid, r[:, :, None], axis=1)[:, 0]
  later = jnp.take_along_axis(rows - totals, r, axis=1)
  within = jnp.dot(row, upper) + later
  c = jnp.maximum(jnp.dot((within >= need).astype(jnp.int32), ones) - 1, 0)[:, None]
  above = jnp.take_along_axis(within - row, c, axis=1)
  return (r * side + c)[:, 0], above[:, 0]


def _flipped_positions(size: int, offset: Any) -> jax.Array:
  """``~(offset + arange(size))`` as uint32: larger for earlier positions."""
  return ~(lax.iota(jnp.uint32, size) + jnp.uint32(offset))


def _identity(u: jax.Array) -> jax.Array:
  return u


def keep_topk(keys: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Flat bool masks keeping exactly the k largest keys over all arrays."""
  return keep_topk_groups(keys, [0] * len(keys), jnp.reshape(jnp.asarray(k, jnp.int32), (1,)))


def keep_topk_groups(
  keys: list[jax.Array], groups: list[int], k: jax.Array, to_key=_identity
) -> list[jax.Array]:
  """Flat bool masks keeping exactly the ``k[g]`` largest keys of each group ``g``.

  ``groups[i]`` is the group of ``keys[i]``: one group of all arrays is a global top-k,
  one group per array a top-k per array, all in one selection. ``to_key`` maps a block
  of an array to its ``uint32`` keys (elementwise; by default the arrays are the keys):
  the selection calls it in every pass instead of storing the keys.

  Radix select over 16-bit digits of the pair (key, position), compared as one 64-bit
  number whose low half is the bitwise complement of the flat position (over the
  group's arrays, in order): every pair is distinct, so each group's k-th largest pair
  splits kept from pruned exactly, and among equal keys the lower position ranks
  higher. Each digit is one histogram pass over the candidates (the entries whose
  higher digits match those found so far), all groups at once; the passes over the
  position's digits run only when some group's k-th key has more copies than places
  left (ties to break). The passes are one ``while_loop`` whose body holds one
  histogram pass per array, whatever the number of passes (a pass takes its digit from
  the key or from the position). Each pass walks an array in blocks (see ``_BLOCK``).
  """
  k = jnp.asarray(k, jnp.int32)
  n_groups = max(groups) + 1
  offsets = [sum(u.size for u, h in zip(keys[:i], groups) if h == g) for i, g in enumerate(groups)]
  full, half = jnp.uint32(0xFFFFFFFF), jnp.uint32(0xFFFF0000)
  dropped = n_groups * _BINS  # out of range: a scatter drops it
  # Few entries in all: one histogram per pass (parts pay off on long arrays only).
  parts = 1 if sum(x.size for x in keys) <= _BLOCK else _PARTS

  def body(state):
    d, prefix, need, _ = state  # prefix[0]: the key's digits found, prefix[1]: the position's
    by_key = d < 2
    key_mask = jnp.where(d >= 2, full, jnp.where(d == 1, half, jnp.uint32(0)))
    pos_mask = jnp.where(d == 3, half, jnp.uint32(0))
    shift = jnp.where(d % 2 == 0, _DIGIT, 0).astype(jnp.uint32)

    def indices(u, v, g):
      if v is None:  # a pass over the key's digits
        candidate, digit = (u & key_mask) == prefix[0, g], u >> shift
      else:
        candidate = ((u & key_mask) == prefix[0, g]) & ((v & pos_mask) == prefix[1, g])
        digit = jnp.where(by_key, u, v) >> shift
      return jnp.where(candidate, (digit & 0xFFFF).astype(jnp.int32) + g * _BINS, dropped)

    def scatter(counts, idx):
      # Independent scatters (parts of the block): XLA:CPU runs them in parallel.
      size = -(-idx.size // len(counts))
      return tuple(
        c.at[idx[i * size : (i + 1) * size]].add(1, mode="drop") for i, c in enumerate(counts)
      )

    counts = (jnp.zeros(dropped, jnp.int32),) * parts

    def passes(counts, long: bool, by_position: bool):
      for x, g, o in zip(keys, groups, offsets):
        if (x.size > _BLOCK) != long:
          continue

        def add(block, start, counts, g=g, o=o):
          u = to_key(block)
          v = _flipped_positions(u.size, start + jnp.uint32(o)) if by_position else None
          return scatter(counts, indices(u, v, g))

        counts = _scan_blocks(x, add, counts)
      return counts

    # Short arrays: one pass for both kinds of digit (fewer kernels, cheap at this size).
    counts = passes(counts, long=False, by_position=True)
    if any(x.size > _BLOCK for x in keys):  # long ones: key passes skip the positions
      counts = lax.cond(
        by_key,
        lambda c: passes(c, long=True, by_position=False),
        lambda c: passes(c, long=True, by_position=True),
        counts,
      )
    counts = _total(list(counts)).reshape(n_groups, _BINS)
    b, above = _locate(counts, need)
    equal = jnp.take_along_axis(counts, b[:, None], axis=1)[:, 0]
    found = jnp.where(
      lax.broadcasted_iota(jnp.int32, (2, 1), 0) == (~by_key).astype(jnp.int32),
      b.astype(jnp.uint32) << shift,
      jnp.uint32(0),
    )
    return d + 1, prefix | found, need - above, equal

  def more(state):
    d, _, need, equal = state
    return (d < 2) | ((d < 4) & jnp.any(need < equal))

  start = (
    jnp.int32(0),
    jnp.zeros((2, n_groups), jnp.uint32),
    jnp.maximum(k, 1),
    jnp.zeros(n_groups, jnp.int32),
  )
  d, prefix, _, _ = lax.while_loop(more, body, start)
  t = prefix[0]
  # Stopped after the key's digits: every copy of t is kept (no position bound). A group
  # whose copies all fit while another breaks ties keeps them all too: its position
  # passes select all its copies of t.
  pos = jnp.where(d == 2, jnp.uint32(0), prefix[1])
  out = []
  for x, g, o in zip(keys, groups, offsets):
    u = to_key(x)
    out.append(
      ((u > t[g]) | ((u == t[g]) & (_flipped_positions(u.size, o) >= pos[g]))) & (k[g] > 0)
    )
  return out


def is_concrete(x: Any) -> bool:
  """Whether ``x`` has a value on the host (not a tracer inside ``jit``/``cond``)."""
  return not isinstance(x, jax_core.Tracer)


def n_pruned(size: int, sparsity: Any) -> int | jax.Array:
  """Weights removed of ``size`` at ``sparsity``: ``round(sparsity * size)``.

  A concrete sparsity is checked (``[0, 1)``, finite) and counted on the host with
  Python's ``round`` of the float64 product, the rule ``torch.nn.utils.prune`` uses. A
  traced one is only known on the device: it is counted from the float32 product,
  clipped to ``[0, 1]`` (NaN counts as 0: nothing removed).

  Examples:
    >>> from jaxprune.select import n_pruned
    >>> n_pruned(95, 0.3)  # 0.3 * 95 = 28.499999999999996 in float64
    28
  """
  if is_concrete(sparsity):
    check_sparsity(sparsity)
    return round(float(sparsity) * size)
  s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
  return jnp.where(jnp.isnan(s), 0, jnp.round(s * size)).astype(jnp.int32)


def check_keeps_some(n: int, sparsity: Any, what: str, unit: str = "weights") -> None:
  """Raises when a concrete ``sparsity`` rounds to all ``n`` (groups) of ``what``.

  ``sparsity < 1`` is checked everywhere, but ``round(s * n)`` reaches ``n`` for ``s``
  within ``0.5 / n`` of 1 (0.99 of 8 neurons): a layer, or a whole pool, left with
  nothing is refused like ``sparsity=1`` is (by the pruners and the post-training layer
  functions; :func:`topk_mask` keeps its arithmetic: 0.999 of 100 keeps none). A traced
  sparsity is not checked.
  """
  if not is_concrete(sparsity) or n == 0 or n_pruned(n, sparsity) < n:
    return
  s = float(sparsity)
  raise ValueError(
    f"At sparsity {s:g}, {what} ({n} {unit}) would keep none: round({s:g} * {n}) = {n}. "
    f"Use a sparsity below {(n - 0.5) / n:.6g} (one kept), or leave it out (where=, or a "
    "lower sparsity for it with an override)."
  )


def n_keep(size: int, sparsity: Any) -> int | jax.Array:
  """Weights kept of ``size`` at ``sparsity``: ``size - round(sparsity * size)``."""
  return size - n_pruned(size, sparsity)


def topk_leaves(scores: list[jax.Array], sparsity: Any, scope: str) -> list[jax.Array]:
  """Masks (shaped like ``scores``) for a list of score arrays (compiled once per shapes)."""
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  if not scores:
    return []
  if scope == "layer":
    removed = [n_pruned(int(jnp.size(s)), sparsity) for s in scores]
  else:
    removed = [n_pruned(sum(int(jnp.size(s)) for s in scores), sparsity)]
  return topk_by_count(scores, removed, scope)


def topk_by_count(scores: list[jax.Array], removed: list[Any], scope: str) -> list[jax.Array]:
  """Masks removing exactly ``removed[i]`` of leaf i (layer) or ``removed[0]`` overall (global).

  Counts are ints or int32 scalars (traced counts are clipped to the leaf sizes).
  """
  if not scores:
    return []
  return _topk_by_count(list(scores), [jnp.asarray(r, jnp.int32) for r in removed], scope)


def _topk_by_count(
  scores: list[jax.Array], removed: list[jax.Array], scope: str
) -> list[jax.Array]:
  flat_scores = [jnp.ravel(s) for s in scores]
  if scope == "layer":
    k = jnp.stack([u.size - jnp.clip(r, 0, u.size) for u, r in zip(flat_scores, removed)])
    groups = list(range(len(flat_scores)))
  else:
    total = sum(u.size for u in flat_scores)
    k = jnp.reshape(total - jnp.clip(removed[0], 0, total), (1,))
    groups = [0] * len(flat_scores)
  if scope == "global":  # one order for all leaves: ranked as their common dtype
    common = jnp.result_type(*flat_scores)
    flat_scores = [u if u.dtype == common else u.astype(common) for u in flat_scores]
  if any(jnp.dtype(u.dtype).itemsize == 8 for u in flat_scores):  # 64-bit keys
    flat = _keep_topk_sorted([sortable_keys(u) for u in flat_scores], groups, k)
  else:
    flat = keep_topk_groups(flat_scores, groups, k, to_key=sortable_keys)
  return [m.reshape(jnp.shape(s)) for m, s in zip(flat, scores)]


_topk_by_count = eager_jit(_topk_by_count, static_argnames="scope")


def topk_mask(scores: Any, sparsity: Any, scope: str = "layer") -> Any:
  """Keeps the largest scores: exactly ``n - round(sparsity * n)`` per layer or overall.

  Args:
    scores: a pytree of score arrays; ``None`` leaves (params that are never pruned)
      stay ``None`` in the mask.
    sparsity: fraction removed, in ``[0, 1)``; a Python float or a scalar array. A
      concrete value is counted on the host (``round(sparsity * n)`` in float64); a
      traced one inside ``jit`` in float32, clipped to ``[0, 1]``.
    scope: ``"layer"`` keeps the top ``1 - sparsity`` of every leaf; ``"global"`` keeps
      the top ``1 - sparsity`` of all leaves pooled (one threshold).

  Returns:
    A pytree of bool arrays (``True`` = kept) with the structure of ``scores``. Ties
    are broken deterministically by position: the lower flat index, then the earlier
    leaf, is kept. NaN scores rank above every number (kept, so a NaN weight is not
    hidden by pruning).

  Raises:
    ValueError: sparsity outside ``[0, 1)``, no arrays, an empty array, or a scalar
      leaf with ``scope="layer"``.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> m = jaxprune.topk_mask({"w": jnp.array([[3., 1.], [2., 1.]])}, 0.5)
    >>> m["w"].tolist()
    [[True, False], [True, False]]
    >>> m = jaxprune.topk_mask({"a": jnp.array([5., 4.]), "b": jnp.array([1., 2.])}, 0.5,
    ...                        scope="global")
    >>> m["a"].tolist(), m["b"].tolist()
    ([True, True], [False, False])
  """
  check_sparsity(sparsity)
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  leaves, treedef = jax.tree.flatten(scores, is_leaf=tree_lib.is_none)
  live = [i for i, s in enumerate(leaves) if s is not None]
  if not live:
    raise ValueError(f"topk_mask: the scores tree has no arrays to rank ({scores!r}).")
  paths = [p for p, _ in tree_lib.leaves_with_paths(scores, is_leaf=tree_lib.is_none)]
  for i in live:
    shape = jnp.shape(leaves[i])
    dtype = jnp.result_type(leaves[i])
    if not jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(
        f"topk_mask: scores at {paths[i]!r} are not real numbers ({dtype}: {leaves[i]!r}); "
        "rank their magnitude (jnp.abs) or real part."
      )
    if 0 in shape:
      raise ValueError(f"topk_mask: scores at {paths[i]!r} have no entries (shape {shape}).")
    if scope == "layer" and not shape:
      raise ValueError(
        f"topk_mask: scores at {paths[i]!r} are a scalar, and scope='layer' ranks entries "
        "within each array, so nothing could be removed. Stack the scores into one "
        "array, or use scope='global'."
      )
  masks = topk_leaves([jnp.asarray(leaves[i]) for i in live], sparsity, scope)
  out = list(leaves)
  for i, m in zip(live, masks):
    out[i] = m
  return jax.tree.unflatten(treedef, out)
