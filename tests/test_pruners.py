import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_log import compiled
from flax import nnx

import jaxprune


def lenet300(key=0):
  ks = jax.random.split(jax.random.key(key), 3)
  shapes = [(784, 300), (300, 100), (100, 10)]
  return {
    f"fc{i + 1}": {"kernel": jax.random.normal(k, s), "bias": jnp.zeros(s[1])}
    for i, (k, s) in enumerate(zip(ks, shapes))
  }


def test_layerwise_magnitude_exact_per_layer():
  params = lenet300()
  m = jaxprune.magnitude(0.9).masks(params)
  for name, n in [("fc1", 235200), ("fc2", 30000), ("fc3", 1000)]:
    assert int(m[name]["kernel"].sum()) == n - round(0.9 * n)
    assert m[name]["bias"] is None
    w, mask = np.abs(np.asarray(params[name]["kernel"])), np.asarray(m[name]["kernel"])
    kept, dropped = w[mask], w[~mask]  # NumPy: jax.Array[mask] compiles per mask
    assert float(kept.min()) >= float(dropped.max())


def test_global_magnitude_one_threshold_over_layers():
  params = lenet300()
  params["fc3"]["kernel"] = params["fc3"]["kernel"] * 100  # head survives a global prune
  m = jaxprune.magnitude(0.9, scope="global").masks(params)
  total = sum(int(m[f"fc{i}"]["kernel"].sum()) for i in (1, 2, 3))
  assert total == 266200 - round(0.9 * 266200)
  assert int(m["fc3"]["kernel"].sum()) > 990


def test_han_lenet300_overrides():
  """Han et al.: first layer 92%, second 91%, output 74% pruned."""
  pruner = jaxprune.magnitude(0.9, overrides={"fc1": 0.92, "fc2": 0.91, "fc3": 0.74})
  s = jaxprune.summary(jaxprune.apply_mask(lenet300(), pruner.masks(lenet300())), "kernel")
  assert s["fc1/kernel"].zeros == round(0.92 * 235200)
  assert s["fc2/kernel"].zeros == round(0.91 * 30000)
  assert s["fc3/kernel"].zeros == 740


def test_float_override_follows_the_main_schedule_progress():
  pruner = jaxprune.magnitude(jaxprune.agp(0.8, 0, 100, 10), overrides={"fc3": 0.4})
  main = float(pruner.schedule.sparsity(50))
  assert float(pruner.sparsity_of("fc3/kernel", 50)) == pytest.approx(0.4 * main / 0.8)
  assert float(pruner.sparsity_of("fc3/kernel", 100)) == pytest.approx(0.4)
  sched = jaxprune.agp(0.3, 0, 10, 5)
  pruner = jaxprune.magnitude(0.9, overrides={"fc3": sched})
  assert float(pruner.sparsity_of("fc3/kernel", 5)) == float(sched.sparsity(5))


def test_global_with_override_pools_the_rest():
  params = lenet300()
  m = jaxprune.magnitude(0.8, scope="global", overrides={"fc3": 0.5}).masks(params)
  assert int(m["fc3"]["kernel"].sum()) == 500
  pooled = int(m["fc1"]["kernel"].sum()) + int(m["fc2"]["kernel"].sum())
  assert pooled == 265200 - round(0.8 * 265200)


def test_dense_first_and_last():
  m = jaxprune.magnitude(0.5, dense_first=True, dense_last=True).masks(lenet300())
  assert m["fc1"]["kernel"] is None and m["fc3"]["kernel"] is None
  assert int(m["fc2"]["kernel"].sum()) == 15000


def test_random_is_seeded_and_uniform_count():
  params = lenet300()
  a = jaxprune.random(0.5, seed=3).masks(params, step=7)
  b = jaxprune.random(0.5, seed=3).masks(params, step=7)
  c = jaxprune.random(0.5, seed=4).masks(params, step=7)
  np.testing.assert_array_equal(a["fc2"]["kernel"], b["fc2"]["kernel"])
  assert not np.array_equal(a["fc2"]["kernel"], c["fc2"]["kernel"])
  assert int(a["fc2"]["kernel"].sum()) == 15000
  # Not correlated with magnitude: about half of the largest weights are dropped.
  big = jnp.abs(params["fc2"]["kernel"]) > 1.0
  frac = float((a["fc2"]["kernel"] & big).sum() / big.sum())
  assert 0.45 < frac < 0.55


