"""Tests for jaxprune.regularizers: proximal group lasso (SSL), L1, zero-group reports."""

from __future__ import annotations

import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.regularizers import (
  BATCHNORM_SCALES,
  GROUP_KINDS,
  block_soft_threshold,
  group_lasso,
  group_norms,
  l1,
  soft_threshold,
  zero_groups,
)

REDUCE = {"filter": (0, 1, 2), "channel": (0, 1, 3), "shape": (3,), "depth": (0, 1, 2, 3)}


def step(tx, params, grads, state=None, jit=False):
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update) if jit else tx.update
  updates, state = update(grads, state, params)
  return optax.apply_updates(params, updates), state


def zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


# --- the proximal operators --------------------------------------------------------------


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_group_norms_match_numpy_on_conv_kernel(kind):
  w = np.random.default_rng(0).normal(size=(3, 2, 4, 5)).astype(np.float32)
  expected = np.sqrt((w**2).sum(axis=REDUCE[kind]))
  np.testing.assert_allclose(group_norms(jnp.asarray(w), kind), expected, rtol=1e-6)
  shape = {"filter": (5,), "channel": (4,), "shape": (3, 2, 4), "depth": ()}[kind]
  assert group_norms(jnp.asarray(w), kind).shape == shape


def test_dense_groups_filter_is_column_channel_and_shape_are_rows():
  w = jnp.array([[3.0, 0.0], [4.0, 12.0]])  # (in=2, out=2)
  assert group_norms(w, "filter").tolist() == [5.0, 12.0]
  assert group_norms(w, "channel").tolist() == [3.0, 12.649110794067383]
  assert group_norms(w, "shape").tolist() == group_norms(w, "channel").tolist()
  assert group_norms(w, "depth").tolist() == 13.0


def test_block_soft_threshold_exact_values_on_conv_filters():
  w = np.zeros((1, 2, 2, 3), np.float32)  # (kh, kw, cin, cout)
  w[0, 0, 0, 0], w[0, 1, 1, 0] = 3.0, 4.0  # filter 0: norm 5  -> shrinks by half
  w[0, 0, 1, 1], w[0, 1, 0, 1] = 1.2, 1.6  # filter 1: norm 2  -> exactly 0
  w[0, 0, 0, 2] = -2.5  # filter 2: norm 2.5 == threshold -> exactly 0
  out = np.asarray(block_soft_threshold(jnp.asarray(w), 2.5, "filter"))
  expected = np.zeros_like(w)
  expected[0, 0, 0, 0], expected[0, 1, 1, 0] = 1.5, 2.0
  np.testing.assert_array_equal(out, expected)
  assert not np.signbit(out).any()  # +0.0, not -0.0


def test_block_soft_threshold_channel_shape_depth_hand_computed():
  w = jnp.array([[3.0, 4.0], [0.6, 0.8]])  # rows: norms 5, 1
  np.testing.assert_array_equal(
    block_soft_threshold(w, 1.0, "channel"), [[2.4000000953674316, 3.200000047683716], [0, 0]]
  )
  np.testing.assert_array_equal(
    block_soft_threshold(w, 1.0, "shape"), block_soft_threshold(w, 1.0, "channel")
  )
  depth_norm = np.sqrt(26.0)
  np.testing.assert_allclose(
    block_soft_threshold(w, 1.0, "depth"), w * (1 - 1 / depth_norm), rtol=1e-6
  )
  assert (block_soft_threshold(w, 5.5, "depth") == 0).all()


def test_threshold_zero_is_identity_and_zero_groups_stay_zero():
  w = jnp.array([[1.0, 0.0], [2.0, 0.0]])
  np.testing.assert_array_equal(block_soft_threshold(w, 0.0, "filter"), w)


def test_soft_threshold_exact():
  out = soft_threshold(jnp.array([-2.0, -0.5, 0.25, 0.5, 1.5]), 0.5)
  np.testing.assert_array_equal(out, [-1.5, 0.0, 0.0, 0.0, 1.0])
  assert not np.signbit(np.asarray(out)[1:4]).any()


