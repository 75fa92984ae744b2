import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune import surgery
from jaxprune.train import models


def abstract(name, shape, classes=10, **kw):
  """The model with shapes only: no initialisation work (param counts, output shapes)."""
  return nnx.eval_shape(lambda: models.create(name, shape, classes, **kw))


def n_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def out_shape(model, shape):
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x).shape


def kernel_paths(model):
  return tuple(jaxprune.summary(nnx.state(model, nnx.Param), where="kernel").as_dict())[:-1]


@pytest.mark.parametrize("name, shape", [
  ("lenet300", (28, 28, 1)), ("lenet5", (28, 28, 1)), ("lenet5", (8, 8, 1)),
  ("vgg_small", (8, 8, 1)), ("vgg_small", (28, 28, 1)),
  ("resnet20", (32, 32, 3)), ("resnet56", (32, 32, 3)), ("resnet20", (8, 8, 1)),
])  # fmt: skip
def test_output_shapes(name, shape):
  assert out_shape(abstract(name, shape, 7), shape) == (2, 7)


def test_param_counts():
  # He et al. (2016), table 6: ResNet-20 0.27M, ResNet-56 0.85M (CIFAR-10).
  assert n_params(abstract("resnet20", (32, 32, 3))) == 272_474
  assert n_params(abstract("resnet56", (32, 32, 3))) == 855_770
  assert n_params(abstract("lenet300", (28, 28, 1))) == 266_610
  # Convs have no bias; BN has scale and bias per channel; width 2 quadruples the convs.
  vgg = abstract("vgg_small", (8, 8, 1))
  assert n_params(vgg) == (9 * 16 + 9 * 16 * 32 + 9 * 32 * 64) + 2 * (16 + 32 + 64) + 650
  wide = abstract("resnet20", (32, 32, 3), width=2.0)
  assert wide.head.kernel.shape == (128, 10) and wide.features[0].conv.kernel.shape[-1] == 32


def test_resnet_structure():
  model = abstract("resnet56", (32, 32, 3))
  assert len(model.features) == 1 + 27
  projections = [i for i, b in enumerate(model.features[1:], 1) if b.shortcut is not None]
  assert projections == [10, 19]  # the first block of stages 2 and 3
  block = model.features[10]
  assert block.conv1.conv.strides == 2 and block.shortcut.conv.kernel.shape == (1, 1, 16, 32)
  assert block.shortcut.conv.strides == 2


def test_kernel_paths_run_input_to_output():
  paths = kernel_paths(abstract("resnet20", (32, 32, 3)))
  assert paths[0] == "features/0/conv/kernel" and paths[-1] == "head/kernel"
  assert paths[1:4] == (
    "features/1/conv1/conv/kernel", "features/1/conv2/conv/kernel",
    "features/2/conv1/conv/kernel",
  )  # fmt: skip
  assert "features/4/shortcut/conv/kernel" in paths
  pruner = jaxprune.magnitude(0.5, dense_first=True, dense_last=True)
  chosen = pruner.paths(nnx.state(abstract("vgg_small", (8, 8, 1)), nnx.Param))
  assert chosen == ["features/1/conv/kernel", "features/2/conv/kernel"]
  assert kernel_paths(abstract("lenet5", (8, 8, 1)))[0] == "conv1/kernel"


def with_random_state(model, seed=0):
  """Fills an abstract model with numpy-random params and statistics.

  Initialising with jax.random compiles the RNG once per param shape (seconds each on a
  busy CPU); these tests need values, not the initialiser.
  """
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype) * 0.3 + 0.05), state
  )
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tiny_resnet():
  model = with_random_state(
    nnx.eval_shape(lambda: models.ResNet(8, 3, 10, width=0.25, rngs=nnx.Rngs(0)))
  )
  for _, mod in nnx.iter_modules(model):
    if isinstance(mod, nnx.BatchNorm):  # variances must be positive
      mod.var.set_value(jnp.abs(mod.var[...]) + 0.5)
  return model


