import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxprune
from jaxprune import select


def argsort_mask(scores: np.ndarray, k: int) -> np.ndarray:
  """Reference: stable descending sort, first k kept (ties: lower index first)."""
  order = np.argsort(-scores.ravel().astype(np.float32), kind="stable")
  keep = np.zeros(scores.size, bool)
  keep[order[:k]] = True
  return keep.reshape(scores.shape)


def test_layer_scope_keeps_exact_count_per_leaf():
  scores = {
    "a": jax.random.normal(jax.random.key(0), (30, 7)),
    "b": jax.random.normal(jax.random.key(1), (11,)),
    "c": None,
  }
  m = jaxprune.topk_mask(scores, 0.6)
  assert int(m["a"].sum()) == 210 - 126
  assert int(m["b"].sum()) == 11 - 7  # round(6.6) = 7 pruned
  assert m["c"] is None
  np.testing.assert_array_equal(m["a"], argsort_mask(np.asarray(scores["a"]), 84))


def test_global_scope_one_threshold():
  scores = {"a": jnp.array([[9.0, 8.0], [7.0, 6.0]]), "b": jnp.array([1.0, 2.0, 10.0, 0.5])}
  m = jaxprune.topk_mask(scores, 0.5, scope="global")
  assert m["a"].tolist() == [[True, True], [True, False]]
  assert m["b"].tolist() == [False, False, True, False]


def test_ties_keep_lower_index_then_earlier_leaf():
  m = jaxprune.topk_mask({"w": jnp.ones((2, 3))}, 0.5)
  assert m["w"].tolist() == [[True, True, True], [False, False, False]]
  m = jaxprune.topk_mask({"a": jnp.ones(3), "b": jnp.ones(3)}, 0.5, scope="global")
  assert m["a"].tolist() == [True, True, True]
  assert m["b"].tolist() == [False, False, False]
  m = jaxprune.topk_mask({"w": jnp.array([1.0, 2.0, 2.0, 2.0, 0.0])}, 0.6)
  assert m["w"].tolist() == [False, True, True, False, False]


def test_negative_scores_infinities_and_signed_zero():
  x = jnp.array([-jnp.inf, -2.0, -0.0, 0.0, 1e-30, jnp.inf, -1e30])
  m = jaxprune.topk_mask({"w": x}, 4 / 7)
  assert m["w"].tolist() == [False, False, True, False, True, True, False]


def test_sparsity_zero_keeps_all_and_near_one_keeps_one():
  x = jax.random.normal(jax.random.key(2), (100,))
  assert bool(jaxprune.topk_mask({"w": x}, 0.0)["w"].all())
  m = jaxprune.topk_mask({"w": x}, 0.999)["w"]
  assert int(m.sum()) == 0  # round(99.9) = 100 pruned
  m = jaxprune.topk_mask({"w": x}, 0.99)["w"]
  assert int(m.sum()) == 1 and bool(m[jnp.argmax(x)])


def test_jit_with_traced_sparsity_does_not_recompile():
  f = jax.jit(lambda s, x: select.topk_leaves([x], s, "layer")[0])
  x = jax.random.normal(jax.random.key(3), (1000,))
  counts = [int(f(s, x).sum()) for s in (0.1, 0.5, 0.9)]
  assert counts == [900, 500, 100]
  assert f._cache_size() == 1


def test_bf16_scores():
  x = jnp.arange(10, dtype=jnp.bfloat16)
  assert jaxprune.topk_mask({"w": x}, 0.3)["w"].tolist() == [False] * 3 + [True] * 7


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity(bad):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    jaxprune.topk_mask({"w": jnp.ones(3)}, bad)


def test_bad_scope():
  with pytest.raises(ValueError, match="scope must be 'layer' or 'global'"):
    jaxprune.topk_mask({"w": jnp.ones(3)}, 0.5, scope="model")


# A few shapes only, so compiled selectors are reused across examples.
SHAPES = [(1,), (7,), (3, 5), (16, 16), (2, 3, 4)]
scores_strategy = hnp.arrays(
  np.float32,
  st.sampled_from(SHAPES),
  elements=st.floats(-4, 4, width=32) | st.sampled_from([0.0, 1.0, -1.0]),
)