def test_random_masks_nest_when_sparsity_grows():
  params = lenet300()
  pruner = jaxprune.random(jaxprune.agp(0.8, 0, 10, 5), seed=0)
  first = pruner.masks(params, step=0)
  later = pruner.masks(params, step=10, previous=first)
  assert not bool((later["fc1"]["kernel"] & ~first["fc1"]["kernel"]).any())


def test_saliency_uses_gradients():
  params = {"w": jnp.array([[1.0, 2.0, 3.0, 4.0]])}
  grads = {"w": jnp.array([[10.0, 0.1, 1.0, 0.0]])}
  assert jaxprune.saliency(0.5).masks(params, grads)["w"].tolist() == [[True, False, True, False]]
  with pytest.raises(ValueError, match="pass grads="):
    jaxprune.saliency(0.5).masks(params)


def test_saliency_of_float16_params_is_scored_in_float32():
  # 300 * 300 overflowed float16 to inf: refused as "not finite" (under jit: ranked first).
  p = {"w": jnp.array([[300.0, 1.0], [2.0, 3.0]], jnp.float16)}
  g = {"w": jnp.array([[300.0, 1.0], [2.0, 0.5]], jnp.float16)}
  assert jaxprune.saliency(0.5).masks(p, g)["w"].tolist() == [[True, False], [True, False]]


def test_nnx_state_masks():
  model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  m = jaxprune.magnitude(0.75).masks(state)
  s = jaxprune.summary(m)
  assert s.as_dict() == {"layers/0/kernel": 0.75, "layers/1/kernel": 0.75, "total": 0.75}


@pytest.mark.parametrize(
  "make, err, match",
  [
    (lambda: jaxprune.magnitude(1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (lambda: jaxprune.magnitude(-0.5), ValueError, r"sparsity must be in \[0, 1\)"),
    (lambda: jaxprune.magnitude("half"), TypeError, "must be a number"),
    (lambda: jaxprune.magnitude(0.5, scope="net"), ValueError, "scope must be"),
    (lambda: jaxprune.magnitude(0.5, overrides={"fc1": 2.0}), ValueError, "'fc1'"),
  ],
)
def test_pruner_errors(make, err, match):
  with pytest.raises(err, match=match):
    make()


def test_override_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match="'fc9' matches none of the pruned params"):
    jaxprune.magnitude(0.5, overrides={"fc9": 0.1}).masks(lenet300())


def test_a_concrete_nan_weight_is_an_error_naming_the_leaf():
  params = {"fc": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2).at[1, 1].set(jnp.nan)}}
  for pruner in (jaxprune.magnitude(0.5), jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4))):
    with pytest.raises(
      ValueError, match=r"'fc/kernel' has a NaN or infinite score at index \(1, 1\)"
    ):
      pruner.masks(params)
  traced = jax.jit(jaxprune.magnitude(0.5).masks)(params)["fc"]["kernel"]  # documented: kept
  assert bool(traced[1, 1])


def test_mismatched_grads_are_named():
  with pytest.raises(ValueError, match="grads tree does not match"):
    jaxprune.saliency(0.5).masks({"w": jnp.ones((2, 2))}, {"v": jnp.ones((2, 2))})


def test_final_sparsity_needs_a_known_final():
  with pytest.raises(ValueError, match="no final sparsity"):
    jaxprune.magnitude(lambda t: 0.5).masks({"w": jnp.ones((2, 2))})


def _run_masked(pruner, params, steps):
  import optax

  tx = jaxprune.masked(optax.sgd(0.0), pruner)
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.zeros_like, params)
  for _ in range(steps):
    _, state = update(grads, state, params)
  return jaxprune.masks_of(state)


def test_schedule_override_updates_on_its_own_steps():
  params = {
    "a": jnp.arange(1.0, 101.0).reshape(10, 10),
    "b": jnp.arange(1.0, 101.0).reshape(10, 10),
  }
  pruner = jaxprune.magnitude(
    jaxprune.iterative([(0, 0.5), (10, 0.9)]),
    overrides={"b": jaxprune.iterative([(5, 0.3), (15, 0.6)])},
  )
  for steps, a, b in [(1, 50, 0), (6, 50, 30), (11, 90, 30), (20, 90, 60)]:
    m = _run_masked(pruner, params, steps)
    assert int((~m["a"]).sum()) == a and int((~m["b"]).sum()) == b, steps
    np.testing.assert_allclose(float(pruner.sparsity_of("b", steps - 1)), b / 100, rtol=1e-6)
  direct = pruner.masks(params, step=19)
  assert int((~direct["b"]).sum()) == 60


