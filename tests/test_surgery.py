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


def abstract(make):
  """The model with shapes only: all that ``plan`` needs."""
  return nnx.eval_shape(lambda: make(R(0)))


def build(make, seed=0, stats=True):
  """The model with numpy-random weights (JAX's initialisers compile one program per
  shape, which costs more than the surgery); with ``stats``, non-trivial biases and
  BatchNorm statistics, so constant channels are non-zero."""
  graphdef, state = nnx.split(abstract(make))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = tree_lib.path_str(path).rsplit("/", 1)[-1]
    if name == "kernel":
      value = rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    elif name in ("var", "scale"):
      value = rng.uniform(0.5, 2.0, size=x.shape) if stats else np.ones(x.shape)
    else:  # biases, running means
      value = 0.5 * rng.normal(size=x.shape) if stats else np.zeros(x.shape)
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def group_of(p, member):
  return next(g for g in p.groups if member in g.members)


def spec(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_flatten_maps_a_channel_to_its_dense_rows_and_bn_is_coupled():
  p = surgery.plan(abstract(ConvFlatten), example_input=spec(1, 4, 4, 2))
  g = group_of(p, ("conv/kernel", 3))
  assert {("bn/scale", 0), ("bn/bias", 0), ("bn/mean", 0), ("bn/var", 0)} <= set(g.members)
  assert g.size == 4 and g.blocked is None
  for j in range(4):
    np.testing.assert_array_equal(g.channels[j][("fc/kernel", 0)], np.arange(j, 16, 4))


def test_residual_add_ties_both_sides_and_downsampling_shortcut():
  p = surgery.plan(abstract(Residual), example_input=spec(1, 6, 6, 2))
  stem = group_of(p, ("stem/kernel", 3))
  assert ("b/kernel", 3) in stem.members and ("a/kernel", 2) in stem.members
  assert ("down/kernel", 2) in stem.members and ("c/kernel", 2) in stem.members
  out = group_of(p, ("c/kernel", 3))
  assert ("down/kernel", 3) in out.members and ("bn/scale", 0) in out.members
  assert ("head/kernel", 0) in out.members
  inner = group_of(p, ("a/kernel", 3))
  assert inner.size == 5 and ("b/kernel", 2) in inner.members


def test_concatenation_offsets_channel_ranges():
  p = surgery.plan(abstract(Concat), example_input=spec(1, 4, 4, 2))
  left, right = group_of(p, ("left/kernel", 3)), group_of(p, ("right/kernel", 3))
  assert [int(c[("mix/kernel", 2)][0]) for c in left.channels] == [0, 1, 2]
  assert [int(c[("mix/kernel", 2)][0]) for c in right.channels] == [3, 4, 5, 6, 7]


def test_depthwise_conv_ties_its_input_and_output_channels():
  p = surgery.plan(abstract(Separable), example_input=spec(1, 5, 5, 2))
  g = group_of(p, ("stem/kernel", 3))
  assert {("dw/kernel", 3), ("bn2/scale", 0), ("pw/kernel", 2)} <= set(g.members)


def test_scalar_and_per_sample_broadcasts_do_not_couple_channels():
  class Gated(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(4, 6, rngs=rngs)
      self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.fc(x))
      h = h * jnp.mean(x, axis=-1, keepdims=True) * 2.0  # (N, 1) gate and a scalar
      return self.out(h)

  p = surgery.plan(abstract(Gated), example_input=spec(2, 4))
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

  model = build(Grouped)
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

  p = surgery.plan(abstract(Cum), example_input=spec(1, 3))
  assert group_of(p, ("fc/kernel", 1)).blocked.startswith("`cumsum`")


def test_hard_coded_reshape_is_reported():
  class Fixed(ConvFlatten):
    def __call__(self, x):
      x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
      return self.fc(x.reshape(-1, 16))

  model = build(Fixed)
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
  model = build(make)
  params = nnx.state(model, nnx.Param)
  masks = jaxprune.magnitude(0.5, structure="filters").masks(params)
  x = jax.random.normal(jax.random.key(1), (3, *shape))  # shrink checks with batch 3 too
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
  model = build(MLP)
  small = surgery.shrink(model, remove={"fc1/kernel": [0, 3, 5]}, example_input=jnp.ones((1, 6)))
  assert small.model.fc1.kernel.shape == (6, 13)
  assert small.model.fc2.kernel.shape == (13, 12)
  assert small.widths["fc1"] == {"in_features": 6, "out_features": 13}
  assert small.max_error is not None and small.max_error < 1e-5


def test_keep_protects_and_multiple_of_rounds_up():
  model = build(MLP, stats=False)
  masks = jaxprune.magnitude(0.75, structure="neurons").masks(nnx.state(model, nnx.Param))
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 6)), keep="fc2")
  assert small.model.fc1.out_features == 4 and small.model.fc2.out_features == 12
  small = surgery.shrink(model, masks=masks, example_input=jnp.ones((1, 6)), multiple_of=8)
  assert small.model.fc1.out_features == 8 and small.model.fc2.out_features == 8