@settings(max_examples=40)
@given(scores=scores_strategy, sparsity=st.floats(0, 0.999))
def test_property_exact_count_and_equals_argsort(scores, sparsity):
  m = np.asarray(jaxprune.topk_mask({"w": jnp.asarray(scores)}, sparsity)["w"])
  k = scores.size - round(sparsity * scores.size)  # Python's round, float64
  assert m.shape == scores.shape
  assert int(m.sum()) == k
  np.testing.assert_array_equal(m, argsort_mask(scores, k))


@settings(max_examples=25)
@given(a=scores_strategy, b=scores_strategy, sparsity=st.floats(0, 0.999))
def test_property_global_equals_argsort_of_concatenation(a, b, sparsity):
  m = jaxprune.topk_mask({"a": jnp.asarray(a), "b": jnp.asarray(b)}, sparsity, scope="global")
  n = a.size + b.size
  k = n - round(sparsity * n)
  ref = argsort_mask(np.concatenate([a.ravel(), b.ravel()]), k)
  got = np.concatenate([np.asarray(m["a"]).ravel(), np.asarray(m["b"]).ravel()])
  np.testing.assert_array_equal(got, ref)


@settings(max_examples=300, deadline=None)
@given(sparsity=st.floats(0, 1, exclude_max=True), n=st.integers(0, 10**6))
def test_property_count_is_pythons_round_of_the_float64_product(sparsity, n):
  assert select.n_pruned(n, sparsity) == round(sparsity * n)
  assert select.n_keep(n, sparsity) == n - round(sparsity * n)


def test_count_matches_torch_rule_where_float32_differs():
  # 0.3 * 95 = 28.499999999999996 in float64 (torch prunes 28); float32 gives 28.5000011.
  x = jnp.arange(95.0)
  assert int((~jaxprune.topk_mask({"w": x}, 0.3)["w"]).sum()) == 28
  assert int((~jaxprune.magnitude(0.3).masks({"w": x.reshape(19, 5)})["w"]).sum()) == 28
  differ = [
    (s, n)
    for n in range(1, 400)
    for s in (0.05, 0.1, 0.3, 0.7, 0.9)
    if round(s * n) != int(np.round(np.float32(s) * np.float32(n)))
  ]
  assert differ, "the float32 product must disagree somewhere, or this test checks nothing"
  for s, n in differ[:5]:
    m = jaxprune.topk_mask({"w": jnp.arange(float(n))}, s)["w"]
    assert int((~m).sum()) == round(s * n), (s, n)


def test_nan_scores_rank_first_whatever_their_sign():
  x = jnp.array([1.0, jnp.nan, -jnp.nan, 3.0, 2.0, -jnp.inf])
  m = jaxprune.topk_mask({"w": x}, 0.5)["w"]
  assert m.tolist() == [False, True, True, True, False, False]


@pytest.mark.parametrize(
  "scores, scope, match",
  [
    ({"w": jnp.ones((0, 3))}, "layer", "no entries"),
    ({}, "layer", "no arrays"),
    ({"w": None}, "layer", "no arrays"),
    ([1.0, 2.0, 3.0], "layer", "scalar"),
    ({"w": jnp.ones(3)}, "model", "scope must be"),
  ],
)
def test_topk_mask_errors(scores, scope, match):
  with pytest.raises(ValueError, match=match):
    jaxprune.topk_mask(scores, 0.5, scope=scope)


def test_scalars_pool_in_global_scope():
  m = jaxprune.topk_mask([1.0, 3.0, 2.0], 0.5, scope="global")
  assert [bool(x) for x in m] == [False, True, False]  # round(1.5) = 2 pruned: ties to even


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", None])
def test_sparsity_not_a_number_in_range(bad):
  with pytest.raises((ValueError, TypeError), match="sparsity must be"):
    jaxprune.topk_mask({"w": jnp.ones(3)}, bad)


