"""Sparsity distributions: uniform and ERK against the formula, used by pruners and trainers."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune.sparse import Distribution, erk, rigl, static_sparse, uniform

# conv kernels (HWIO), dense kernels, and tiny layers that ERK must make dense
SHAPE_SETS = {
  "mlp": {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)},
  "convnet": {"c1": (3, 3, 3, 16), "c2": (3, 3, 16, 32), "c3": (3, 3, 32, 64), "fc": (256, 10)},
  "forces_dense": {"tiny": (2, 3), "small": (10, 10), "big": (400, 400), "huge": (600, 500)},
  "two_dense": {"t1": (2, 2), "t2": (3, 2), "big": (300, 300)},
}


def erk_reference(shapes: dict, sparsity: float) -> dict:
  """Independent: solve for eps; make the layer with the largest raw density dense while
  its density exceeds 1 (one at a time), then solve again."""
  n = {k: float(np.prod(s)) for k, s in shapes.items()}
  raw = {k: float(np.sum(s)) / n[k] for k, s in shapes.items()}
  dense = []
  while True:
    free = [k for k in shapes if k not in dense]
    eps = ((1 - sparsity) * sum(n.values()) - sum(n[k] for k in dense)) / sum(
      raw[k] * n[k] for k in free
    )
    worst = max(free, key=lambda k: raw[k])
    if eps * raw[worst] <= 1:
      return {k: 0.0 if k in dense else 1 - eps * raw[k] for k in shapes}
    dense.append(worst)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.98])
@pytest.mark.parametrize("name", SHAPE_SETS)
def test_erk_matches_the_formula(name, sparsity):
  shapes = SHAPE_SETS[name]
  got = erk(sparsity).sparsities(shapes)
  want = erk_reference(shapes, sparsity)
  assert got.keys() == want.keys()
  for k in shapes:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k
  n = {k: math.prod(s) for k, s in shapes.items()}
  kept = sum((1 - got[k]) * n[k] for k in shapes)
  assert kept == pytest.approx((1 - sparsity) * sum(n.values()), rel=1e-12)
  free = [k for k in shapes if got[k] > 0]
  eps = [(1 - got[k]) * n[k] / sum(shapes[k]) for k in free]  # density / (sum / prod)
  np.testing.assert_allclose(eps, eps[0], rtol=1e-9)


def test_erk_makes_small_layers_dense():
  got = erk(0.9).sparsities(SHAPE_SETS["forces_dense"])
  assert got["tiny"] == 0.0 and got["small"] == 0.0
  assert got["huge"] > 0.9 and 0.8 < got["big"] < got["huge"]
  got = erk(0.5).sparsities(SHAPE_SETS["two_dense"])
  assert got["t1"] == 0.0 and got["t2"] == 0.0


@pytest.mark.parametrize(
  "shapes",
  [
    {"w": (2, 9)},
    {"conv": (3, 3, 8, 8), "dense": (15, 11)},
    {"conv": (3, 3, 1, 15), "dense": (7, 28)},
  ],
)
def test_erk_of_zero_sparsity_is_every_layer_dense(shapes):
  """erk(0.0) raised ZeroDivisionError on these shapes (a dense baseline of a sweep):
  eps * raw rounded just past 1 in the last layer, which was made dense, leaving no
  layer to solve eps over."""
  assert erk(0.0).sparsities(shapes) == {p: 0.0 for p in shapes}
  params = {p: jnp.ones(s) for p, s in shapes.items()}
  state = static_sparse(optax.sgd(0.1), erk(0.0), where=lambda p, x: True).init(params)
  assert all(bool(m.all()) for m in jaxprune.masks_of(state).values())


def test_uniform_and_power():
  assert uniform(0.7).sparsities({"a": (4, 5), "b": (2, 2)}) == {"a": 0.7, "b": 0.7}
  flat = erk(0.9, power=0.0).sparsities({"a": (40, 50), "b": (20, 20)})  # power 0: uniform
  assert flat["a"] == pytest.approx(0.9) and flat["b"] == pytest.approx(0.9)


def params_of(shapes):
  rng = np.random.default_rng(0)
  return {k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, s in shapes.items()}


@pytest.mark.parametrize("make", ["magnitude", "random", "saliency"])
def test_every_pruner_takes_a_distribution(make):
  shapes = SHAPE_SETS["forces_dense"]
  params = params_of(shapes)
  pruner = getattr(jaxprune, make)(erk(0.9))
  masks = pruner.masks(params, params)
  per = erk(0.9).sparsities({f"{k}/kernel": s for k, s in shapes.items()})
  for k, s in shapes.items():
    n = math.prod(s)
    assert int(masks[k]["kernel"].sum()) == n - round(per[f"{k}/kernel"] * n), k


def test_a_distribution_of_a_schedule_scales_each_layer():
  shapes = {"a": (30, 30), "b": (30, 4)}
  params = params_of(shapes)
  pruner = jaxprune.magnitude(erk(jaxprune.agp(0.9, begin=0, end=100, every=10)))
  per = erk(0.9).sparsities({"a/kernel": (30, 30), "b/kernel": (30, 4)})
  at_end = pruner.masks(params, step=jnp.int32(100))
  mid = pruner.masks(params, step=jnp.int32(50))
  agp_mid = float(jaxprune.agp(0.9, 0, 100, 10).sparsity(50))
  for k in shapes:
    n = math.prod(shapes[k])
    assert int(at_end[k]["kernel"].sum()) == n - round(per[f"{k}/kernel"] * n)
    want_mid = n - round(per[f"{k}/kernel"] * agp_mid / 0.9 * n)
    assert abs(int(mid[k]["kernel"].sum()) - want_mid) <= 1


def test_first_and_last_layer_dense_with_a_distribution():
  shapes = SHAPE_SETS["mlp"]
  params = params_of(shapes)
  masks = jaxprune.magnitude(erk(0.9), dense_first=True, dense_last=True).masks(params)
  assert masks["fc1"]["kernel"] is None and masks["fc3"]["kernel"] is None
  assert int(masks["fc2"]["kernel"].sum()) == 30000 - 27000
  masks = static_sparse(optax.sgd(0.1), erk(0.9), dense_first=True).init(params).masks
  per = erk(0.9).sparsities({"fc2": (300, 100), "fc3": (100, 10)})
  assert masks["fc1"]["kernel"] is None
  assert int(masks["fc3"]["kernel"].sum()) == 1000 - round(per["fc3"] * 1000)


def test_distribution_errors():
  with pytest.raises(ValueError, match="'uniform' or 'erk'"):
    Distribution("er", 0.9)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    erk(1.0)
  with pytest.raises(ValueError, match="scope='layer'"):
    jaxprune.magnitude(erk(0.9), scope="global")
  with pytest.raises(ValueError, match="resolve"):
    jaxprune.magnitude(erk(0.9)).sparsity_of("a", 0)
  with pytest.raises(TypeError, match="fixed for the whole run"):
    rigl(optax.sgd(0.1), erk(jaxprune.agp(0.9, 0, 10, 1)), end=10)


def test_a_layer_left_with_no_weight_is_an_error():
  """erk(0.999) on small layers used to prune every weight of every layer, silently."""
  params = {"a": jnp.ones((4, 3)), "b": jnp.ones((3, 2)), "big": jnp.ones((40, 40))}
  shapes = {k: v.shape for k, v in params.items()}
  per_layer = jaxprune.sparse.layer_sparsities("erk", 0.999, shapes)
  # the reference count: Python's round of the float64 product, per layer
  sizes = {k: math.prod(shape) for k, shape in shapes.items()}
  empty = [k for k, s in per_layer.items() if round(s * sizes[k]) == sizes[k]]
  assert empty == ["a", "b"]
  message = r"erk\(0.999\) leaves no weight in 2 layer\(s\): 'a' \(shape \(4, 3\)"
  with pytest.raises(ValueError, match=message):
    static_sparse(optax.sgd(0.1), erk(0.999)).init(params)
  with pytest.raises(ValueError, match=message):
    rigl(optax.sgd(0.1), erk(0.999), end=10, every=5).init(params)
  with pytest.raises(ValueError, match=message):
    jaxprune.magnitude(erk(0.999)).resolve(params)
  # uniform too: 0.95 of 12 weights removes round(11.4) = 11 and keeps one; 0.96 keeps none
  kept = static_sparse(optax.sgd(0.1), uniform(0.95), where="^a$").init(params).masks["a"]
  assert int(kept.sum()) == 1
  with pytest.raises(ValueError, match=r"uniform\(0.96\) leaves no weight in 1 layer\(s\): 'a'"):
    static_sparse(optax.sgd(0.1), 0.96, where="^a$").init(params)


@pytest.mark.parametrize("power, error", [
  (float("nan"), ValueError), (float("inf"), ValueError), (-1.0, ValueError), ("1", TypeError),
])  # fmt: skip
def test_erk_power_is_a_finite_number(power, error):
  with pytest.raises(error, match="erk: power must be a number >= 0"):
    erk(0.9, power=power)
