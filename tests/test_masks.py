import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def test_apply_mask_zeros_pruned_and_keeps_dtype():
  p = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.bfloat16), "b": jnp.ones(2)}
  out = jaxprune.apply_mask(p, {"w": jnp.array([[True, False], [False, True]]), "b": None})
  assert out["w"].dtype == jnp.bfloat16
  assert out["w"].tolist() == [[1.0, 0.0], [0.0, 4.0]]
  assert out["b"] is p["b"]


def test_apply_mask_mismatch_names_path():
  with pytest.raises(ValueError, match="params have 'b' but the mask has 'x'"):
    jaxprune.apply_mask({"a": jnp.ones(2), "b": jnp.ones(2)}, {"a": None, "x": None})


def test_summary_counts_and_table():
  params = {
    "fc1": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "bias": jnp.zeros(2)},
    "fc2": {"kernel": jnp.ones((2, 3))},
  }
  s = jaxprune.summary(params, where=r"kernel")
  assert [r.path for r in s.rows] == ["fc1/kernel", "fc2/kernel"]
  assert s["fc1/kernel"].zeros == 3 and s["fc1/kernel"].sparsity == 0.75
  assert s.size == 10 and s.zeros == 3 and s.sparsity == pytest.approx(0.3)
  table = str(s).splitlines()
  assert table[0].split() == ["param", "shape", "size", "zeros", "sparsity"]
  assert table[2].split() == ["fc1/kernel", "2x2", "4", "3", "75.00%"]
  assert table[-1].split() == ["total", "10", "3", "30.00%"]
  assert jaxprune.summary(params, where="").size == 12
  with pytest.raises(KeyError, match="fc3"):
    s["fc3"]


def test_summary_of_masks_counts_false():
  s = jaxprune.summary({"w": jnp.array([True, False, False, True]), "b": None})
  assert s.zeros == 2 and s.as_dict() == {"w": 0.5, "total": 0.5}


@settings(max_examples=12)
@given(shape=st.sampled_from([(1,), (7,), (3, 5), (2, 3, 9)]), seed=st.integers(0, 99))
def test_pack_roundtrip_one_bit_per_weight(shape, seed):
  m = {"w": jax.random.bernoulli(jax.random.key(seed), 0.3, tuple(shape)), "b": None}
  packed = jaxprune.pack_masks(m)
  assert packed["w"].dtype == jnp.uint8 and packed["w"].size == -(-int(np.prod(shape)) // 8)
  assert packed["b"] is None
  back = jaxprune.unpack_masks(packed, {"w": jnp.zeros(shape), "b": jnp.zeros(2)})
  np.testing.assert_array_equal(back["w"], m["w"])


def test_combine_is_and_with_none_as_all_kept():
  a = {"w": jnp.array([True, True, False]), "b": None}
  b = {"w": jnp.array([True, False, True]), "b": None}
  assert jaxprune.combine(a, b)["w"].tolist() == [True, False, False]
  assert jaxprune.combine(a, {"w": None, "b": None})["w"].tolist() == [True, True, False]
  with pytest.raises(ValueError, match="at least one"):
    jaxprune.combine()


def test_summary_default_totals_prunable_weights_not_biases():
  params = {"fc": {"kernel": jnp.array([[1.0, 0.0], [2.0, 3.0]]), "bias": jnp.zeros(2)}}
  s = jaxprune.summary(params)
  assert [r.path for r in s.rows] == ["fc/kernel"] and s.sparsity == 0.25
  assert jaxprune.summary(params, where=None).as_dict() == s.as_dict()
  assert jaxprune.summary(params, where="").sparsity == 0.5  # "" lists every array
  with pytest.raises(ValueError, match=r"where='conv' selects none.*fc/kernel"):
    jaxprune.summary(params, where="conv")


def test_pack_masks_rejects_params():
  with pytest.raises(TypeError, match="leaf 'w' is float32"):
    jaxprune.pack_masks({"w": jnp.ones((2, 2))})


def test_mask_helpers_name_bad_inputs():
  with pytest.raises(TypeError, match="apply_mask takes bool masks.*'w' is float32"):
    jaxprune.apply_mask({"w": jnp.ones(2)}, {"w": jnp.ones(2)})
  with pytest.raises(
    ValueError, match=r"mask #2 has the leaves \['v'\], the masks before it \['w'\]"
  ):
    jaxprune.combine({"w": jnp.ones(2, bool)}, {"v": jnp.ones(2, bool)})
  with pytest.raises(
    ValueError, match=r"mask #2 for 'w' has shape \(3,\), the masks before it \(2,\)"
  ):
    jaxprune.combine({"w": jnp.ones(2, bool)}, {"w": jnp.ones(3, bool)})
  with pytest.raises(ValueError, match=r"cannot unpack to shape \(4, 4\): expected \(2,\) uint8"):
    jaxprune.unpack_masks({"w": jnp.ones(1, jnp.uint8)}, {"w": jnp.ones((4, 4))})


def test_apply_mask_and_combine_take_masks_in_other_containers():
  # A dict of masks for FrozenDict params (or a tuple for a list) has the same paths but
  # failed inside jax.tree.map with a pytree structure error.
  from flax.core import FrozenDict

  params = {"a": {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]])}}
  masks = {"a": {"w": jnp.array([[True, False], [True, False]])}}
  out = jaxprune.apply_mask(FrozenDict(params), masks)
  assert isinstance(out, FrozenDict) and out["a"]["w"].tolist() == [[1.0, 0.0], [3.0, 0.0]]
  assert jaxprune.apply_mask([jnp.ones(2)], (jnp.array([False, True]),))[0].tolist() == [0, 1]
  both = jaxprune.combine(FrozenDict(masks), {"a": {"w": jnp.array([[False, True]] * 2)}})
  assert isinstance(both, FrozenDict) and int(both["a"]["w"].sum()) == 0