def test_traced_sparsity_is_clipped_and_nan_removes_nothing():
  f = jax.jit(lambda s, x: select.topk_leaves([x], s, "layer")[0])
  x = jnp.arange(10.0)
  assert int(f(1.5, x).sum()) == 0
  assert int(f(-0.5, x).sum()) == 10
  assert int(f(jnp.nan, x).sum()) == 10


def test_denormal_scores_rank_above_zero():
  # XLA:CPU flushes denormals in float compares; the keys are built from the bits.
  m = jaxprune.topk_mask({"w": jnp.array([0.0, 1e-45, -0.0, 0.0])}, 0.75)["w"]
  assert m.tolist() == [False, True, False, False]


def ranked_mask(flat: np.ndarray, k: int) -> np.ndarray:
  """Reference with NaN first (either sign), then by value (-0.0 == 0.0), then position."""
  x = np.asarray(flat, np.float64).ravel()
  nan = np.isnan(x)
  order = np.lexsort((np.arange(x.size), -np.where(nan, 0.0, x), ~nan))
  keep = np.zeros(x.size, bool)
  keep[order[:k]] = True
  return keep


SPECIAL = st.sampled_from([0.0, -0.0, 1.0, 2.0, np.nan, -np.inf, np.inf, 1e-45])
LAYER_SHAPES = [(3, 5), (7,), (16, 16)]  # fixed: one compiled selection for all examples


@settings(max_examples=20, deadline=None)
@given(
  scores=st.tuples(
    *[
      hnp.arrays(np.float32, s, elements=SPECIAL | st.floats(-4, 4, width=32)) for s in LAYER_SHAPES
    ]
  ),
  sparsity=st.floats(0, 0.999),
)
def test_property_layer_scope_selects_every_leaf_in_one_pass(scores, sparsity):
  masks = select.topk_leaves([jnp.asarray(s) for s in scores], sparsity, "layer")
  for s, m in zip(scores, masks):
    k = s.size - round(sparsity * s.size)
    np.testing.assert_array_equal(np.asarray(m).ravel(), ranked_mask(s, k))


def test_layer_scope_one_leaf_breaks_ties_the_other_keeps_all_copies():
  a, b = select.topk_by_count([jnp.ones(6), jnp.array([3.0, 1.0, 2.0, 0.0])], [3, 2], "layer")
  assert a.tolist() == [True] * 3 + [False] * 3
  assert b.tolist() == [True, False, True, False]


def test_large_ties_cut_beyond_the_first_position_digit():
  # 300,000 scores (histograms in parts; positions above 2**16) of five values, NaN and
  # signed zeros among them: the cut falls deep inside one value's ~60,000 copies.
  rng = np.random.default_rng(0)
  x = rng.choice(np.array([np.nan, 1.0, 0.0, -0.0, -1.0], np.float32), size=300_000)
  for removed in (100_000, 250_001):
    (m,) = select.topk_by_count([jnp.asarray(x)], [removed], "layer")
    np.testing.assert_array_equal(np.asarray(m), ranked_mask(x, x.size - removed))
  a, b = jnp.asarray(x[:120_000]), jnp.asarray(x[120_000:])
  m = select.topk_by_count([a, b], [150_000], "global")
  got = np.concatenate([np.asarray(v) for v in m])
  np.testing.assert_array_equal(got, ranked_mask(x, x.size - 150_000))


# With a block of 12: three blocks and a tail, two exact blocks, and one short array (one
# pass for key and position digits, next to the long ones' key-only passes).
BLOCKED_SHAPES = [(37,), (3, 8), (9,)]


@jax.jit
def _blocked_masks(scores, ks_layer, k_global):
  flat = [jnp.ravel(s) for s in scores]
  layer = select.keep_topk_groups(flat, [0, 1, 2], ks_layer, to_key=select.sortable_keys)
  pooled = select.keep_topk_groups(flat, [0, 0, 0], k_global, to_key=select.sortable_keys)
  return layer, pooled


