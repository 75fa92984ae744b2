import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def conv_params(key=0):
  k1, k2 = jax.random.split(jax.random.key(key))
  return {
    "conv1": {"kernel": jax.random.normal(k1, (3, 3, 4, 8)), "bias": jnp.zeros(8)},
    "dense": {"kernel": jax.random.normal(k2, (8, 6)), "bias": jnp.zeros(6)},
  }


def test_filters_remove_whole_filters_with_smallest_l1():
  params = conv_params()
  m = jaxprune.magnitude(0.5, structure="filters").masks(params)["conv1"]["kernel"]
  kept = np.asarray(m).reshape(-1, 8)
  assert (kept.all(axis=0) | ~kept.any(axis=0)).all()  # each filter all-or-nothing
  l1 = np.abs(np.asarray(params["conv1"]["kernel"])).reshape(-1, 8).sum(0)
  np.testing.assert_array_equal(kept[0], l1 >= np.sort(l1)[4])
  assert kept[0].sum() == 4


def test_neurons_use_l2_and_channels_remove_rows():
  w = jnp.array([[3.0, 2.0, 0.0], [0.0, 2.0, 2.9]])  # L1: 3, 4, 2.9; L2: 3, 2.83, 2.9
  m = jaxprune.magnitude(1 / 3, structure=jaxprune.neurons()).masks({"w": w})["w"]
  assert m[0].tolist() == [True, False, True]
  m = jaxprune.magnitude(1 / 3, structure=jaxprune.filters()).masks({"w": w})["w"]
  assert m[0].tolist() == [True, True, False]
  m = jaxprune.magnitude(0.5, structure="channels").masks({"w": w})["w"]
  assert m.tolist() == [[True] * 3, [False] * 3]


def test_blocks_are_whole_tiles():
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 12))
  m = jaxprune.magnitude(0.5, structure=jaxprune.blocks((4, 3))).masks({"w": w})["w"]
  tiles = np.asarray(m).reshape(3, 3, 2, 4, 4, 3).transpose(2, 4, 0, 1, 3, 5).reshape(8, -1)
  assert (tiles.all(axis=1) | ~tiles.any(axis=1)).all()
  assert tiles.all(axis=1).sum() == 4


@settings(max_examples=15)
@given(
  nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8)]),
  groups=st.integers(1, 3),
  out=st.integers(1, 5),
  seed=st.integers(0, 1000),
)
def test_property_n_m_keeps_exactly_n_of_every_m(nm, groups, out, seed):
  n, m = nm
  w = jnp.asarray(np.round(np.random.default_rng(seed).normal(size=(groups * m, out))))  # ties
  mask = jaxprune.magnitude(1 - n / m, structure=jaxprune.n_m(n, m)).masks({"w": w})["w"]
  counts = np.asarray(mask).reshape(groups, m, out).sum(axis=1)
  assert (counts == n).all()
  kept = np.where(np.asarray(mask), np.abs(np.asarray(w)), np.inf).reshape(groups, m, out)
  dropped = np.where(np.asarray(mask), -np.inf, np.abs(np.asarray(w))).reshape(groups, m, out)
  assert (kept.min(axis=1) >= dropped.max(axis=1)).all()


def test_n_m_on_conv_kernels_and_gradual_ramp_in_training():
  params = conv_params()
  sched = jaxprune.agp(0.5, begin=0, end=8, every=2)
  pruner = jaxprune.magnitude(sched, structure=jaxprune.n_m(2, 4), where="conv1/kernel")
  tx = jaxprune.masked(optax.sgd(0.01), pruner)
  state = tx.init(params)
  per_group = []
  for _ in range(9):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    k = np.asarray(params["conv1"]["kernel"] != 0).reshape(3, 3, 1, 4, 8).sum(axis=3)
    per_group.append(sorted(set(k.ravel().tolist())))
  assert per_group[0] == [4] and per_group[-1] == [2]
  assert per_group[2] == [3]  # s_2 = 0.5 * (1 - 0.75^3) = 0.289: 4 - round(1.16) kept


def test_global_structured_counts_groups():
  params = conv_params()
  pruner = jaxprune.magnitude(0.5, structure="neurons", scope="global")
  m = pruner.masks(params)
  kept = int(np.asarray(m["conv1"]["kernel"]).reshape(-1, 8)[0].sum())
  kept += int(np.asarray(m["dense"]["kernel"])[0].sum())
  assert kept == 7  # 14 output units, 7 removed