def test_a_nan_weight_stays_nan_and_is_not_zeroed_as_a_pruned_group():
  # A NaN weight (a diverged step) was zeroed with its whole group: it looked pruned.
  nan = float("nan")
  w = jnp.array([[nan, 0.3], [2.0, 0.4]])  # filter 0 holds the NaN; filter 1 has norm 0.5
  out = np.asarray(block_soft_threshold(w, 0.1, "filter"))
  assert np.isnan(out[:, 0]).all()
  np.testing.assert_allclose(out[:, 1], [0.3 * 0.8, 0.4 * 0.8], rtol=1e-6)
  out = np.asarray(soft_threshold(jnp.array([nan, -0.05, 2.0]), 0.1))
  assert np.isnan(out[0]) and out[1] == 0.0 and out[2] == np.float32(1.9)
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
  grads = {"Dense_0": {"kernel": jnp.array([[nan, 0.0], [0.0, 0.0]])}}
  new, _ = step(optax.chain(optax.sgd(1.0), group_lasso(0.5)), params, grads)
  assert np.isnan(np.asarray(new["Dense_0"]["kernel"])[:, 0]).all()


def test_bfloat16_kernel_keeps_dtype_and_exact_zeros():
  w = jnp.array([[3.0, 0.1], [4.0, 0.1]], jnp.bfloat16)
  out = block_soft_threshold(w, 2.5, "filter")
  assert out.dtype == jnp.bfloat16
  assert out.astype(jnp.float32).tolist() == [[1.5, 0.0], [2.0, 0.0]]


FLOATS = st.floats(-10, 10, width=32, allow_subnormal=False)  # XLA on CPU flushes subnormals
# a few fixed shapes (Dense, 1-D conv, 2-D conv) so the jitted functions compile once each
KERNELS = st.sampled_from([(4, 3), (1, 5), (3, 2, 4), (2, 2, 3, 4), (1, 1, 1, 1)])
jit_block_soft_threshold = jax.jit(block_soft_threshold, static_argnames="kind")
jit_group_norms = jax.jit(group_norms, static_argnames=("kind", "keepdims"))
jit_soft_threshold = jax.jit(soft_threshold)


@settings(max_examples=50, deadline=None)
@given(
  w=hnp.arrays(np.float32, KERNELS, elements=FLOATS),
  threshold=st.floats(0, 10, width=32),
  kind=st.sampled_from(GROUP_KINDS),
)
def test_prox_group_norm_is_norm_minus_threshold(w, threshold, kind):
  threshold = np.float32(threshold)
  out = np.asarray(jit_block_soft_threshold(w, threshold, kind))
  norm = np.asarray(jit_group_norms(w, kind, keepdims=True))
  out_norm = np.asarray(jit_group_norms(out, kind, keepdims=True))
  np.testing.assert_allclose(out_norm, np.maximum(norm - threshold, 0), rtol=1e-5, atol=1e-5)
  assert (out[np.broadcast_to(norm <= threshold, w.shape)] == 0).all()
  # each group is scaled by a factor in [0, 1]: same direction, never grows
  factor = np.where(norm > 0, out_norm / np.where(norm > 0, norm, 1), 0)
  np.testing.assert_allclose(out, w * factor, rtol=1e-5, atol=1e-5)
  assert (factor <= 1 + 1e-6).all()


@settings(max_examples=50, deadline=None)
@given(
  w=hnp.arrays(np.float32, st.sampled_from([(7,), (3, 4)]), elements=FLOATS),
  threshold=st.floats(0, 10, width=32),
)
def test_soft_threshold_property(w, threshold):
  threshold = np.float32(threshold)
  out = np.asarray(jit_soft_threshold(w, threshold))
  np.testing.assert_allclose(np.abs(out), np.maximum(np.abs(w) - threshold, 0), rtol=1e-6)
  assert (np.sign(out)[out != 0] == np.sign(w)[out != 0]).all()
  assert (out[np.abs(w) <= threshold] == 0).all()