@settings(max_examples=25, deadline=None)
@given(
  scores=st.tuples(
    *[
      hnp.arrays(np.float32, s, elements=SPECIAL | st.sampled_from([0.5, -0.5]))
      for s in BLOCKED_SHAPES
    ]
  ),
  fractions=st.tuples(*[st.floats(0, 1)] * 4),
)
def test_property_passes_in_blocks_equal_the_reference(scores, fractions):
  # Blocks of 12 entries: the loop over blocks, the tail, and the position offsets of
  # later blocks and later leaves are all exercised on small arrays with many ties.
  sizes = [int(np.prod(s)) for s in BLOCKED_SHAPES]
  ks = [round(f * n) for f, n in zip(fractions, sizes)]  # 0 and n included
  k_global = round(fractions[3] * sum(sizes))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(select, "_BLOCK", 12)  # read when the selection is traced (once)
    layer, pooled = _blocked_masks(
      [jnp.asarray(s) for s in scores], jnp.array(ks, jnp.int32), jnp.array([k_global], jnp.int32)
    )
  for s, m, k in zip(scores, layer, ks):
    np.testing.assert_array_equal(np.asarray(m), ranked_mask(s, k))
  got = np.concatenate([np.asarray(m) for m in pooled])
  np.testing.assert_array_equal(
    got, ranked_mask(np.concatenate([s.ravel() for s in scores]), k_global)
  )


def test_all_tied_arrays_keep_the_first_positions_for_every_k():
  # Four small arrays (one histogram per pass), every score equal: the position passes
  # decide everything; k = 0, k = n and cuts inside each array, layer and global.
  shapes = [(5, 3), (4,), (2, 2, 2), (7,)]
  sizes = [int(np.prod(s)) for s in shapes]
  scores = [jnp.full(s, 2.0) for s in shapes]
  flat = [jnp.ravel(s) for s in scores]
  select_jit = jax.jit(
    lambda ks, groups: select.keep_topk_groups(flat, groups, ks, to_key=select.sortable_keys),
    static_argnums=1,
  )
  for ks in ([0, 0, 0, 0], sizes, [1, 3, 0, 6], [15, 1, 8, 0]):
    masks = select_jit(jnp.array(ks, jnp.int32), (0, 1, 2, 3))
    for m, n, k in zip(masks, sizes, ks):
      assert np.asarray(m).tolist() == [True] * k + [False] * (n - k)
  total = sum(sizes)
  for k in (0, 1, 16, 20, total - 1, total):
    masks = select_jit(jnp.array([k], jnp.int32), (0, 0, 0, 0))
    assert np.concatenate([np.asarray(m) for m in masks]).tolist() == [True] * k + [False] * (
      total - k
    )


def test_locate_equals_a_numpy_suffix_search():
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 3, (3, 256)).astype(np.int32)
  counts[1, 40:] = 0  # everything in the lowest bins
  counts[2] = 0
  counts[2, 255] = 5
  locate = jax.jit(select._locate)
  for need in ([1, 1, 1], [0, 7, 5], [100, 50, 6], [10**6, 10**6, 10**6], [300, 3, 4]):
    b, above = locate(jnp.asarray(counts), jnp.array(need, jnp.int32))
    for g in range(3):
      suffix = np.cumsum(counts[g, ::-1])[::-1]  # suffix[i] = sum(counts[g, i:])
      hits = np.nonzero(suffix >= need[g])[0]
      expect = int(hits[-1]) if len(hits) else 0
      assert int(b[g]) == expect, (g, need[g])
      assert int(above[g]) == int(counts[g, expect + 1 :].sum())


def _argsort_mask(x: np.ndarray, keep: int) -> np.ndarray:
  ref = np.zeros(x.size, bool)
  ref[np.argsort(-x.reshape(-1).astype(np.float64), kind="stable")[:keep]] = True
  return ref.reshape(x.shape)


