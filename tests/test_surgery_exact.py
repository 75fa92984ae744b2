"""Shrunk == masked, against a reference computed here: the user's masks applied with
``jnp.where`` to the original params, the original model run at several input sizes.

Models are built from shapes and filled with numpy random values (non-zero biases and
BatchNorm statistics, so removed channels emit constants); inputs have batch 3, the
batch of ``shrink``'s own check.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxprune
from jaxprune import surgery
from jaxprune import tree as tree_lib


def build(make, seed=0):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = tree_lib.path_str(path).rsplit("/", 1)[-1]
    if name == "kernel":
      value = rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    elif name in ("var", "scale"):
      value = rng.uniform(0.5, 2.0, size=x.shape)
    else:
      value = 0.5 * rng.normal(size=x.shape) + 0.3  # mostly positive: relu(bias) != 0
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def where(masks, tree):
  """The masks applied to the tree they were made for (same structure), by jnp.where."""
  return jax.tree.map(
    lambda m, x: x if m is None else jnp.where(m, x, 0), masks, tree, is_leaf=lambda m: m is None
  )


@nnx.jit
def forward(model, x):
  """One compile per model and input shape (eager, each op of the model compiles per shape)."""
  return model(x)


def nnx_reference(model, masks, x):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  masked = nnx.merge(graphdef, where(masks, params), rest)
  masked.eval()
  return forward(masked, x)


def evaluated(small, x):
  small.model.eval()
  return forward(small.model, x)


def assert_close(ref, out, rtol=1e-5):
  """``out`` of the shrunk model (run in eval mode: BatchNorm's running statistics)."""
  ref, out = np.asarray(ref), np.asarray(out)
  scale = max(1.0, float(np.abs(ref).max()))
  err = float(np.abs(ref - out).max())
  assert err <= rtol * scale, f"max error {err:.3g} (scale {scale:.3g})"


def normal(*shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# 1. Exact paths: Dense_0 and Res_0/Dense_0 are different layers.


class Res(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(4)(x))
    return nn.Dense(4)(h)


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(4)(x))  # Dense_0, as Res_0/Dense_0
    h = nn.relu(Res()(h))
    return nn.Dense(2)(h)


@pytest.mark.parametrize("over", ["params", "variables"])
def test_masks_are_matched_by_exact_path_not_by_suffix(over):
  net, x = Nested(), normal(3, 4)
  variables = net.init(jax.random.key(0), x)
  params = variables["params"]
  masks = jax.tree.map(lambda _: None, params)
  keep = np.ones((4, 4), bool)
  masks["Dense_0"]["kernel"] = jnp.asarray(keep.copy()).at[:, 1].set(False)
  masks["Res_0"]["Dense_0"]["kernel"] = jnp.asarray(keep.copy()).at[:, 0].set(False)
  given = masks if over == "params" else {"params": masks}
  small = surgery.shrink(net, variables, given, example_input=x[:1])
  assert small.removed == {"params/Dense_0/kernel": [1], "params/Res_0/Dense_0/kernel": [0]}
  reference = net.apply({"params": where(masks, params)}, x)
  np.testing.assert_allclose(small.model.apply(small.variables, x), reference, atol=1e-5)


def test_a_mask_for_no_array_is_an_error_listing_the_arrays():
  net, x = Nested(), normal(3, 4)
  variables = net.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"\['Dense_9/kernel'\] name no array.*Res_0/Dense_0/kernel"):
    surgery.shrink(net, variables, {"Dense_9": {"kernel": jnp.ones((4, 4), bool)}}, example_input=x)


# 2. Fully convolutional: right at every input size, not only the traced one.