# --- group_lasso as an optax transform ----------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_group_lasso_lands_on_prox_of_optimizer_step(jit):
  params = {"Dense_0": {"kernel": jnp.array([[3.0, 0.3], [4.0, 0.4]]), "bias": jnp.ones(2)}}
  grads = {"Dense_0": {"kernel": jnp.array([[-10.0, 1.0], [0.0, 0.0]]), "bias": jnp.ones(2)}}
  tx = optax.chain(optax.sgd(0.1), group_lasso(5.0, learning_rate=0.5))  # threshold 2.5
  new, state = step(tx, params, grads, jit=jit)
  # sgd: kernel -> [[4, .2], [4, .4]]; filter norms: sqrt(32), sqrt(.2): one shrinks, one dies
  z = np.array([[4.0, 0.2], [4.0, 0.4]], np.float32)
  expected = z * np.array([1 - 2.5 / np.sqrt(32.0), 0.0], np.float32)
  np.testing.assert_allclose(new["Dense_0"]["kernel"], expected, rtol=1e-6)
  assert (new["Dense_0"]["kernel"][:, 1] == 0).all()
  np.testing.assert_allclose(new["Dense_0"]["bias"], [0.9, 0.9])  # not selected: plain sgd
  assert isinstance(state[1], optax.EmptyState)


def test_group_lasso_applies_kinds_in_turn():
  w = jnp.array([[3.0, 0.0], [4.0, 0.5]])
  params, grads = {"w": w}, {"w": jnp.zeros((2, 2))}
  new, _ = step(group_lasso(1.0, groups=("filter", "channel")), params, grads)
  expected = block_soft_threshold(block_soft_threshold(w, 1.0, "filter"), 1.0, "channel")
  np.testing.assert_array_equal(new["w"], expected)
  # filter first: column [3, 4] -> [2.4, 3.2], column [0, .5] -> 0; then rows shrink by 1
  np.testing.assert_allclose(new["w"], [[1.4, 0.0], [2.2, 0.0]], rtol=1e-6)


def test_group_lasso_accepts_one_kind_as_a_string():
  params, grads = {"w": jnp.array([[3.0, 0.3], [4.0, 0.4]])}, {"w": jnp.zeros((2, 2))}
  new, _ = step(group_lasso(2.5, groups="filter"), params, grads)
  assert new["w"].tolist() == [[1.5, 0.0], [2.0, 0.0]]


def test_group_lasso_inside_chain_with_adam_under_jit_on_linen_params():
  rng = np.random.default_rng(0)
  params = {
    "Conv_0": {
      "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
      "bias": jnp.zeros(4),
    },
    "Dense_0": {
      "kernel": jnp.asarray(0.01 * rng.normal(size=(4, 3)), jnp.float32),
      "bias": jnp.zeros(3),
    },
  }
  tx = optax.chain(optax.adam(1e-3), group_lasso(0.05, groups=("filter", "channel")))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = train_step(params, state, zeros_like(params))
  report = zero_groups(params)
  assert report["Dense_0/kernel", "filter"].zero == 3  # tiny kernel: all groups die
  assert report["Conv_0/kernel", "filter"].zero == 0  # norm ~ 4.2 >> 3 * 0.05
  assert not np.signbit(np.asarray(params["Dense_0"]["kernel"])).any()
  np.testing.assert_array_equal(params["Conv_0"]["bias"], jnp.zeros(4))


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.fc = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    return self.fc(x.mean(axis=(1, 2)))