def test_int32_scores_rank_exactly_above_float32_precision():
  # float32 holds 2**24 + 1 as 2**24: the two tied, and the lower index (the smaller) won
  x = np.array([2**24, 2**24 + 1, 2**24 + 3, 2**24 + 2, -(2**31), 2**31 - 1], np.int32)
  m = jaxprune.topk_mask({"a": jnp.asarray(x)}, 0.5)["a"]
  np.testing.assert_array_equal(np.asarray(m), _argsort_mask(x, 3))
  np.testing.assert_array_equal(np.asarray(m), [False, False, True, True, False, True])
  u = np.array([2**32 - 2, 2**32 - 1, 5, 2**24], np.uint32)
  m = jaxprune.topk_mask({"a": jnp.asarray(u)}, 0.75)["a"]
  np.testing.assert_array_equal(np.asarray(m), [False, True, False, False])


@settings(max_examples=10, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  sparsity=st.floats(0, 0.99),
  scope=st.sampled_from(["layer", "global"]),
)
def test_64_bit_scores_rank_exactly(seed, sparsity, scope):
  """With jax_enable_x64, float64 / int64 neighbours that float32 merges stay apart."""
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    f = 1.0 + rng.integers(0, 8, size=(6, 5)) * 1e-12  # one float32 value, 8 float64 ones
    f.flat[rng.integers(0, 30)] = np.nan
    i = 2**40 + rng.integers(-3, 4, size=7)
    scores = {"f": jnp.asarray(f), "i": jnp.asarray(i, jnp.int64)}
    masks = jaxprune.topk_mask(scores, sparsity, scope=scope)
    assert masks["f"].shape == (6, 5) and masks["i"].shape == (7,)
    if scope == "layer":
      for name, x in (("f", f), ("i", i.astype(np.float64))):
        keep = x.size - select.n_pruned(x.size, sparsity)
        ref = _argsort_mask(np.where(np.isnan(x), np.inf, x), keep)
        np.testing.assert_array_equal(np.asarray(masks[name]), ref, err_msg=name)
    else:  # pooled as their common dtype, float64: 2**40 +- 3 are exact there
      x = np.concatenate([f.reshape(-1), i.astype(np.float64)])
      keep = x.size - select.n_pruned(x.size, sparsity)
      ref = _argsort_mask(np.where(np.isnan(x), np.inf, x), keep)
      got = np.concatenate([np.asarray(masks["f"]).reshape(-1), np.asarray(masks["i"])])
      np.testing.assert_array_equal(got, ref)


def test_64_bit_params_through_pruners_and_structures():
  with jax.enable_x64(True):
    w = jnp.array([[1 + 1e-12, 1.0], [1 + 2e-12, 1 + 3e-12]], jnp.float64)
    m = jaxprune.magnitude(0.5).masks({"w": w})["w"]
    np.testing.assert_array_equal(np.asarray(m), [[False, False], [True, True]])
    rows = jnp.array([1 + 1e-12, 1.0, 1 + 3e-12, 1 + 2e-12], jnp.float64)
    k = rows[:, None] * jnp.ones((4, 3), jnp.float64)  # input rows; n:m picks along them
    m = jaxprune.magnitude(0.5, structure=jaxprune.n_m(1, 2)).masks({"k": k})["k"]
    np.testing.assert_array_equal(np.asarray(m[:, 0]), [True, False, True, False])
    neurons = jaxprune.magnitude(0.5, structure=jaxprune.neurons("l2"))
    m = neurons.masks({"k": k.T})["k"]  # output units of (3, 4): the norms 1 + e
    np.testing.assert_array_equal(np.asarray(m[0]), [False, False, True, True])
    grads = {"w": jnp.ones_like(w)}
    m = jaxprune.saliency(0.5).masks({"w": w}, grads=grads)["w"]
    np.testing.assert_array_equal(np.asarray(m), [[False, False], [True, True]])


def test_two_nans_in_an_n_m_group_keep_exactly_n():
  k = jnp.array([[jnp.nan], [jnp.nan], [1.0], [2.0]])
  np.testing.assert_array_equal(np.asarray(jaxprune.n_m(1, 2).keep(k, 1))[:, 0], [1, 0, 0, 1])


def test_complex_scores_are_refused():
  with pytest.raises(TypeError, match="not real numbers.*jnp.abs"):
    jaxprune.topk_mask({"a": jnp.array([1 + 2j, 3j])}, 0.5)
