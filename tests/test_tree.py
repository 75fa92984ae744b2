import jax.numpy as jnp
import pytest
from flax import nnx

from jaxprune import tree


def test_path_strings_for_linen_dicts_lists_and_nnx():
  params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "blocks": [{"w": jnp.ones(1)}]}
  assert [p for p, _ in tree.leaves_with_paths(params)] == ["Dense_0/kernel", "blocks/0/w"]
  st = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  assert sorted(p for p, _ in tree.leaves_with_paths(st)) == ["bias", "kernel"]


def test_default_selection_skips_biases_norms_and_ints():
  params = {
    "conv": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)},
    "bn": {"scale": jnp.ones(4)},
    "table": jnp.ones((3, 3), jnp.int32),
  }
  assert tree.selected_paths(params) == ["conv/kernel"]


def test_default_selection_skips_two_dimensional_biases():
  """Linen's attention (and DenseGeneral, nnx.LinearGeneral) keeps (heads, head_dim) biases;
  they are biases, not weight matrices, whatever their rank."""
  import flax.linen as nn
  import jax
  import numpy as np

  import jaxprune

  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  x = jnp.ones((1, 3, 8))
  params = attn.init(jax.random.key(0), x, x)
  assert tree.selected_paths(params) == [
    f"params/{name}/kernel" for name in ("key", "out", "query", "value")
  ]
  assert np.shape(params["params"]["query"]["bias"]) == (2, 4)
  params = jax.tree.map(lambda a: a + 1.0, params)  # nonzero biases
  masks = jaxprune.magnitude(0.5).masks(params)
  for name in ("key", "query", "value"):
    assert masks["params"][name]["bias"] is None, name
    assert int(np.asarray(masks["params"][name]["kernel"]).sum()) == 32, name  # 64 -> 32


def test_patterns_and_predicates():
  params = {
    "a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    "b": {"kernel": jnp.ones((2, 2))},
  }
  assert tree.selected_paths(params, r"^a/") == ["a/bias", "a/kernel"]
  assert tree.selected_paths(params, ["b/", "bias"]) == ["a/bias", "b/kernel"]
  assert tree.selected_paths(params, lambda p, x: x.ndim == 2 and p.startswith("b")) == ["b/kernel"]


def test_natural_order_and_dense_first_last():
  params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2))} for i in (0, 1, 2, 10)}
  order = [f"Dense_{i}/kernel" for i in (0, 1, 2, 10)]
  assert tree.selected_paths(params) == order
  assert tree.selected_paths(params, dense_first=True, dense_last=True) == order[1:-1]


def test_selecting_an_int_leaf_is_an_error_naming_it():
  params = {"step": jnp.zeros((2, 2), jnp.int32), "w": jnp.ones((2, 2))}
  with pytest.raises(TypeError, match="'step' has dtype int32"):
    tree.selected_paths(params, lambda p, x: True)


def test_bad_pattern_type():
  with pytest.raises(TypeError, match="must be strings"):
    tree.as_predicate([1, 2])


def test_structure_check_names_the_first_differing_path():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match="params have 'b' but the mask has 'c'"):
    tree.check_same_structure(params, {"a": None, "c": None})
  with pytest.raises(ValueError, match="'b' is only in the params"):
    tree.check_same_structure(params, {"a": None})
  with pytest.raises(ValueError, match=r"mask for 'a' has shape \(4,\)"):
    tree.check_same_structure(params, {"a": jnp.ones(4, bool), "b": None})
