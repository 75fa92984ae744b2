import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune


def test_exact_count_and_error_feedback_conserves_gradient_mass():
  tx = jaxprune.topk_gradients(0.1)
  g = {"a": jax.random.normal(jax.random.key(0), (20, 10)), "b": jnp.arange(10.0)}
  state = tx.init(g)
  total_sent = jax.tree.map(jnp.zeros_like, g)
  for _ in range(3):
    out, state = tx.update(g, state)
    assert int((out["a"] != 0).sum()) == 20 and int((out["b"] != 0).sum()) == 1
    total_sent = jax.tree.map(jnp.add, total_sent, out)
  # everything fed in is either sent or still in the residual
  for k in g:
    np.testing.assert_allclose(total_sent[k] + state.residual[k], 3 * g[k], rtol=1e-5, atol=1e-5)


def test_residual_gets_sent_eventually():
  tx = jaxprune.topk_gradients(0.5)
  g = {"w": jnp.array([10.0, 1.0])}
  state = tx.init(g)
  sent = []
  for _ in range(12):
    out, state = tx.update(g, state)
    sent.append(float(out["w"][1]))
  assert max(sent) > 0  # the small coordinate accumulates until it wins


def test_global_scope_and_jit_in_chain():
  tx = optax.chain(jaxprune.topk_gradients(0.25, scope="global"), optax.sgd(1.0))
  params = {"a": jnp.zeros(4), "b": jnp.zeros(4)}
  g = {"a": jnp.array([1.0, 2.0, 3.0, 4.0]), "b": jnp.array([5.0, 0.0, 0.0, 0.0])}
  state = tx.init(params)
  out, state = jax.jit(tx.update)(g, state, params)
  assert out["a"].tolist() == [0.0, 0.0, 0.0, -4.0] and out["b"].tolist() == [-5.0, 0, 0, 0]


def test_where_and_errors():
  tx = jaxprune.topk_gradients(0.5, where="a")
  g = {"a": jnp.array([1.0, 3.0]), "b": jnp.array([1.0, 3.0])}
  out, _ = tx.update(g, tx.init(g))
  assert out["b"].tolist() == [1.0, 3.0] and out["a"].tolist() == [0.0, 3.0]
  with pytest.raises(ValueError, match="must be in"):
    jaxprune.topk_gradients(0.0)
  with pytest.raises(ValueError, match="scope must be"):
    jaxprune.topk_gradients(0.5, scope="all")


@pytest.mark.parametrize("bad", ["0.1", None, True])
def test_density_that_is_not_a_number_fails_at_construction(bad):
  with pytest.raises(TypeError, match=r"topk_gradients\(\): density must be a number in \(0, 1\]"):
    jaxprune.topk_gradients(bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), np.array([0.1, 0.2]), [0.1]])
def test_density_outside_0_1_fails_at_construction(bad):
  with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
    jaxprune.topk_gradients(bad)


def test_density_one_sends_everything_and_an_injected_density_changes():
  g = {"w": jnp.array([1.0, -4.0, 2.0, 0.5])}
  tx = jaxprune.topk_gradients(1)
  out, _ = tx.update(g, tx.init(g))
  assert out["w"].tolist() == g["w"].tolist()
  tx = optax.inject_hyperparams(jaxprune.topk_gradients)(density=0.25)
  state = tx.init(g)
  out, state = jax.jit(tx.update)(g, state)
  assert out["w"].tolist() == [0.0, -4.0, 0.0, 0.0]
  state.hyperparams["density"] = jnp.asarray(0.75)
  out, state = jax.jit(tx.update)(g, state)
  assert out["w"].tolist() == [2.0, -4.0, 4.0, 0.0]  # top 3 of g + residual [1, 0, 2, .5]


def test_bad_where_fails_at_construction_and_an_empty_selection_at_init():
  with pytest.raises(TypeError, match="where"):
    jaxprune.topk_gradients(0.5, where=5)
  tx = jaxprune.topk_gradients(0.5, where="kernel")
  with pytest.raises(
    ValueError,
    match=r"topk_gradients\(\): where='kernel' selects none .*\[b float32\[2\], w float32\[3\]\]",
  ):
    tx.init({"w": jnp.ones(3), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match="selects none"):
    jaxprune.topk_gradients(0.5).init({"ids": jnp.arange(3)})


def test_update_accepts_optax_extra_args():
  tx = jaxprune.topk_gradients(0.5)
  g = {"w": jnp.array([1.0, -4.0, 2.0, 0.5])}
  out, _ = tx.update(g, tx.init(g), value=jnp.float32(1.0))
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  assert out["w"].tolist() == [0.0, -4.0, 2.0, 0.0]
