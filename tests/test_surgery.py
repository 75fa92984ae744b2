import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxprune
from jaxprune import surgery

R = nnx.Rngs


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 12, rngs=rngs)
    self.fc3 = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class ConvFlatten(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.fc = nnx.Linear(4 * 2 * 2, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
    return self.fc(x.reshape(x.shape[0], -1))


class Residual(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 6, (3, 3), rngs=rngs)
    self.a = nnx.Conv(6, 5, (3, 3), rngs=rngs)
    self.b = nnx.Conv(5, 6, (3, 3), rngs=rngs)
    self.down = nnx.Conv(6, 8, (1, 1), strides=2, rngs=rngs)
    self.c = nnx.Conv(6, 8, (3, 3), strides=2, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    x = nnx.relu(x + self.b(nnx.relu(self.a(x))))
    x = nnx.relu(self.bn(self.c(x)) + self.down(x))
    return self.head(x.mean(axis=(1, 2)))


class Concat(nnx.Module):
  def __init__(self, rngs):
    self.left = nnx.Conv(2, 3, (1, 1), rngs=rngs)
    self.right = nnx.Conv(2, 5, (3, 3), rngs=rngs)
    self.mix = nnx.Conv(8, 4, (1, 1), rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = jnp.concatenate([nnx.relu(self.left(x)), nnx.relu(self.right(x))], axis=-1)
    return self.head(nnx.relu(self.mix(x)).mean(axis=(1, 2)))


class Separable(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 6, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, rngs=rngs)
    self.dw = nnx.Conv(6, 6, (3, 3), feature_group_count=6, rngs=rngs)
    self.bn2 = nnx.BatchNorm(6, rngs=rngs)
    self.pw = nnx.Conv(6, 4, (1, 1), rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.stem(x)))
    x = nnx.relu(self.bn2(self.dw(x)))
    return self.head(nnx.relu(self.pw(x)).max(axis=(1, 2)))


def randomize_stats(model, seed=0):
  """Non-trivial BatchNorm statistics and biases, so constant channels are non-zero."""
  key = jax.random.key(seed)
  for _, mod in nnx.iter_modules(model):
    for name in ("bias", "mean"):
      var = getattr(mod, name, None)
      if isinstance(var, nnx.Variable) and var.get_value() is not None and var.ndim == 1:
        key, k = jax.random.split(key)
        var.set_value(0.5 * jax.random.normal(k, var.shape))
    if isinstance(mod, nnx.BatchNorm):
      key, k = jax.random.split(key)
      mod.var.set_value(jax.random.uniform(k, mod.var.shape, minval=0.5, maxval=2.0))
  return model


def group_of(p, member):
  return next(g for g in p.groups if member in g.members)


def spec(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_flatten_maps_a_channel_to_its_dense_rows_and_bn_is_coupled():
  p = surgery.plan(ConvFlatten(R(0)), example_input=spec(1, 4, 4, 2))
  g = group_of(p, ("conv/kernel", 3))
  assert {("bn/scale", 0), ("bn/bias", 0), ("bn/mean", 0), ("bn/var", 0)} <= set(g.members)
  assert g.size == 4 and g.blocked is None
  for j in range(4):
    np.testing.assert_array_equal(g.channels[j][("fc/kernel", 0)], np.arange(j, 16, 4))


def test_residual_add_ties_both_sides_and_downsampling_shortcut():
  p = surgery.plan(Residual(R(0)), example_input=spec(1, 6, 6, 2))
  stem = group_of(p, ("stem/kernel", 3))
  assert ("b/kernel", 3) in stem.members and ("a/kernel", 2) in stem.members
  assert ("down/kernel", 2) in stem.members and ("c/kernel", 2) in stem.members
  out = group_of(p, ("c/kernel", 3))
  assert ("down/kernel", 3) in out.members and ("bn/scale", 0) in out.members
  assert ("head/kernel", 0) in out.members
  inner = group_of(p, ("a/kernel", 3))
  assert inner.size == 5 and ("b/kernel", 2) in inner.members


def test_concatenation_offsets_channel_ranges():
  p = surgery.plan(Concat(R(0)), example_input=spec(1, 4, 4, 2))
  left, right = group_of(p, ("left/kernel", 3)), group_of(p, ("right/kernel", 3))
  assert [int(c[("mix/kernel", 2)][0]) for c in left.channels] == [0, 1, 2]
  assert [int(c[("mix/kernel", 2)][0]) for c in right.channels] == [3, 4, 5, 6, 7]


def test_depthwise_conv_ties_its_input_and_output_channels():
  p = surgery.plan(Separable(R(0)), example_input=spec(1, 5, 5, 2))
  g = group_of(p, ("stem/kernel", 3))
  assert {("dw/kernel", 3), ("bn2/scale", 0), ("pw/kernel", 2)} <= set(g.members)


def test_scalar_and_per_sample_broadcasts_do_not_couple_channels():
  class Gated(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(4, 6, rngs=rngs)
      self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.fc(x))
      h = h * jnp.mean(h, axis=-1, keepdims=True) * 2.0  # (N, 1) gate and a scalar
      return self.out(h)

  p = surgery.plan(Gated(R(0)), example_input=spec(2, 4))
  g = group_of(p, ("fc/kernel", 1))
  assert g.size == 6 and g.blocked is None and len(g.members) == 3


def test_grouped_conv_blocks_and_names_the_op():
  class Grouped(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Conv(2, 4, (1, 1), rngs=rngs)
      self.g = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.g(self.a(x)).mean(axis=(1, 2)))

  model = Grouped(R(0))
  p = surgery.plan(model, example_input=spec(1, 4, 4, 2))
  g = group_of(p, ("a/kernel", 3))
  assert "conv_general_dilated" in g.blocked and "feature_group_count=2" in g.blocked
  with pytest.raises(ValueError, match="blocked by `conv_general_dilated`"):
    surgery.shrink(model, remove={"a/kernel": [0]}, example_input=jnp.ones((1, 4, 4, 2)))


def test_channel_cumsum_blocks_with_the_op_name():
  class Cum(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(3, 5, rngs=rngs)
      self.out = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.cumsum(self.fc(x), axis=-1))

  p = surgery.plan(Cum(R(0)), example_input=spec(1, 3))
  assert group_of(p, ("fc/kernel", 1)).blocked.startswith("`cumsum`")


def test_hard_coded_reshape_is_reported():
  class Fixed(ConvFlatten):
    def __call__(self, x):
      x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
      return self.fc(x.reshape(-1, 16))

  model = Fixed(R(0))
  with pytest.raises(ValueError, match="hard-code a width"):
    surgery.shrink(model, remove={"conv/kernel": [0, 1]}, example_input=jnp.ones((1, 4, 4, 2)))


ZOO = [
  (MLP, (6,)),
  (ConvFlatten, (4, 4, 2)),
  (Residual, (6, 6, 2)),
  (Concat, (4, 4, 2)),
  (Separable, (5, 5, 2)),
]


@pytest.mark.parametrize("make, shape", ZOO, ids=[m.__name__ for m, _ in ZOO])
def test_shrunk_equals_masked_on_the_zoo(make, shape):
  model = randomize_stats(make(R(0)))
  params = nnx.state(model, nnx.Param)
  masks = jaxprune.magnitude(0.5, structure="filters").masks(params)
  x = jax.random.normal(jax.random.key(1), (4, *shape))
  graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
  masked_model = nnx.merge(graphdef, jaxprune.apply_mask(weights, masks), rest)
  masked_model.eval()
  small = surgery.shrink(model, masks=masks, example_input=x[:1])
  small.model.eval()
  ref, out = masked_model(x), small.model(x)
  scale = max(1.0, float(jnp.abs(ref).max()))
  assert float(jnp.abs(ref - out).max()) <= 1e-5 * scale
  before = sum(v.size for v in jax.tree.leaves(params))
  after = sum(v.size for v in jax.tree.leaves(nnx.state(small.model, nnx.Param)))
  assert after < before
  assert sum(len(v) for v in small.removed.values()) > 0


def test_constant_channels_are_folded_into_the_consumer_bias():
  model = randomize_stats(MLP(R(0)))
  small = surgery.shrink(model, remove={"fc1/kernel": [0, 3, 5]}, example_input=jnp.ones((1, 6)))
  assert small.model.fc1.kernel.shape == (6, 13)
  assert small.model.fc2.kernel.shape == (13, 12)
  assert small.widths["fc1"] == {"in_features": 6, "out_features": 13}
  assert small.max_error is not None and small.max_error < 1e-5


def test_keep_protects_and_multiple_of_rounds_up():
  model = MLP(R(0))
  masks = jaxprune.magnitude(0.75, structure="neurons").masks(nnx.state(model, nnx.Param))
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 6)), keep="fc2")
  assert small.model.fc1.out_features == 4 and small.model.fc2.out_features == 12
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 6)), multiple_of=8)
  assert small.model.fc1.out_features == 8 and small.model.fc2.out_features == 8