def test_float_override_follows_main_progress_and_update_steps():
  params = {"a": jnp.ones((10, 10)), "b": jnp.ones((10, 10))}
  pruner = jaxprune.magnitude(jaxprune.agp(0.8, 0, 10, 5), overrides={"b": 0.4})
  assert pruner.schedule_of("b").levels[-1] == 0.4
  for steps in (1, 6, 11):
    m = _run_masked(pruner, params, steps)
    target_a = float(pruner.sparsity_of("a", steps - 1))
    assert int((~m["b"]).sum()) == round(pruner.schedule_of("b").levels[-1] * 100 * target_a / 0.8)


@pytest.mark.parametrize("main", [jaxprune.schedule(lambda t: 0.0, final=0.0), lambda t: 0.5])
def test_float_override_needs_a_main_schedule_with_known_steps(main):
  with pytest.raises(ValueError, match="Give the override its own schedule"):
    jaxprune.magnitude(main, overrides={"b": 0.5})
  jaxprune.magnitude(main, overrides={"b": jaxprune.constant(0.5)})  # the way to say it


@pytest.mark.parametrize(
  "main, first", [(0.0, 0), (jaxprune.one_shot(0.0, at=4), 4), (jaxprune.agp(0.0, 3, 9, 3), 3)]
)
def test_float_override_of_a_main_schedule_ending_at_zero_is_one_shot(main, first):
  params = {"a": jnp.ones((10, 10)), "b": jnp.arange(100.0).reshape(10, 10)}
  pruner = jaxprune.magnitude(main, overrides={"b": 0.3})
  before = [float(pruner.sparsity_of("b", t)) for t in range(first)]
  assert before == [0.0] * first
  np.testing.assert_allclose([float(pruner.sparsity_of("b", t)) for t in (first, 20)], 0.3)
  m = _run_masked(pruner, params, first + 1)
  assert int((~m["b"]).sum()) == 30 and bool(m["a"].all())


