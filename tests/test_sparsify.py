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