def test_group_lasso_and_l1_on_nnx_state():
  model = Net(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  tx = optax.chain(optax.sgd(0.1), group_lasso(10.0, where=r"conv1/kernel$"), l1(0.5))
  new, _ = step(tx, state, zeros_like(state), jit=True)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert (new["conv1"]["kernel"][...] == 0).all()  # every filter norm < 10
  assert (new["bn1"]["scale"][...] == 0.5).all()  # BatchNorm scale 1 -> 1 - 0.5
  np.testing.assert_array_equal(new["fc"]["kernel"][...], state["fc"]["kernel"][...])
  np.testing.assert_array_equal(new["bn1"]["bias"][...], state["bn1"]["bias"][...])
  report = zero_groups(new, groups="filter")
  assert report["conv1/kernel", "filter"].zero == 4
  assert report["fc/kernel", "filter"].zero == 0


def test_group_lasso_with_nnx_optimizer():
  model = Net(nnx.Rngs(1))
  opt = nnx.Optimizer(model, optax.chain(optax.sgd(0.1), group_lasso(10.0)), wrt=nnx.Param)
  grads = zeros_like(nnx.state(model, nnx.Param))
  opt.update(model, grads)
  assert (model.conv1.kernel[...] == 0).all() and (model.fc.kernel[...] == 0).all()


def test_group_lasso_under_inject_hyperparams_with_a_schedule():
  params, grads = {"w": jnp.array([[3.0, 0.25], [4.0, 0.5]])}, {"w": jnp.zeros((2, 2))}
  tx = optax.inject_hyperparams(group_lasso)(strength=optax.linear_schedule(0.0, 2.5, 1))
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates, state = update(grads, state, params)  # strength 0: identity
  params = optax.apply_updates(params, updates)
  assert params["w"].tolist() == [[3.0, 0.25], [4.0, 0.5]]
  updates, state = update(grads, state, params)  # strength 2.5
  assert optax.apply_updates(params, updates)["w"].tolist() == [[1.5, 0.0], [2.0, 0.0]]


def fit_linear(tx, params, xs, ys):
  """Trains ``x @ kernel`` on the batches ``(xs[i], ys[i])`` in one jitted ``lax.scan``.

  Returns the final params and the kernel after every step.
  """

  def body(carry, batch):
    params, state = carry
    grads = jax.grad(mse)(params, *batch)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params["kernel"]

  (params, _), kernels = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), (xs, ys)))(params)
  return params, np.asarray(kernels)


def mse(params, x, y):
  return 0.5 * jnp.mean(jnp.sum((x @ params["kernel"] - y) ** 2, -1))


