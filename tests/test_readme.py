"""The README's Python examples run as written, on a small model of the kind they name."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class ConvNet(nnx.Module):
  """A ResNet-style block and a concatenation: shapes the README does not mention."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.a = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.b = nnx.Conv(8, 8, (1, 1), rngs=rngs)
    self.c = nnx.Conv(8, 6, (3, 3), rngs=rngs)
    self.mix = nnx.Conv(14, 12, (1, 1), rngs=rngs)
    self.head = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    h = nnx.relu(h + self.b(nnx.relu(self.a(h))))
    h = self.mix(jnp.concatenate([h, nnx.relu(self.c(h))], axis=-1))
    return self.head(jnp.mean(nnx.relu(h), axis=(1, 2)))


def namespace() -> dict:
  params = {
    "Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)), "bias": jnp.zeros(8)},
    "Dense_1": {"kernel": jax.random.normal(jax.random.key(1), (8, 4)), "bias": jnp.zeros(4)},
  }
  model = ConvNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (4, 9, 9, 1))
  tx = jaxprune.masked(optax.adam(1e-3), jaxprune.magnitude(0.5, structure="filters"))
  return {
    "params": params,
    "grads": jax.tree.map(jnp.ones_like, params),
    "model": model,
    "nnx": nnx,
    "x": x,
    "jaxprune": jaxprune,
    "opt_state": tx.init(nnx.state(model, nnx.Param)),
  }


def test_the_readme_has_python_examples():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
  ns = namespace()
  if "surgery.shrink" in BLOCKS[index]:
    # `opt_state` in the surgery example belongs to that model's params.
    ns.pop("params")
  exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), ns)  # noqa: S102
  if "apply_updates" in BLOCKS[index]:
    before = namespace()["params"]
    masks = jaxprune.masks_of(ns["opt_state"])
    assert bool(masks["Dense_0"]["kernel"].all())  # AGP starts at step 1,000: nothing yet
    assert masks["Dense_0"]["bias"] is None
    step = np.asarray(before["Dense_0"]["kernel"] - ns["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(step, 1e-3, rtol=1e-3)  # Adam's first step: lr * sign(g)
  if "small" in ns:
    small = ns["small"]
    masked = nnx.merge(*nnx.split(ns["model"]))
    kernel_masks = ns["masks"]
    nnx.update(masked, jaxprune.apply_mask(nnx.state(ns["model"], nnx.Param), kernel_masks))
    for size in (5, 12):  # shrink also checks the traced size (9) and one larger
      xs = jax.random.normal(jax.random.key(size), (2, size, size, 1))
      np.testing.assert_allclose(small.model(xs), masked(xs), rtol=1e-5, atol=1e-5)
    params_before = sum(x.size for x in jax.tree.leaves(nnx.state(ns["model"], nnx.Param)))
    params_after = sum(x.size for x in jax.tree.leaves(nnx.state(small.model, nnx.Param)))
    assert params_after < params_before
