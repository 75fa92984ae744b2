"""Layer-scope selection compiled once per leaf shape: masks equal a NumPy stable argsort,
and the compiled graph does not grow with the number of same-shape leaves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from jaxprune._by_shape import topk_by_shape
from jaxprune.sparse import static_sparse


def argsort_mask(scores: np.ndarray, removed: int) -> np.ndarray:
  """Reference: stable descending sort, the first ``n - removed`` kept."""
  flat = scores.ravel().astype(np.float32)
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[: flat.size - removed]] = True
  return keep.reshape(scores.shape)


def count_scatters(jaxpr) -> int:
  """Scatter equations in a jaxpr and all its sub-jaxprs (loops, branches, calls)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name.startswith("scatter")
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          n += count_scatters(inner)
  return n


def test_repeated_shapes_and_dtypes_equal_argsort_per_leaf():
  rng = np.random.default_rng(0)
  shapes = [(6, 5), (6, 5), (4,), (6, 5), (4,), (3, 2)]
  scores = [rng.integers(0, 4, s).astype(np.float32) for s in shapes]  # many ties
  scores[3] = scores[3].astype(jnp.bfloat16)  # same shape, other dtype: its own kind
  removed = [7, 0, 2, 29, 3, 1]
  masks = jax.jit(topk_by_shape)([jnp.asarray(s) for s in scores], removed)  # traced counts
  for s, r, m in zip(scores, removed, masks):
    assert m.shape == s.shape and m.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(m), argsort_mask(np.asarray(s, np.float32), r))


def test_masks_graph_does_not_grow_with_same_shape_layers():
  def params(n):
    return {f"l{i}": {"kernel": jnp.ones((8, 8)) * (i + 1)} for i in range(n)}

  def scatters(n):
    pruner = jaxprune.magnitude(jaxprune.agp(0.5, 0, 10, 2))
    jaxpr = jax.make_jaxpr(lambda p, t: pruner.masks(p, step=t))(params(n), jnp.int32(4))
    return count_scatters(jaxpr.jaxpr)

  assert scatters(1) > 0
  assert scatters(6) == scatters(1)  # one selection per shape (was one per leaf)


def test_static_sparse_init_compiles_its_scores_once_and_reuses_the_selection():
  shapes = {"a": (7, 9), "b": (9, 5), "c": (5, 11)}  # shapes no other test compiles
  params = {k: {"kernel": jnp.ones(s), "bias": jnp.zeros(s[1])} for k, s in shapes.items()}
  jaxprune.magnitude(0.7).masks(params)  # compiles the selection for these shapes
  compiles = []

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    masks = static_sparse(optax.sgd(0.1), 0.7, seed=5).init(params).masks
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert len(compiles) == 1  # the random scores, all leaves at once (was one per shape)
  key = jax.random.key(5)
  for i, (k, s) in enumerate(shapes.items()):
    scores = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), s))
    expected = argsort_mask(scores, round(0.7 * scores.size))
    np.testing.assert_array_equal(np.asarray(masks[k]["kernel"]), expected)
    assert masks[k]["bias"] is None