class Strided(nnx.Module):
  """8x8 and 9x9 inputs give down a 4x4 input (no padding); 10x10 a 5x5 one (padded)."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 4, (2, 2), strides=2, padding="VALID", rngs=rngs)
    self.down = nnx.Conv(4, 6, (2, 2), strides=2, padding="SAME", rngs=rngs)
    self.point = nnx.Conv(6, 3, (1, 1), rngs=rngs)

  def __call__(self, x):
    return self.point(nnx.relu(self.down(nnx.relu(self.stem(x)))))  # (N, H/2, W/2, 3)


def test_constants_through_a_strided_conv_are_exact_at_every_input_size():
  model = build(Strided)
  model.stem.bias.set_value(jnp.array([0.5, 0.7, 0.2, 0.3]))  # relu(bias) > 0 when dead
  masks = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
  masks["stem"]["kernel"] = jnp.ones((2, 2, 2, 4), bool).at[..., :2].set(False)
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 8, 8, 2)))
  assert small.checked_shapes == (((1, 8, 8, 2),), ((1, 9, 9, 2),))
  # relu(bias) of the dead channels is constant, and down pads nothing at 8x8 and 9x9;
  # but its SAME padding at 10x10 would change what they contribute: they stay.
  assert small.kept_constant == {"stem/kernel": [0, 1]}
  assert "depends on the input size" in small.why_kept["stem/kernel"]
  for size in (8, 9, 10, 13):
    x = normal(3, size, size, 2)
    assert_close(nnx_reference(model, masks, x), evaluated(small, x))


class Flatten(Strided):
  def __init__(self, rngs):
    super().__init__(rngs)
    self.head = nnx.Linear(2 * 2 * 3, 2, rngs=rngs)

  def __call__(self, x):  # a flatten into a Dense: only the traced size runs
    y = self.point(nnx.relu(self.down(nnx.relu(self.stem(x)))))
    return self.head(y.reshape(y.shape[0], -1))


def test_a_model_that_takes_one_input_size_is_checked_at_that_size():
  model = build(Flatten)
  x = jnp.ones((1, 9, 9, 2))  # 10x10 would give head a 3x3x3 input
  small = surgery.shrink(model, remove={"down/kernel": [0, 5]}, example_input=x)
  assert small.checked_shapes == (((1, 9, 9, 2),),)
  assert small.model.down.out_features == 4


# 8. A layer fed by a concatenation reads several groups: each one's constants fold.


class Mix(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Conv(2, 3, (3, 3), rngs=rngs)
    self.b = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.mix = nnx.Conv(7, 5, (1, 1), rngs=rngs)
    self.head = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    h = jnp.concatenate([nnx.relu(self.a(x)), nnx.relu(self.b(x))], axis=-1)
    return self.head(nnx.relu(self.mix(h)).mean(axis=(1, 2)))


@pytest.mark.parametrize("masked", [["a"], ["b"], ["a", "b"]])
def test_concatenated_groups_all_fold_into_their_consumer(masked):
  model = build(Mix)
  masks = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
  for name in masked:
    n = getattr(model, name).out_features
    masks[name]["kernel"] = jnp.ones((3, 3, 2, n), bool).at[..., :2].set(False)
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 6, 6, 2)))
  assert small.removed == {f"{name}/kernel": [0, 1] for name in masked}
  assert small.model.mix.in_features == 7 - 2 * len(masked)
  for size in (6, 7):
    x = normal(3, size, size, 2)
    assert_close(nnx_reference(model, masks, x), evaluated(small, x))


class Inception(nnx.Module):
  """A ResNet-style stem and residual block, then an Inception-like concatenation."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn0 = nnx.BatchNorm(8, rngs=rngs)
    self.c1 = nnx.Conv(8, 6, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, rngs=rngs)
    self.c2 = nnx.Conv(6, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(8, rngs=rngs)
    self.p1 = nnx.Conv(8, 4, (1, 1), rngs=rngs)
    self.p3 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
    self.mix = nnx.Conv(10, 8, (1, 1), rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.stem(x)))
    x = nnx.relu(x + self.bn2(self.c2(nnx.relu(self.bn1(self.c1(x))))))
    x = jnp.concatenate([nnx.relu(self.p1(x)), nnx.relu(self.p3(x))], axis=-1)
    return self.head(nnx.relu(self.mix(x)).mean(axis=(1, 2)))


def test_the_readme_example_on_a_resnet_with_a_concatenation():
  model = build(Inception)
  params = nnx.state(model, nnx.Param)
  masks = jaxprune.magnitude(0.5, structure="filters").masks(params)
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 6, 6, 3)))
  assert small.removed and len(small.checked_shapes) == 2
  for size in (6, 7, 10):
    x = normal(3, size, size, 3)
    assert_close(nnx_reference(model, masks, x), evaluated(small, x))


# 9. multiple_of: channels kept for the rounding are not also folded.


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 12, rngs=rngs)
    self.fc3 = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def test_multiple_of_keeps_channels_without_folding_them_too():
  model = build(MLP)
  masks = jaxprune.magnitude(0.75, structure="neurons").masks(nnx.state(model, nnx.Param))
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 6)), multiple_of=8)
  assert small.model.fc1.out_features == 8 and small.model.fc2.out_features == 8
  assert any("multiple of 8" in why for _, why in small.stayed["fc1/kernel"])
  x = normal(3, 6)
  assert_close(nnx_reference(model, masks, x), evaluated(small, x))


# 10. Grouped convs: an untouched one stays as it is; a depthwise one is sliced.


class GroupedToo(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Conv(2, 4, (1, 1), use_bias=False, rngs=rngs)
    self.dw = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)  # depthwise, sliced
    self.b = nnx.Conv(2, 4, (1, 1), rngs=rngs)
    self.g = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=rngs)  # grouped, blocked
    self.m = nnx.Conv(2, 4, (3, 3), feature_group_count=2, rngs=rngs)  # depthwise x2
    self.head = nnx.Linear(14, 2, rngs=rngs)

  def __call__(self, x):
    h = jnp.concatenate([nnx.relu(self.dw(self.a(x))), self.g(self.b(x)), self.m(x)], -1)
    return self.head(h.mean(axis=(1, 2)))


