import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def agp_formula(t, s_f, s_i, t0, dt, n):
  return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("initial", [0.0, 0.2])
def test_agp_matches_zhu_gupta_formula_on_update_steps(initial):
  s = jaxprune.agp(0.9, begin=1000, end=10000, every=100, initial=initial)
  for t in (1000, 1100, 2500, 5000, 9900, 10000):
    np.testing.assert_allclose(
      float(s.sparsity(t)), agp_formula(t, 0.9, initial, 1000, 100, 90), atol=1e-6
    )
    assert bool(s.is_update(t))


def test_agp_between_before_and_after():
  s = jaxprune.agp(0.8, begin=10, end=50, every=10)
  assert float(s.sparsity(0)) == 0.0 and float(s.sparsity(9)) == 0.0
  assert float(s.sparsity(25)) == float(s.sparsity(20))  # held since the last update
  assert [bool(s.is_update(t)) for t in (9, 10, 15, 20, 50, 60)] == [
      False, True, False, True, True, False,
  ]  # fmt: skip
  np.testing.assert_allclose(float(s.sparsity(1000)), 0.8, rtol=1e-6)
  assert s.final == 0.8


def test_agp_end_off_grid_is_an_update_reaching_final():
  s = jaxprune.agp(0.5, begin=0, end=25, every=10)
  assert bool(s.is_update(25)) and not bool(s.is_update(24))
  np.testing.assert_allclose(float(s.sparsity(25)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s.sparsity(20)), agp_formula(20, 0.5, 0.0, 0, 25, 1))


def test_agp_is_traceable_without_recompiling():
  s = jaxprune.agp(0.9, 0, 100, 10)
  f = jax.jit(lambda t: (s.sparsity(t), s.is_update(t)))
  values = [float(f(jnp.int32(t))[0]) for t in range(0, 101, 10)]
  assert values == sorted(values) and f._cache_size() == 1


def test_one_shot_and_constant():
  s = jaxprune.one_shot(0.7, at=5)
  assert [round(float(s.sparsity(t)), 6) for t in (0, 4, 5, 100)] == [0.0, 0.0, 0.7, 0.7]
  assert [bool(s.is_update(t)) for t in (4, 5, 6)] == [False, True, False]
  c = jaxprune.constant(0.3)
  assert bool(c.is_update(0)) and not bool(c.is_update(1))


def test_iterative_rounds():
  s = jaxprune.iterative([(0, 0.5), (100, 0.75), (200, 0.9)])
  got = [round(float(s.sparsity(t)), 6) for t in (0, 99, 100, 199, 200, 5000)]
  assert got == [0.5, 0.5, 0.75, 0.75, 0.9, 0.9]
  assert [bool(s.is_update(t)) for t in (0, 50, 100, 200, 201)] == [True, False, True, True, False]
  late = jaxprune.iterative([(10, 0.5)])
  assert float(late.sparsity(9)) == 0.0


def test_callable_schedule():
  s = jaxprune.schedule(lambda t: jnp.minimum(t / 100, 0.5), every=20)
  assert float(s.sparsity(30)) == pytest.approx(0.3)
  assert [bool(s.is_update(t)) for t in (0, 10, 20)] == [True, False, True]
  wrapped = jaxprune.magnitude(lambda t: 0.1).schedule
  assert bool(wrapped.is_update(3))


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: jaxprune.agp(0.9, begin=100, end=10, every=10), r"end \(10\) must not come before"),
    (lambda: jaxprune.agp(0.9, 0, 100, every=0), "every must be > 0"),
    (lambda: jaxprune.agp(0.9, 0, 100, every=-5), "every must be > 0"),
    (lambda: jaxprune.agp(1.2, 0, 100, 10), r"final must be in \[0, 1\)"),
    (lambda: jaxprune.agp(0.9, 0, 100, 10, initial=-0.1), r"initial must be in \[0, 1\)"),
    (lambda: jaxprune.one_shot(1.0), r"sparsity must be in \[0, 1\)"),
    (lambda: jaxprune.iterative([]), "at least one"),
    (lambda: jaxprune.iterative([(10, 0.5), (5, 0.6)]), "strictly increasing"),
    (lambda: jaxprune.iterative([(0, 0.5), (10, 1.0)]), "round at step 10"),
    (lambda: jaxprune.schedule(lambda t: 0.5, every=0), "every must be > 0"),
    # steps past int32 were built and failed at the first step with jax's OverflowError
    (lambda: jaxprune.agp(0.5, 0, 2**31, every=2**30), r"end is 2147483648, outside the int32"),
    (lambda: jaxprune.one_shot(0.5, at=2**31), r"at is 2147483648, outside the int32"),
    (lambda: jaxprune.iterative([(0, 0.1), (2**31, 0.5)]), r"round step is 2147483648"),
  ],
)
def test_schedule_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_non_integer_steps_rejected():
  with pytest.raises(TypeError, match="begin must be an integer step"):
    jaxprune.agp(0.9, begin=1.5, end=10, every=1)