def test_eval_mode_is_deterministic_and_per_example(tiny_resnet):
  model = tiny_resnet
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  x_other = x.at[1:].set(-x[1:])  # the same first example in another batch

  @functools.partial(jax.jit, static_argnames="train")
  def run(state, x, train):
    m = nnx.merge(graphdef, state)
    if not train:
      m.eval()
    return m(x), nnx.state(m, nnx.BatchStat)

  y_eval, stats_eval = run(state, x, False)
  np.testing.assert_array_equal(y_eval, run(state, x, False)[0])
  # eval: running statistics, so an example's logits do not depend on the rest of the batch
  np.testing.assert_allclose(run(state, x_other, False)[0][0], y_eval[0], rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, stats_eval, nnx.state(model, nnx.BatchStat))
  # train: batch statistics, and the running averages move
  y_train, stats_train = run(state, x, True)
  assert not np.allclose(run(state, x_other, True)[0][0], y_train[0])
  before = model.features[0].bn.mean[...]
  assert not np.allclose(stats_train["features"][0]["bn"]["mean"][...], before)
  model.eval()
  assert model.features[3].conv2.bn.use_running_average
  model.train()
  assert not model.features[3].conv2.bn.use_running_average


def test_same_seed_same_params():
  a = models.create("lenet300", (8, 8, 1), 10, seed=3)
  b = models.create("lenet300", (8, 8, 1), 10, seed=3)
  c = models.create("lenet300", (8, 8, 1), 10, seed=4)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a), nnx.state(b))
  assert not np.array_equal(a.fc3.kernel[...], c.fc3.kernel[...])


def test_surgery_ties_the_residual_stream(tiny_resnet):
  # ResNet-8: the stem, then one block per stage; stages 2 and 3 start with a projection
  plan = surgery.plan(tiny_resnet, example_input=jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
  groups = {g.name: g for g in plan.groups}
  assert groups["head/kernel"].blocked == "the model output"
  producers = {name: {p for p, _ in g.producers} for name, g in groups.items()}
  # the stem and the last conv of the stage-1 block write the same channels
  assert producers["features/0/conv/kernel"] == {
    "features/0/conv/kernel", "features/1/conv2/conv/kernel",
  }  # fmt: skip
  # in stages 2 and 3, the projection shortcut and the block's last conv
  assert producers["features/3/conv2/conv/kernel"] == {
    "features/3/conv2/conv/kernel", "features/3/shortcut/conv/kernel",
  }  # fmt: skip
  inner = groups["features/2/conv1/conv/kernel"]  # a block's inner width is its own group
  assert producers[inner.name] == {"features/2/conv1/conv/kernel"} and inner.blocked is None
  assert len(groups) == 7


def test_vgg_surgery_groups_one_per_conv():
  model = abstract("vgg_small", (8, 8, 1), width=0.5)
  plan = surgery.plan(model, example_input=jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  assert [(g.name, g.size, g.blocked) for g in plan.groups] == [
    ("features/0/conv/kernel", 8, None), ("features/1/conv/kernel", 16, None),
    ("features/2/conv/kernel", 32, None), ("head/kernel", 10, "the model output"),
  ]  # fmt: skip


def test_lenet300_shapes_and_layer_order():
  model = abstract("lenet300", (8, 8, 1))
  assert out_shape(model, (8, 8, 1)) == (2, 10)
  assert model.fc1.kernel.shape == (64, 300) and model.fc3.kernel.shape == (100, 10)
  assert kernel_paths(model) == ("fc1/kernel", "fc2/kernel", "fc3/kernel")


def test_lenet5_shapes_and_layer_order():
  lenet5 = abstract("lenet5", (28, 28, 1))
  assert out_shape(lenet5, (28, 28, 1)) == (2, 10)
  assert lenet5.fc1.kernel.shape == (7 * 7 * 16, 120)
  assert kernel_paths(lenet5) == (
    "conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel", "fc3/kernel",
  )  # fmt: skip


@pytest.mark.parametrize("call, message", [
  (lambda: models.create("lenet5", (3, 3, 1), 10), "at least 4x4; got 3x3"),
  (lambda: models.create("vgg", (8, 8, 1), 10), "'vgg'.*lenet300, lenet5, resnet20"),
  (lambda: models.create("lenet300", (8, 8, 1), 10, width=2.0), "fixed layer widths"),
  (lambda: models.ResNet(21, rngs=nnx.Rngs(0)), "depth 6n \\+ 2"),
  (lambda: models.VGG((8, "X"), rngs=nnx.Rngs(0)), "positive ints or 'M'"),
  (lambda: models.VGG(("M",), rngs=nnx.Rngs(0)), "at least one conv"),
])  # fmt: skip
def test_model_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call()
