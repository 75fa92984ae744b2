"""Surgery on the library's own models: shrunk == masked, and BatchNorm folding.

The models are built from shapes (``nnx.eval_shape``) and filled with numpy random
values, including non-trivial BatchNorm statistics: initialising them through JAX
compiles one small program per parameter shape, which costs more than the surgery.
Inputs have batch 3, the batch of ``shrink``'s own check, so the eager forward passes
here reuse the ops it compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune import surgery
from jaxprune import tree as tree_lib
from jaxprune.train import models

ZOO = [
  ("lenet5", (8, 8, 1), 1.0),
  ("vgg_small", (8, 8, 3), 0.5),
  ("resnet20", (8, 8, 3), 0.5),
]


def random_model(name, shape, width, seed=0):
  """A zoo model with random weights, biases and running statistics (numpy only)."""
  abstract = nnx.eval_shape(lambda: models.create(name, shape, 10, width=width))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    last = tree_lib.path_str(path).rsplit("/", 1)[-1]
    if last == "kernel":
      value = rng.normal(size=x.shape) * np.sqrt(2 / np.prod(x.shape[:-1]))
    elif last == "var":
      value = rng.uniform(0.5, 2.0, size=x.shape)
    elif last == "scale":
      value = rng.uniform(0.5, 1.5, size=x.shape)
    else:  # biases and running means
      value = 0.5 * rng.normal(size=x.shape)
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def n_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def close(a, b, rtol=1e-5):
  scale = max(1.0, float(jnp.abs(a).max()))
  return float(jnp.abs(a - b).max()) <= rtol * scale


@pytest.fixture(scope="module", params=ZOO, ids=[name for name, *_ in ZOO])
def shrunk(request):
  name, shape, width = request.param
  model = random_model(name, shape, width)
  x = jax.random.normal(jax.random.key(1), (3, *shape))
  params = nnx.state(model, nnx.Param)
  masks = surgery.channel_masks(surgery.plan(model, example_input=x[:1]), params, 0.5)
  graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
  masked = nnx.merge(graphdef, jaxprune.apply_mask(weights, masks), rest)
  masked.eval()
  small = surgery.shrink(model, masks=masks, example_input=x[:1])
  return model, masked, small, x


def test_shrunk_model_computes_what_the_masked_one_does(shrunk):
  model, masked, small, x = shrunk
  small.model.eval()
  assert close(masked(x), small.model(x))
  assert small.max_error is not None
  assert n_params(small.model) < 0.5 * n_params(model)


def test_shrunk_layers_have_the_new_feature_counts(shrunk):
  model, _, small, x = shrunk
  before = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
  after = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(small.model)}
  narrower = []
  for path, mod in after.items():
    if isinstance(mod, nnx.Conv | nnx.Linear):
      kernel = mod.kernel.get_value().shape
      assert (mod.in_features, mod.out_features) == kernel[-2:], path
      if mod.out_features < before[path].out_features:
        narrower.append(path)
    if isinstance(mod, nnx.BatchNorm):
      assert mod.num_features == mod.mean.get_value().shape[0] == mod.scale.get_value().shape[0]
  assert len(narrower) >= 2
  assert small.widths and all(
    {k: getattr(after[path], k) for k in widths} == widths for path, widths in small.widths.items()
  )
  assert small.model(x).shape == (3, 10)  # the classifier keeps its classes


@pytest.mark.parametrize("which", ["dense", "shrunk"])
def test_batchnorm_folds_into_the_layer_before(shrunk, which):
  _, masked, small, x = shrunk
  source = masked if which == "dense" else small.model
  source.eval()
  folded = surgery.fold_batchnorm(source, x[:1])
  n_bn = sum(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(source))
  assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(folded))
  assert sum(isinstance(m, surgery.FoldedBatchNorm) for _, m in nnx.iter_modules(folded)) == n_bn
  assert close(source(x), folded(x))
  assert any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(source)) == (n_bn > 0)