def test_a_traced_target_is_refused_where_the_schedule_is_built():
  # jit(lambda s: magnitude(s).masks(params)) failed with a ConcretizationTypeError
  # raised by float() inside one_shot.
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  for build in (
    jaxprune.magnitude,
    lambda s: jaxprune.agp(s, 0, 10, 5),
    lambda s: jaxprune.iterative([(0, s)]),
  ):
    with pytest.raises(TypeError, match="traced value.*jaxprune.schedule"):
      jax.jit(lambda s, build=build: build(s) and 0)(0.5)
  # The way out the message names: a traced target counted on the device.
  masks = jax.jit(
    lambda s: jaxprune.magnitude(jaxprune.schedule(lambda t: s)).masks(params, step=0)
  )(0.5)
  assert int(masks["w"].sum()) == 8


def test_agp_with_begin_equal_to_end_prunes_to_final_there():
  s = jaxprune.agp(0.6, begin=7, end=7, every=3)
  assert [float(s.sparsity(t)) for t in (0, 6)] == [0.0, 0.0]
  np.testing.assert_allclose([float(s.sparsity(t)) for t in (7, 8, 100)], 0.6, rtol=1e-6)
  assert [bool(s.is_update(t)) for t in (6, 7, 8)] == [False, True, False]


def test_agp_initial_above_final_rejected():
  with pytest.raises(ValueError, match=r"initial \(0.5\) must not exceed final \(0.3\)"):
    jaxprune.agp(0.3, 0, 10, 1, initial=0.5)


def test_iterative_decreasing_sparsity_rejected():
  with pytest.raises(ValueError, match="must not decrease"):
    jaxprune.iterative([(0, 0.5), (10, 0.3)])


@pytest.mark.parametrize(
  "rounds, err, match",
  [
    ([(0, 0.5, 3)], TypeError, r"\(0, 0.5, 3\) is not a pair"),
    ([0.5], TypeError, "0.5 is not a pair"),
    (0.5, TypeError, "list of \\(step, sparsity\\) pairs"),
    ([("a", 0.5)], TypeError, "round step must be an integer"),
    ([(0, "x")], TypeError, "must be a number"),
  ],
)
def test_iterative_malformed_rounds(rounds, err, match):
  with pytest.raises(err, match=match):
    jaxprune.iterative(rounds)


def test_long_agp_falls_back_to_the_formula():
  s = jaxprune.agp(0.9, begin=0, end=100_000, every=1)
  assert s.levels is None  # too many distinct targets for a host-side table
  np.testing.assert_allclose(float(s.sparsity(50_000)), agp_formula(50_000, 0.9, 0, 0, 1, 1e5))
  np.testing.assert_allclose(float(s.sparsity(100_000)), 0.9, rtol=1e-6)


schedule_kinds = st.one_of(
  st.builds(
    lambda final, begin, span, every, frac: (
      jaxprune.agp(final, begin, begin + span, every, initial=final * frac),
      begin + span,
    ),
    st.floats(0, 0.99),
    st.integers(0, 50),
    st.integers(0, 80),
    st.integers(1, 30),
    st.floats(0, 1),
  ),
  st.builds(
    lambda s, at: (jaxprune.one_shot(s, at=at), at), st.floats(0, 0.99), st.integers(0, 50)
  ),
  st.builds(
    lambda steps, values: (
      jaxprune.iterative(list(zip(steps, sorted(values[: len(steps)])))),
      steps[-1],
    ),
    st.lists(st.integers(0, 200), min_size=1, max_size=5, unique=True).map(sorted),
    st.lists(st.floats(0, 0.99), min_size=5, max_size=5),
  ),
)


@settings(max_examples=30, deadline=None)  # each example compiles its schedule
@given(kind=schedule_kinds, extra=st.integers(0, 40))
def test_property_every_schedule_reaches_final_by_end_and_never_exceeds_it(kind, extra):
  s, end = kind
  final = np.float32(s.final)
  # one length for every example (end + extra <= 240): each op compiles once, not per example
  values = np.asarray(jax.vmap(s.sparsity)(jnp.arange(256)))[: end + extra + 1]
  assert values.max() <= final
  assert (values[end:] == final).all()
  assert bool(s.is_update(end))
  assert (np.diff(values) >= 0).all()  # targets never decrease: masks only shrink