def test_ties_keep_the_lower_group_then_the_earlier_param_in_natural_order():
  # The documented rule (Pruner.masks): equal group norms keep the lower index; across
  # params (global scope) the earlier one in natural path order: l2 before l10.
  ones = jnp.ones((2, 4))
  m = jaxprune.magnitude(0.5, structure="filters").masks({"w": ones})["w"]
  np.testing.assert_array_equal(np.asarray(m)[0], [1, 1, 0, 0])
  m = jaxprune.magnitude(0.5, structure="channels").masks({"w": ones.T})["w"]
  np.testing.assert_array_equal(np.asarray(m)[:, 0], [1, 1, 0, 0])
  m = jaxprune.magnitude(0.5, structure=jaxprune.blocks((1, 2))).masks({"w": ones})["w"]
  np.testing.assert_array_equal(np.asarray(m), [[1, 1, 1, 1], [0, 0, 0, 0]])
  m = jaxprune.magnitude(0.5, structure="filters", scope="global").masks({"l10": ones, "l2": ones})
  assert bool(m["l2"].all()) and not bool(m["l10"].any())


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: jaxprune.magnitude(0.5, structure="rows"), "Unknown structure 'rows'"),
    (lambda: jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)), None),
    (lambda: jaxprune.magnitude(0.9, structure=jaxprune.n_m(2, 4)), "removes 0.5"),
    (lambda: jaxprune.n_m(5, 4), "0 < n <= m"),
    (
      lambda: jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4), scope="global"),
      "scope='layer'",
    ),
    (lambda: jaxprune.blocks((0, 2)), "positive ints"),
    (lambda: jaxprune.blocks((2.0, 2)), r"positive ints, got \(2.0, 2\)"),  # was a raw jnp error
    (lambda: jaxprune.blocks(2), r"\(rows, cols\) shape of positive ints, got 2"),  # was len()
    (lambda: jaxprune.n_m(2.0, 4), "got n=2.0, m=4"),
    (lambda: jaxprune.n_m(True, 4), "got n=True"),
    (lambda: jaxprune.neurons("l3"), "'l1' or 'l2'"),
  ],
)
def test_structure_construction_errors(make, match):
  if match is None:
    make()
    return
  with pytest.raises(ValueError, match=match):
    make()


def test_numpy_integers_make_structures():
  # n_m(np.int64(2), np.int64(4)) was refused with "needs integers 0 < n <= m, got n=2, m=4".
  w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
  for n, m in ((np.int64(2), np.int64(4)), (np.int32(2), 4)):
    got = jaxprune.magnitude(0.5, structure=jaxprune.n_m(n, m)).masks({"w": w})["w"]
    want = jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)).masks({"w": w})["w"]
    assert bool((got == want).all())
  blocks = jaxprune.blocks((np.int64(2), np.int64(2)))
  assert blocks.shape == (2, 2) and type(blocks.shape[0]) is int
  assert int(jaxprune.magnitude(0.5, structure=blocks).masks({"w": w})["w"].sum()) == 16


def test_structure_on_a_param_of_the_wrong_rank_names_it():
  params = {"bias": jnp.ones(4), "w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"'bias' has shape \(4,\)"):
    jaxprune.magnitude(0.5, structure="filters", where="bias").masks(params)
  with pytest.raises(ValueError, match=r"input axis \(-2\) of 'w' must divide by 8"):
    jaxprune.magnitude(0.75, structure=jaxprune.n_m(2, 8)).masks(params)
  with pytest.raises(ValueError, match="3x3 blocks"):
    jaxprune.magnitude(0.5, structure=jaxprune.blocks((3, 3))).masks(params)
  # a bias has no input axis: said so, not "the input axis (-2) of 'bias' must divide by 4"
  for structure in (jaxprune.n_m(2, 4), jaxprune.blocks((2, 2))):
    with pytest.raises(ValueError, match=r"needs a kernel with ndim >= 2, but 'bias' has shape"):
      jaxprune.magnitude(0.5, structure=structure, where="bias").masks(params)


def test_every_structure_implements_the_interface():
  from jaxprune.structures import Structure

  for s in (
    jaxprune.structures.as_structure(None),
    jaxprune.neurons(),
    jaxprune.filters(),
    jaxprune.channels(),
    jaxprune.blocks((2, 2)),
    jaxprune.n_m(2, 4),
  ):
    assert isinstance(s, Structure), s
  with pytest.raises(ValueError, match="n:m structure counts within each group"):
    jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4), scope="global")