def test_optimizer_state_and_masks_are_sliced_the_same_way():
  model = build(MLP, stats=False)
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
    "Conv_1": {"features": 3, "feature_group_count": 3},  # depthwise
    "Dense_0": {"features": 3},  # round(2.5) = 2 of 5 removed
  }
  masked = {**variables, "params": jaxprune.apply_mask(variables["params"], masks)}
  np.testing.assert_allclose(
    small.model.apply(small.variables, x), net.apply(masked, x), rtol=1e-5, atol=1e-5
  )


def test_bad_inputs():
  with pytest.raises(TypeError, match="takes a flax nnx.Module or linen.Module"):
    surgery.plan(lambda x: x, example_input=jnp.ones(2))
  with pytest.raises(KeyError, match="No group 'fc9/kernel'"):
    surgery.shrink(build(MLP), remove={"fc9/kernel": [0]}, example_input=jnp.ones((1, 6)))
  with pytest.raises(ValueError, match="needs an example_input"):
    surgery.plan(abstract(MLP))
  with pytest.raises(ValueError, match="multiple_of must be a positive int"):
    surgery.shrink(build(MLP), example_input=jnp.ones((1, 6)), multiple_of=0)


class TwoConsumers(nnx.Module):
  """The stem's channels feed a 1x1 conv (exact fold) and a padded 3x3 conv (not exact)."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.point = nnx.Conv(4, 3, (1, 1), rngs=rngs)
    self.spatial = nnx.Conv(4, 3, (3, 3), padding="SAME", rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    return self.head((self.point(h) + self.spatial(h)).mean(axis=(1, 2)))


def test_dead_channels_whose_constant_cannot_be_folded_are_kept_and_reported():
  model = build(TwoConsumers)
  model.stem.bias.set_value(jnp.array([0.7, -0.4, 0.3, 0.2]))  # relu: 0.7 and 0 when dead
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 2))
  small = surgery.shrink(model, remove={"stem/kernel": [0, 1]}, example_input=x)
  # Channel 1 outputs relu(-0.4) = 0 and goes; channel 0 outputs 0.7 everywhere, which
  # the 3x3 conv sees as 0.7 inside and 0 in its zero padding: no bias can absorb that.
  assert small.removed == {"stem/kernel": [1]}
  assert small.kept_constant == {"stem/kernel": [0]}
  assert small.model.stem.kernel.shape == (3, 3, 2, 3)
  line = next(x for x in small.report().splitlines() if x.startswith("stem/"))
  assert line.startswith("stem/kernel: 4 -> 3 channels (kept 1 dead channel [0]: ")
  assert "through spatial/kernel varies over positions (zero padding" in line
  # The 1x1 conv could have absorbed channel 0, but as it is kept it must not also be
  # folded there (shrink's own check would fail otherwise).
  assert small.max_error is not None and small.max_error < 1e-5


def test_a_consumer_without_bias_keeps_dead_constant_channels():
  model = build(MLP, stats=False)
  model.fc1.bias.set_value(jnp.full((16,), 0.5))
  model.fc2 = build(lambda rngs: nnx.Linear(16, 12, use_bias=False, rngs=rngs))
  small = surgery.shrink(model, remove={"fc1/kernel": [2, 5]}, example_input=jnp.ones((1, 6)))
  assert small.kept_constant == {"fc1/kernel": [2, 5]} and not small.removed
  assert "fc2/kernel has no bias to absorb their constant output" in small.report()


class Foldable(nnx.Module):
  """Which BatchNorms fold: right after a conv or Dense, and nothing else reads its input."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)  # with a bias
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)  # folds
    self.conv2 = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, rngs=rngs)  # its input is also added below: stays
    self.conv3 = nnx.Conv(4, 4, (1, 1), rngs=rngs)
    self.bn3 = nnx.BatchNorm(4, rngs=rngs)  # after a ReLU: stays
    self.fc = nnx.Linear(4, 6, use_bias=False, rngs=rngs)
    self.bn4 = nnx.BatchNorm(6, rngs=rngs)  # BatchNorm1d after a Dense: folds
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    y = self.conv2(x)
    x = nnx.relu(self.bn2(y) + y)
    x = self.bn3(nnx.relu(self.conv3(x)))
    return self.head(nnx.relu(self.bn4(self.fc(x.mean(axis=(1, 2))))))


def test_fold_batchnorm_folds_exactly_the_foldable_pairs():
  model = build(Foldable)
  x = jax.random.normal(jax.random.key(0), (3, 5, 5, 2))
  assert surgery.batchnorm_pairs(model, x[:1]) == [("conv1", "bn1"), ("fc", "bn4")]
  folded = surgery.fold_batchnorm(model, x[:1])
  assert isinstance(folded.bn1, surgery.FoldedBatchNorm) and folded.fc.bias.shape == (6,)
  assert isinstance(folded.bn2, nnx.BatchNorm) and isinstance(folded.bn3, nnx.BatchNorm)
  assert isinstance(model.bn1, nnx.BatchNorm) and model.fc.bias is None  # not changed
  model.eval()
  np.testing.assert_allclose(folded(x), model(x), rtol=1e-5, atol=1e-5)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(folded, nnx.Param)))
  assert n == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) - 2 * 4 - 6


def test_fold_batchnorm_needs_an_nnx_module():
  with pytest.raises(TypeError, match="fold_batchnorm takes a flax nnx.Module"):
    surgery.fold_batchnorm(nn.Dense(3), jnp.ones((1, 2)))