def regression(relevant, features=10, outputs=3, n=256, noise=0.1, seed=42):
  """``y = x @ w + noise`` where only the first ``relevant`` rows of ``w`` are non-zero."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, features)).astype(np.float32)
  w = np.zeros((features, outputs), np.float32)
  w[:relevant] = rng.normal(size=(relevant, outputs)) + 2.0
  y = (x @ w + noise * rng.normal(size=(n, outputs))).astype(np.float32)
  return x, y, w


def test_proximal_sgd_drives_irrelevant_features_to_exact_zero():
  """Linear regression, 4 of 10 input features matter; channel groups = kernel rows.

  SGD + group_lasso(learning_rate=lr) is proximal gradient descent: the irrelevant rows
  reach exactly zero and stay there, the relevant ones are only shrunk a little.
  """
  x, y, w_true = regression(relevant=4)
  lr, steps = 0.1, 200
  tx = optax.chain(optax.sgd(lr), group_lasso(0.05, groups="channel", learning_rate=lr))
  full_batch = np.broadcast_to(x, (steps, *x.shape)), np.broadcast_to(y, (steps, *y.shape))
  params, kernels = fit_linear(tx, {"kernel": jnp.ones((10, 3))}, *full_batch)
  assert (kernels[-50:, 4:] == 0.0).all()
  np.testing.assert_allclose(
    group_norms(params["kernel"], "channel")[:4], group_norms(w_true, "channel")[:4], rtol=0.1
  )
  assert zero_groups(params, groups="channel").total("channel").zero == 6
  assert mse(params, x, y) < 0.05


def test_adam_with_group_lasso_drives_irrelevant_features_to_exact_zero():
  """Minibatch Adam: Adam moves every weight by about lr per step whatever its gradient,
  so strength is set against lr; relevant rows shrink more than with SGD."""
  x, y, w_true = regression(relevant=4, n=1024, seed=1)
  rng = np.random.default_rng(8)
  idx = rng.integers(0, len(x), size=(400, 32))  # 400 minibatches of 32
  params = {"kernel": jnp.asarray(0.1 * rng.normal(size=(10, 3)), jnp.float32)}
  tx = optax.chain(optax.adam(5e-2), group_lasso(3e-2, groups="channel"))
  params, kernels = fit_linear(tx, params, x[idx], y[idx])
  assert (kernels[-100:, 4:] == 0.0).all()
  rows = group_norms(params["kernel"], "channel")[:4]
  assert (rows > 0.5 * group_norms(w_true, "channel")[:4]).all()


# --- l1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "path", ["BatchNorm_0/scale", "bn1/scale", "block/batch_norm/scale", "layer1/bn_2/scale"]
)
def test_batchnorm_scales_pattern_matches(path):
  assert re.search(BATCHNORM_SCALES, path)


@pytest.mark.parametrize("path", ["LayerNorm_0/scale", "norm/scale", "bn1/bias", "bn1/scale_x"])
def test_batchnorm_scales_pattern_skips(path):
  assert not re.search(BATCHNORM_SCALES, path)


@pytest.mark.parametrize("jit", [False, True])
def test_l1_default_targets_batchnorm_scales_only(jit):
  params = {
    "Conv_0": {"kernel": jnp.ones((1, 1, 1, 3))},
    "BatchNorm_0": {"scale": jnp.array([1.0, -0.25, 0.5]), "bias": jnp.ones(3)},
    "LayerNorm_0": {"scale": jnp.array([0.25, 0.25, 0.25])},
  }
  new, _ = step(optax.chain(optax.sgd(1.0), l1(0.5)), params, zeros_like(params), jit=jit)
  assert new["BatchNorm_0"]["scale"].tolist() == [0.5, 0.0, 0.0]
  assert new["BatchNorm_0"]["bias"].tolist() == [1.0, 1.0, 1.0]
  assert new["LayerNorm_0"]["scale"].tolist() == [0.25, 0.25, 0.25]
  assert (new["Conv_0"]["kernel"] == 1).all()


def test_l1_with_predicate_and_learning_rate():
  params = {"a": jnp.array([1.0, -1.0, 0.1]), "b": jnp.array([1.0])}
  grads = {"a": jnp.array([0.0, 0.0, -1.0]), "b": jnp.zeros(1)}
  tx = optax.chain(optax.sgd(0.1), l1(2.0, where=lambda path, x: path == "a", learning_rate=0.1))
  new, _ = step(tx, params, grads)
  np.testing.assert_allclose(new["a"], [0.8, -0.8, 0.0], rtol=1e-6)
  assert new["a"][2] == 0.0  # 0.1 + 0.1 = 0.2 <= threshold 0.2
  assert new["b"].tolist() == [1.0]


def test_l1_where_none_is_unstructured_l1_on_kernels():
  params = {"kernel": jnp.array([[1.0, 0.25]]), "bias": jnp.array([0.25])}
  new, _ = step(l1(0.5, where=None), params, zeros_like(params))
  assert new["kernel"].tolist() == [[0.5, 0.0]] and new["bias"].tolist() == [0.25]


# --- zero_groups --------------------------------------------------------------------------


def test_zero_groups_counts_hand_made_conv_kernel():
  w = np.ones((2, 2, 3, 4), np.float32)
  w[..., 1] = 0  # filter 1
  w[..., 3] = 0  # filter 3
  w[:, :, 0, :] = 0  # channel 0 -> also 4 shape positions (kh, kw, 0)
  w[0, 0, 2, :] = 0  # one more shape position
  params = {
    "conv": {"kernel": jnp.asarray(w), "bias": jnp.zeros(4)},
    "head": {"kernel": jnp.ones((4, 2))},
  }
  report = zero_groups(params)
  assert report["conv/kernel", "filter"].zero == 2 and report["conv/kernel", "filter"].groups == 4
  assert report["conv/kernel", "channel"].zero == 1 and report["conv/kernel", "channel"].groups == 3
  assert report["conv/kernel", "shape"].zero == 5 and report["conv/kernel", "shape"].groups == 12
  assert report["conv/kernel", "depth"].zero == 0 and report["conv/kernel", "depth"].groups == 1
  assert report.total("filter").groups == 6 and report.total("filter").zero == 2
  assert report.as_dict()["total"] == {"filter": 2, "channel": 1, "shape": 5, "depth": 0}
  assert report["conv/kernel", "filter"].fraction == 0.5
  text = str(report)
  assert "conv/kernel" in text and "2x2x3x4" in text and "total" in text and "50.00%" in text
  assert "conv/bias" not in text


def test_zero_groups_depth_counts_a_zero_layer():
  report = zero_groups({"w": jnp.zeros((3, 2)), "v": jnp.ones((2, 2))}, groups=("depth",))
  assert report.total("depth").zero == 1 and report.total("depth").groups == 2
  with pytest.raises(KeyError, match="filter"):
    report.total("filter")
  with pytest.raises(KeyError, match="nope"):
    report["nope", "depth"]


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [group_lasso, l1])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), jnp.array([1.0, 2.0])])
def test_strength_must_be_a_nonnegative_number(factory, bad):
  with pytest.raises(ValueError, match="strength must be a number >= 0"):
    factory(bad)
  with pytest.raises(ValueError, match="learning_rate"):
    factory(1.0, learning_rate=-0.1)


def test_a_schedule_for_strength_points_to_inject_hyperparams():
  with pytest.raises(TypeError, match="inject_hyperparams"):
    group_lasso(optax.linear_schedule(0.0, 1.0, 10))


def test_unknown_group_kind_names_it_and_the_valid_ones():
  with pytest.raises(ValueError, match=r"'filters'.*'filter', 'channel', 'shape', 'depth'"):
    group_lasso(1.0, groups=("filters",))
  with pytest.raises(ValueError, match="twice"):
    group_lasso(1.0, groups=("filter", "filter"))
  with pytest.raises(ValueError, match="at least one"):
    group_lasso(1.0, groups=())
  with pytest.raises(ValueError, match="'row'"):
    zero_groups({"w": jnp.ones((2, 2))}, groups="row")


@pytest.mark.parametrize("kind", ["filter", "channel", "shape"])
def test_unsupported_rank_names_the_param_and_shape(kind):
  params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  tx = group_lasso(1.0, groups=kind, where=r"Dense_0/")
  with pytest.raises(ValueError, match=r"'Dense_0/bias' has shape \(3,\)"):
    tx.init(params)
  with pytest.raises(ValueError, match=r"'Dense_0/bias' has shape \(3,\)"):
    zero_groups(params, groups=kind, where=r"Dense_0/")


def test_depth_groups_accept_any_rank():
  params = {"bias": jnp.array([0.3, 0.4]), "kernel": jnp.ones((2, 2))}
  new, _ = step(group_lasso(0.25, groups="depth", where="bias"), params, zeros_like(params))
  np.testing.assert_allclose(new["bias"], [0.15, 0.2], rtol=1e-6)


def test_where_that_selects_nothing_lists_the_paths():
  params = {"LayerNorm_0": {"scale": jnp.ones(3)}, "Dense_0": {"kernel": jnp.ones((3, 3))}}
  with pytest.raises(ValueError, match=r"l1\(\): where=.* selects none of the .*LayerNorm_0/scale"):
    l1(1e-4).init(params)
  with pytest.raises(ValueError, match=r"group_lasso\(\): where='Dense_1' selects none"):
    group_lasso(1.0, where="Dense_1").init(params)


def test_non_float_param_is_refused_by_path():
  with pytest.raises(TypeError, match="'ids'"):
    group_lasso(1.0, where="ids").init({"ids": jnp.ones((2, 2), jnp.int32)})


@pytest.mark.parametrize("factory", [group_lasso, l1])
def test_update_without_params_explains(factory):
  tx = factory(1.0, where=None)
  params = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))


def test_predicate_where_under_inject_hyperparams_needs_static_args():
  params, grads = {"w": jnp.array([[3.0, 0.25], [4.0, 0.5]])}, {"w": jnp.zeros((2, 2))}
  factory = optax.inject_hyperparams(group_lasso, static_args="where")
  tx = factory(strength=2.5, where=lambda path, x: path == "w")
  new, _ = step(tx, params, grads, jit=True)
  assert new["w"].tolist() == [[1.5, 0.0], [2.0, 0.0]]


def test_composes_with_optax_masked():
  w = jnp.array([[3.0, 0.25], [4.0, 0.5]])
  params, grads = {"a": w, "b": w}, {"a": jnp.zeros((2, 2)), "b": jnp.zeros((2, 2))}
  tx = optax.chain(optax.sgd(0.1), optax.masked(group_lasso(2.5), {"a": True, "b": False}))
  new, _ = step(tx, params, grads)
  assert new["a"].tolist() == [[1.5, 0.0], [2.0, 0.0]]
  assert new["b"].tolist() == w.tolist()


@pytest.mark.parametrize("factory", [group_lasso, l1])
@pytest.mark.parametrize("bad", ["0.1", None, True, {"a": 1.0}])
def test_strength_that_is_not_a_number_fails_at_construction(factory, bad):
  name = factory.__name__
  with pytest.raises(TypeError, match=rf"{name}\(\): strength must be a number >= 0, got"):
    factory(bad)
  with pytest.raises(TypeError, match=rf"{name}\(\): learning_rate must be a number"):
    factory(1.0, learning_rate=bad)


@pytest.mark.parametrize("factory", [group_lasso, l1])
def test_infinite_strength_or_learning_rate_fails_at_construction(factory):
  with pytest.raises(ValueError, match="strength must be a number >= 0 .finite, scalar., got inf"):
    factory(float("inf"))
  with pytest.raises(ValueError, match="learning_rate must be a number >= 0"):
    factory(0.0, learning_rate=float("inf"))


@pytest.mark.parametrize("bad", [None, 3])
def test_groups_that_are_not_kinds_fail_at_construction(bad):
  with pytest.raises(TypeError, match=r"groups must be a group kind or a sequence of kinds"):
    group_lasso(1.0, groups=bad)


@pytest.mark.parametrize("factory", [group_lasso, l1])
def test_malformed_where_fails_at_construction_not_at_init(factory):
  with pytest.raises(TypeError, match="where"):
    factory(1.0, where=5)
  with pytest.raises(ValueError, match=r"'\(' is not a valid regular expression"):
    factory(1.0, where="(")


def test_prox_functions_refuse_a_negative_threshold():
  w = jnp.ones((2, 2))
  with pytest.raises(
    ValueError, match=r"block_soft_threshold\(\): threshold must be a number >= 0"
  ):
    block_soft_threshold(w, -1.0, "filter")
  with pytest.raises(ValueError, match=r"soft_threshold\(\): threshold must be a number >= 0"):
    soft_threshold(w, -1.0)
  with pytest.raises(
    TypeError, match=r"soft_threshold\(\) takes a number for threshold, got a function\.$"
  ):
    soft_threshold(w, lambda step: 0.1)


@pytest.mark.parametrize("factory", [group_lasso, l1])
def test_update_accepts_optax_extra_args(factory):
  tx = factory(2.5, where=None)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = {"w": jnp.array([[3.0, 0.3], [4.0, 0.4]])}
  updates, _ = tx.update(zeros_like(params), tx.init(params), params, value=jnp.float32(1.0))
  expected = {group_lasso: [[1.5, 0.0], [2.0, 0.0]], l1: [[0.5, 0.0], [1.5, 0.0]]}[factory]
  assert optax.apply_updates(params, updates)["w"].tolist() == expected
