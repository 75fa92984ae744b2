"""Small eager calls compile for compile time (``jaxprune._compile``), with the same results.

The suite itself runs with the fast-compile XLA flags (conftest), so the reference here is
compiled with XLA's defaults set explicitly: what a user's process compiles for large
inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import _compile, select
from jaxprune._by_shape import _topk_by_shape

XLA_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}
# one leaf past the selector's 2**19-entry block (its looped path), two small ones
SHAPES = ((1 << 19) + 37, (300, 7), (1,))
_optimized = jax.jit(
  select._topk_by_count.__wrapped__, static_argnames="scope", compiler_options=XLA_DEFAULTS
)


def _scores(seed: int, distinct: int, nans: int) -> list[jax.Array]:
  rng = np.random.default_rng(seed)
  out = []
  for shape in SHAPES:
    x = rng.integers(-distinct, distinct + 1, size=shape).astype(np.float32) / 4
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, size=min(nans, flat.size))] = np.nan
    flat[rng.integers(0, flat.size, size=2)] = [np.inf, -0.0]
    out.append(jnp.asarray(x))
  return out


@settings(max_examples=8, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  distinct=st.sampled_from([0, 1, 3, 1000, 10**6]),  # 0: every score tied
  nans=st.integers(0, 3),
  fractions=st.lists(st.floats(0, 1), min_size=3, max_size=3),
  scope=st.sampled_from(["layer", "global"]),
)
def test_fast_compiled_selection_equals_the_optimized_compile(
  seed, distinct, nans, fractions, scope
):
  scores = _scores(seed, distinct, nans)
  sizes = [s.size for s in scores]
  if scope == "layer":
    removed = [jnp.int32(round(f * n)) for f, n in zip(fractions, sizes)]
  else:
    removed = [jnp.int32(round(fractions[0] * sum(sizes)))]
  fast = select._topk_by_count.fast(scores, removed, scope)
  reference = _optimized(scores, removed, scope)
  for a, b in zip(fast, reference):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  kept = [int(m.sum()) for m in fast]
  if scope == "layer":
    assert kept == [n - int(r) for n, r in zip(sizes, removed)]
  else:
    assert sum(kept) == sum(sizes) - int(removed[0])


def test_fast_compiled_random_scores_equal_the_optimized_compile():
  from jaxprune.sparse.dynamic import _random_scores

  shapes = ((96, 30), (30, 10), (7,))
  optimized = jax.jit(
    _random_scores.__wrapped__, static_argnums=(0, 1), compiler_options=XLA_DEFAULTS
  )
  for a, b in zip(_random_scores.fast(3, shapes), optimized(3, shapes)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _cache_sizes(fn) -> tuple[int, int]:
  return fn.fast._cache_size(), fn.plain._cache_size()


def test_small_eager_calls_take_the_fast_compile_and_traced_ones_the_plain():
  fn = _compile.eager_jit(lambda x: x * 2 + 1)
  small, large = jnp.ones(8), jnp.ones(_compile.SMALL + 1)
  np.testing.assert_array_equal(fn(small), 3 * np.ones(8))
  assert _cache_sizes(fn) == (1, 0)
  assert float(fn(large)[-1]) == 3.0
  assert _cache_sizes(fn) == (1, 1)
  # inside a trace the call is part of the caller's program: jax refuses compiler
  # options on a nested jit, so taking the fast one there would raise
  np.testing.assert_array_equal(jax.jit(lambda x: fn(x) - 1)(small), 2 * np.ones(8))
  assert float(jax.grad(lambda x: fn(x).sum())(small)[0]) == 2.0


def test_elements_made_from_static_shapes_count():
  fn = _compile.eager_jit(lambda n: jnp.zeros(n), static_argnums=0, extra_elements=lambda n: n)
  fn(16)
  fn(_compile.SMALL + 1)
  assert _cache_sizes(fn) == (1, 1)


def test_pruner_masks_and_random_init_take_the_fast_compile():
  from jaxprune.sparse.dynamic import _random_scores

  # shapes no other test uses: the first call of this module compiles them
  params = {"a": jnp.arange(91.0).reshape(13, 7), "b": jnp.arange(15.0).reshape(5, 3)}
  before = _cache_sizes(_topk_by_shape), _cache_sizes(_random_scores)
  masks = jaxprune.magnitude(0.5).masks(params)
  assert [int(m.sum()) for m in jax.tree.leaves(masks)] == [45, 7]
  assert masks["a"][-1].all() and not masks["a"][0].any()
  state = jaxprune.sparse.static_sparse(optax.sgd(0.1), 0.75, seed=11).init(params)
  assert [int(m.sum()) for m in jax.tree.leaves(jaxprune.masks_of(state))] == [23, 4]
  after = _cache_sizes(_topk_by_shape), _cache_sizes(_random_scores)
  assert after[0] == (before[0][0] + 1, before[0][1])  # one shape set: both calls share it
  assert after[1] == (before[1][0] + 1, before[1][1])


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_another_default_backend_takes_the_plain_compile(monkeypatch, platform):
  x = np.ones(4, np.float32)
  assert _compile.small_cpu_call([x])
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  assert not _compile.small_cpu_call([x])
  assert not _compile.small_cpu_call([])  # only static arguments: made on the default one