def test_optimizer_state_and_masks_are_sliced_the_same_way():
  model = MLP(R(0))
  params = nnx.state(model, nnx.Param)
  tx = jaxprune.masked(optax.adam(1e-3), jaxprune.magnitude(0.5, structure="neurons"))
  opt_state = tx.init(params)
  masks = jaxprune.magnitude(0.5, structure="neurons").masks(params)
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 6)))
  new_state = small.slice(opt_state)
  mu = new_state.inner_state[0].mu
  assert mu["fc1"]["kernel"].shape == (6, 8)
  assert new_state.masks["fc2"]["kernel"].shape == (8, 6)
  new_params = nnx.state(small.model, nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), new_params, mu)


def test_linen_module_and_variables():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3))(x)))
      x = nn.Conv(6, (3, 3), feature_group_count=6)(x)
      x = nn.relu(nn.Dense(5)(x.reshape(x.shape[0], -1)))
      return nn.Dense(3)(x)

  net = Net()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
  variables = net.init(jax.random.key(1), x)
  masks = jaxprune.magnitude(0.5, structure="filters", dense_last=True).masks(variables["params"])
  small = surgery.shrink(net, variables, masks, example_input=x[:1])
  assert small.widths == {
    "Conv_0": {"features": 3},
    "Conv_1": {"features": 3},
    "Dense_0": {"features": 3},  # round(2.5) = 2 of 5 removed
  }
  masked = {**variables, "params": jaxprune.apply_mask(variables["params"], masks)}
  np.testing.assert_allclose(
    small.model.apply(small.variables, x), net.apply(masked, x), rtol=1e-5, atol=1e-5
  )


def test_bad_inputs():
  with pytest.raises(TypeError, match="takes a flax nnx.Module or linen.Module"):
    surgery.plan(lambda x: x, example_input=jnp.ones(2))
  with pytest.raises(KeyError, match="names no group 'fc9/kernel'"):
    surgery.shrink(MLP(R(0)), remove={"fc9/kernel": [0]}, example_input=jnp.ones((1, 6)))
  with pytest.raises(ValueError, match="needs an example_input"):
    surgery.plan(MLP(R(0)))
  with pytest.raises(ValueError, match="multiple_of must be a positive int"):
    surgery.shrink(MLP(R(0)), example_input=jnp.ones((1, 6)), multiple_of=0)