def test_a_model_with_grouped_convs_shrinks_and_keeps_their_groups():
  model = build(GroupedToo)
  small = surgery.shrink(model, remove={"a/kernel": [1, 2]}, example_input=jnp.ones((1, 5, 5, 2)))
  assert small.model.dw.feature_group_count == small.model.dw.out_features == 2
  g, m = small.model.g, small.model.m
  assert (g.in_features, g.out_features, g.feature_group_count) == (4, 6, 2)
  assert (m.in_features, m.out_features, m.feature_group_count) == (2, 4, 2)
  x = normal(3, 5, 5, 2)
  masks = jax.tree.map(lambda _: None, nnx.state(model, nnx.Param))
  masks["a"]["kernel"] = jnp.ones((1, 1, 2, 4), bool).at[..., 1:3].set(False)
  assert_close(nnx_reference(model, masks, x), evaluated(small, x))


def test_linen_grouped_convs():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = nn.Conv(4, (3, 3), feature_group_count=4)(nn.Conv(4, (1, 1), use_bias=False)(x))
      g = nn.Conv(6, (3, 3), feature_group_count=2)(nn.Conv(4, (1, 1))(x))
      return nn.Dense(2)(jnp.concatenate([a, g], -1).mean(axis=(1, 2)))

  net, x = Net(), normal(3, 5, 5, 2)
  variables = net.init(jax.random.key(0), x)
  small = surgery.shrink(net, variables, remove={"params/Conv_1/kernel": [0]}, example_input=x[:1])
  assert small.widths == {  # depthwise, 1x1
    "Conv_0": {"features": 3, "feature_group_count": 3},
    "Conv_1": {"features": 3},
  }
  masked = jax.tree.map(np.array, variables)
  masked["params"]["Conv_1"]["kernel"][..., 0] = 0
  np.testing.assert_allclose(small.model.apply(small.variables, x), net.apply(masked, x), atol=1e-5)


# 11. Optimizer states: Linen (from the params or from all variables) and NNX.


@pytest.mark.parametrize("over", ["params", "variables"])
def test_linen_optimizer_state_is_sliced_and_updates(over):
  net, x = Nested(), normal(3, 4)
  variables = net.init(jax.random.key(0), x)
  small = surgery.shrink(
    net, variables, remove={"params/Res_0/Dense_0/kernel": [0, 3]}, example_input=x[:1]
  )
  tx = optax.adam(1e-3)
  tree = variables["params"] if over == "params" else variables
  state = small.slice(tx.init(tree))
  new = small.variables["params"] if over == "params" else small.variables
  assert state[0].mu["Res_0" if over == "params" else "params"]  # sliced in place
  grads = jax.tree.map(jnp.ones_like, new)
  updates, _ = tx.update(grads, state, new)
  jax.tree.map(lambda u, p: np.testing.assert_equal(u.shape, p.shape), updates, new)


def test_nnx_masked_optimizer_state_is_sliced_and_updates():
  model = build(MLP)
  params = nnx.state(model, nnx.Param)
  pruner = jaxprune.magnitude(0.5, structure="neurons")
  tx = jaxprune.masked(optax.adam(1e-3), pruner)
  small = surgery.shrink(model, masks=pruner.masks(params), example_input=jnp.ones((1, 6)))
  state = small.slice(tx.init(params))
  new = nnx.state(small.model, nnx.Param)
  assert state.inner_state[0].mu["fc1"]["kernel"].shape == (6, 8)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, new), state, new)
  jax.tree.map(lambda u, p: np.testing.assert_equal(u.shape, p.shape), updates, new)


def test_slicing_a_tree_that_is_not_params_shaped_is_an_error():
  small = surgery.shrink(build(MLP), remove={"fc1/kernel": [0]}, example_input=jnp.ones((1, 6)))
  with pytest.raises(ValueError, match="no part of the tree has the model's arrays"):
    small.slice({"fc1": {"w": jnp.ones((6, 16))}})


# 12. LayerNorm / RMSNorm over channels: the residual stream is blocked, with the reason.


class Block(nnx.Module):
  def __init__(self, norm, rngs):
    self.embed = nnx.Linear(5, 8, rngs=rngs)
    self.norm = norm(8, rngs=rngs)
    self.up = nnx.Linear(8, 12, rngs=rngs)
    self.down = nnx.Linear(12, 8, rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    h = h + self.down(nnx.relu(self.up(self.norm(h))))
    return self.head(h.mean(axis=1))


@pytest.mark.parametrize("norm", [nnx.LayerNorm, nnx.RMSNorm], ids=["layernorm", "rmsnorm"])
def test_norm_statistics_over_channels_block_the_residual_stream(norm):
  model = build(lambda rngs: Block(norm, rngs))
  p = surgery.plan(model, example_input=jnp.ones((1, 4, 5)))
  stream = next(g for g in p.groups if ("embed/kernel", 1) in g.members)
  assert "statistic over the channel axis" in stream.blocked
  assert "LayerNorm/RMSNorm" in stream.blocked and "test_surgery_exact.py:" in stream.blocked
  hidden = next(g for g in p.groups if ("up/kernel", 1) in g.members)
  assert hidden.blocked is None
  params = nnx.state(model, nnx.Param)
  masks = surgery.channel_masks(p, params, 0.5)
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 4, 5)))
  assert small.model.up.out_features == 6 and small.model.embed.out_features == 8
  x = normal(3, 6, 5)
  assert_close(nnx_reference(model, masks, x), evaluated(small, x))
