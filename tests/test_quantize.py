import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


@settings(max_examples=20)
@given(seed=st.integers(0, 1000), sparsity=st.floats(0.0, 0.95), per_channel=st.booleans())
def test_zeros_stay_zero_and_error_is_half_a_step(seed, sparsity, per_channel):
  w = jax.random.normal(jax.random.key(seed), (16, 8))
  params = jaxprune.apply_mask({"w": w}, jaxprune.magnitude(sparsity).masks({"w": w}))
  q = jaxprune.quantize(params, per_channel=per_channel)
  back = jaxprune.dequantize(q)["w"]
  zero = np.asarray(params["w"]) == 0
  assert np.all(np.asarray(back)[zero] == 0)  # pruned stays pruned (tiny weights may round to 0)
  step = np.asarray(q["w"].scale)
  assert np.all(np.abs(np.asarray(back) - np.asarray(params["w"])) <= step / 2 + 1e-7)
  assert q["w"].values.dtype == jnp.int8


def test_biases_untouched_and_size_shrinks_with_sparsity():
  w = jax.random.normal(jax.random.key(0), (300, 100))
  params = {"fc": {"kernel": w, "bias": jnp.ones(100)}}
  q = jaxprune.quantize(params)
  assert q["fc"]["bias"] is params["fc"]["bias"]
  pruned = jaxprune.apply_mask(params, jaxprune.magnitude(0.9).masks(params))
  dense_f32 = jaxprune.compressed_size(params)
  sparse_int8 = jaxprune.compressed_size(jaxprune.quantize(pruned))
  assert sparse_int8 < dense_f32 / 8


def test_empty_leaves_quantize_to_empty_arrays():
  for per_channel in (True, False):
    q = jaxprune.quantize({"w": jnp.zeros((0, 4))}, per_channel=per_channel)
    back = np.asarray(jaxprune.dequantize(q)["w"])
    assert back.shape == (0, 4) and back.dtype == np.float32
    assert np.asarray(q["w"].scale).tolist() == ([1.0] * 4 if per_channel else 1.0)


def test_a_channel_below_the_normal_range_keeps_its_nonzero_weights():
  # max |w| / 127 is subnormal here; XLA flushed it to a scale of 0 and every weight to 0
  w = np.array([[1e-37, 3e-37], [-5e-37, 2e-37]], np.float32)
  tiny = np.finfo(np.float32).tiny
  for per_channel in (True, False):
    q = jaxprune.quantize({"w": w}, per_channel=per_channel)
    back = np.asarray(jaxprune.dequantize(q)["w"])
    assert (np.asarray(q["w"].scale) == tiny).all()
    expected = np.round(w / tiny).astype(np.float32) * tiny  # numpy reference
    np.testing.assert_array_equal(back, expected)
    assert (back != 0).all() and (np.abs(back - w) <= tiny / 2).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_leaf(bad):
  # the scale max|w| / 127 of that channel would be NaN or inf: the channel's kept
  # weights came back as 0 (NaN: scale 1, NaN cast to int8) or NaN, silently
  w = np.array([[1.0, 2.0], [bad, -3.0]], np.float32)
  with pytest.raises(ValueError, match=rf"'layer/kernel' has {bad} at \[1, 0\]"):
    jaxprune.quantize({"layer": {"kernel": w, "bias": np.zeros(2, np.float32)}})
  # a finite twin of the same tree quantizes
  q = jaxprune.quantize({"layer": {"kernel": np.nan_to_num(w, posinf=4.0, neginf=-4.0)}})
  assert q["layer"]["kernel"].values.shape == (2, 2)