def test_where_that_selects_nothing_is_an_error_with_a_suggestion():
  params = {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
  with pytest.raises(ValueError, match=r"where='Dens_0' selects none.*Did you mean 'Dense_0'"):
    jaxprune.magnitude(0.5, where="Dens_0").masks(params)
  with pytest.raises(ValueError, match=r"default `where`.*Params: \[w int32\[4x4\]\]"):
    jaxprune.magnitude(0.5).masks({"w": jnp.ones((4, 4), jnp.int32)})
  with pytest.raises(ValueError, match="no array leaves"):
    jaxprune.magnitude(0.5).masks({})
  with pytest.raises(ValueError, match="nothing is left to prune"):
    jaxprune.magnitude(0.5, dense_first=True).masks({"w": jnp.ones((4, 4))})


@pytest.mark.parametrize(
  "make, err, match",
  [
    (lambda: jaxprune.random(0.5, seed="x"), TypeError, "seed must be an int"),
    (lambda: jaxprune.magnitude(0.5, where=42), TypeError, "`where` must be None"),
    (lambda: jaxprune.magnitude(0.5, where="["), ValueError, "not a valid regular expression"),
    (lambda: jaxprune.magnitude(0.5, overrides={"[": 0.1}), ValueError, "regular expression"),
    (lambda: jaxprune.magnitude(0.5, overrides=[("a", 0.1)]), TypeError, "overrides must be"),
    (lambda: jaxprune.magnitude(0.5, dense_last="yes"), TypeError, "dense_last must be"),
    (lambda: jaxprune.magnitude(float("nan")), ValueError, r"in \[0, 1\)"),
    (lambda: jaxprune.magnitude(0.5, structure="rows"), ValueError, "Unknown structure"),
  ],
)
def test_pruner_argument_errors(make, err, match):
  with pytest.raises(err, match=match):
    make()


def test_zero_size_param_and_non_scalar_step():
  with pytest.raises(ValueError, match=r"'w' has no entries \(shape \(0, 3\)\).*Leave it out"):
    jaxprune.magnitude(0.5).masks({"w": jnp.ones((0, 3))})
  with pytest.raises(TypeError, match="step must be a scalar integer"):
    jaxprune.magnitude(0.5).masks({"w": jnp.ones((3, 3))}, step=jnp.array([1, 2]))
  with pytest.raises(TypeError, match="step must be a scalar integer"):
    jaxprune.magnitude(0.5).masks({"w": jnp.ones((3, 3))}, step=1.5)


def test_steps_of_other_integer_types_and_steps_int32_cannot_hold():
  pruner = jaxprune.magnitude(jaxprune.agp(0.5, 0, 10, 2))
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  for step in (10, np.int64(10), jnp.uint32(10), np.uint8(10)):
    assert int((~pruner.masks(params, step=step)["w"]).sum()) == 8
  # A step int32 cannot hold wrapped around: uint32 3e9 and 2**33 read as steps < 0 and 0
  # and pruned nothing (the target at the end is 0.5).
  for step in (jnp.uint32(3_000_000_000), np.int64(2**33), 2**33):
    with pytest.raises(ValueError, match="outside the int32 range"):
      pruner.masks(params, step=step)


@pytest.mark.parametrize("value", [float("nan"), 1.5, -0.2])
def test_custom_schedule_out_of_range_raises_where_concrete(value):
  pruner = jaxprune.magnitude(jaxprune.schedule(lambda t: jnp.where(t >= 3, value, 0.1)))
  params = {"w": jnp.ones((4, 4))}
  assert int((~pruner.masks(params, step=0)["w"]).sum()) == 2
  with pytest.raises(ValueError, match="sparsity at step 3"):
    pruner.masks(params, step=3)


def test_traced_nan_target_keeps_previous_masks_and_above_one_prunes_all():
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  nan_later = jaxprune.magnitude(jaxprune.schedule(lambda t: jnp.where(t >= 1, jnp.nan, 0.5)))
  m = _run_masked(nan_later, params, 3)
  assert int(m["w"].sum()) == 8  # step 0 pruned half; NaN steps left the masks alone
  above = jaxprune.magnitude(jaxprune.schedule(lambda t: jnp.where(t >= 1, 1.5, 0.5)))
  assert int(_run_masked(above, params, 2)["w"].sum()) == 0  # clipped to 1: documented


def test_masks_outside_jit_compile_all_leaves_scores_as_one_program():
  # Shapes no other test uses: an op-by-op score (abs, the PRNG fold-ins) would compile
  # per leaf shape; the scores of all leaves compile as one program instead.
  params = {"a": jax.random.normal(jax.random.key(0), (13, 6)), "b": jnp.ones((6, 17))}
  params["b"] = params["b"].at[2, 3].set(5.0)
  with compiled() as names:
    masks = jaxprune.magnitude(0.5).masks(params)
  assert names.count("jit(_leaf_scores_eager)") == 1, names
  assert not {"jit(abs)", "jit(_threefry_fold_in)"} & set(names), names
  for k in params:
    expected = np.zeros(params[k].size, bool)
    expected[
      np.argsort(-np.abs(np.asarray(params[k])).ravel(), kind="stable")[: params[k].size // 2]
    ] = True
    np.testing.assert_array_equal(np.asarray(masks[k]).ravel(), expected)


class _UnhashableScore:
  """A score function object that cannot key a compile cache (``__eq__``, no hash)."""

  __hash__ = None  # type: ignore[assignment]

  def __eq__(self, other):
    return isinstance(other, _UnhashableScore)

  def __call__(self, param, grad, key):
    return jnp.abs(param)


def test_an_unhashable_score_function_is_applied_op_by_op():
  params = {"w": jnp.array([[3.0, -1.0], [0.5, -4.0]])}
  pruner = dataclasses.replace(jaxprune.magnitude(0.5), score=_UnhashableScore())
  assert pruner.masks(params)["w"].tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize(
  "pruner, match",
  [
    (jaxprune.magnitude(0.99, structure="neurons"), r"'b' \(3 neurons\) would keep none"),
    (jaxprune.magnitude(0.995), r"'b' \(9 weights\) would keep none: round\(0.995 \* 9\)"),
    (jaxprune.magnitude(0.9996, scope="global"), r"the 2 pooled params \(1209 weights\)"),
    (
      jaxprune.magnitude(jaxprune.agp(0.99, 0, 100, 10), structure="neurons"),
      r"'b' \(3 neurons\).*below 0.833333",
    ),
    (jaxprune.magnitude(0.5, overrides={"b": 0.99}), r"'b' \(9 weights\)"),
  ],
)
def test_a_final_sparsity_that_rounds_to_every_group_is_refused(pruner, match):
  """sparsity=1 is refused; round(s * n) = n for s within 0.5 / n of 1 is too (at any step,
  from the schedule's final sparsity: known before a run, not found at its end)."""
  params = {"a": jnp.ones((4, 300)), "b": jnp.ones((3, 3))}
  with pytest.raises(ValueError, match=match):
    pruner.masks(params, step=0)
  kept = jaxprune.magnitude(0.8, structure="neurons").masks(params)  # round(2.4) = 2 of 3
  assert int(kept["b"].any(axis=0).sum()) == 1
