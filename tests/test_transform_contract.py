"""The contract every optax transform jaxprune ships must keep (optax's transform_test style).

Each transform in :data:`CASES` is run for two steps and its updates compared with an
independent NumPy computation: with and without ``jit``, inside ``optax.chain``, under
``optax.inject_hyperparams`` (changing a hyperparameter between the steps), with optax's
extra arguments (``value=``), on a Linen param dict, on an ``nnx.State`` and through
``nnx.Optimizer``. Wrappers must forward the extra arguments to their inner transform
(``optax.polyak_sgd`` reads ``value``). A transform added to the library must be added
to :data:`CASES` (:func:`test_every_shipped_transform_is_in_the_contract` checks).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_sparse import numpy_regrowth_scores  # the documented SET draw, in numpy
from xla_cache import reuse_identical_compiles  # noqa: F401 (autouse)

import jaxprune
from jaxprune import regularizers, sparse, sparsify, transforms
from jaxprune import tree as tree_lib
from jaxprune.sparse import dynamic as sparse_dynamic
from jaxprune.sparse import lottery as sparse_lottery
from jaxprune.sparse import ste as sparse_ste

# --- the model, its params and gradients, as Linen dict and nnx.State ----------------------

_rng = np.random.default_rng(0)
PARAMS = {
  # filters (columns) 1 and 3 are small: group lasso zeroes them
  "fc1/kernel": (_rng.normal(size=(3, 4)) * [1.0, 0.05, 1.0, 0.05]).astype(np.float32),
  "fc1/bias": (0.1 * _rng.normal(size=4)).astype(np.float32),
  # two small scales: l1 zeroes them
  "bn1/scale": np.array([1.0, 0.1, -0.05, 0.5], np.float32),
  "bn1/bias": (0.1 * _rng.normal(size=4)).astype(np.float32),
  "fc2/kernel": _rng.normal(size=(4, 2)).astype(np.float32),
  "fc2/bias": (0.1 * _rng.normal(size=2)).astype(np.float32),
}
GRADS = [{k: (0.02 * _rng.normal(size=v.shape)).astype(np.float32) for k, v in PARAMS.items()}]
GRADS.append({k: (0.02 * _rng.normal(size=v.shape)).astype(np.float32) for k, v in PARAMS.items()})
VALUE = 0.7  # the loss passed as optax's extra argument `value`


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True, name="bn1")(nn.Dense(4, name="fc1")(x))
    return nn.Dense(2, name="fc2")(nn.relu(x))


class NnxNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(3, 4, rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.fc2 = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.bn1(self.fc1(x))))


def with_values(tree: Any, flat: dict[str, np.ndarray]) -> Any:
  """``tree`` with every leaf replaced by ``flat[path]``."""
  paths = [p for p, _ in tree_lib.leaves_with_paths(tree)]
  assert sorted(paths) == sorted(flat), paths
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [jnp.asarray(flat[p]) for p in paths])


def flat(tree: Any) -> dict[str, np.ndarray]:
  return {p: np.asarray(x) for p, x in tree_lib.leaves_with_paths(tree)}


@functools.cache
def linen_params() -> Any:
  variables = LinenNet().init(jax.random.key(0), jnp.ones((1, 3)))
  return variables["params"]


def nnx_model() -> NnxNet:
  model = NnxNet(nnx.Rngs(0))
  nnx.update(model, with_values(nnx.state(model, nnx.Param), PARAMS))
  return model


def structured(structure: str, values: dict[str, np.ndarray]) -> Any:
  """``values`` as a Linen param dict or as an ``nnx.State`` of ``nnx.Param``."""
  if structure == "linen":
    return with_values(linen_params(), values)
  return with_values(nnx.state(NnxNet(nnx.Rngs(0)), nnx.Param), values)


# --- independent NumPy references -----------------------------------------------------------

KERNELS = ("fc1/kernel", "fc2/kernel")


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
  keep = w.size - round(sparsity * w.size)
  order = np.argsort(-np.abs(w).ravel(), kind="stable")
  mask = np.zeros(w.size, bool)
  mask[order[:keep]] = True
  return mask.reshape(w.shape)


def checkerboard(shape: tuple[int, ...]) -> np.ndarray:
  return np.add.outer(np.arange(shape[0]), np.arange(shape[1])) % 2 == 0


class MaskedSgdRef:
  """``masked(sgd(lr), ...)``: kept weights take the SGD step, pruned ones go to zero."""

  def __init__(self, masks: Callable[[dict], dict], learning_rate: float):
    self.masks, self.lr = masks, learning_rate

  def init(self, params):
    return None

  def update(self, grads, state, params):
    masks = self.masks(params) if state is None else state
    out = {}
    for k, g in grads.items():
      step = -self.lr * g
      out[k] = np.where(masks[k], step, -params[k]) if k in masks else step
    return out, masks


class ProxRef:
  """A proximal step on ``z = params + updates`` for the selected params."""

  def __init__(self, prox: Callable[[np.ndarray], np.ndarray], selected: tuple[str, ...]):
    self.prox, self.selected = prox, selected

  def init(self, params):
    return None

  def update(self, grads, state, params):
    out = dict(grads)
    for k in self.selected:
      new = self.prox(params[k] + grads[k])
      out[k] = np.where(new == 0, -params[k], new - params[k])
    return out, state


def filter_prox(threshold: float) -> Callable[[np.ndarray], np.ndarray]:
  def prox(z):
    norms = np.sqrt((z.astype(np.float64) ** 2).sum(axis=0, keepdims=True))
    return (z * np.maximum(0.0, 1.0 - threshold / norms)).astype(z.dtype)

  return prox


def l1_prox(threshold: float) -> Callable[[np.ndarray], np.ndarray]:
  return lambda z: (np.sign(z) * np.maximum(np.abs(z) - threshold, 0.0)).astype(z.dtype)


class TopKRef:
  """Per leaf: the ``n - round((1 - density) n)`` largest ``|g + residual|`` are sent."""

  def __init__(self, density: float):
    self.density = density

  def init(self, params):
    return {k: np.zeros_like(v) for k, v in params.items()}

  def update(self, grads, residual, params):
    sent, new_residual = {}, {}
    for k, g in grads.items():
      acc = g + residual[k]
      keep = magnitude_mask(acc, float(np.float32(1.0) - np.float32(self.density)))
      sent[k], new_residual[k] = np.where(keep, acc, 0), np.where(keep, 0, acc)
    return sent, new_residual


class LotterySgdRef:
  """``lottery(sgd(lr), magnitude(50% at step 1), rewind=0)``: a dense SGD step, then the
  largest half of each kernel back to its initial values (biases whole)."""

  def __init__(self, learning_rate: float):
    self.lr = learning_rate

  def init(self, params):
    return {"rewind": dict(params), "count": 0}

  def update(self, grads, state, params):
    if state["count"] == 0:
      out = {k: -self.lr * g for k, g in grads.items()}
    else:
      masks = _magnitude_masks(params)
      rewind = state["rewind"]
      out = {k: np.where(masks[k], rewind[k], 0) - params[k] for k in KERNELS}
      out.update({k: rewind[k] - params[k] for k in params if k not in KERNELS})
    return out, {**state, "count": state["count"] + 1}


class RegrowSgdRef:
  """SET / RigL over SGD from checkerboard masks, a mask update at every step t > 0.

  At an update: per kernel, drop ``round(0.5 * a)`` of the ``a`` active weights with the
  smallest ``|w|`` (ties: the lower index stays), grow as many among the not kept by the
  largest ``|g|`` (RigL) or the documented uniform draw (SET); the step moves the weights
  kept before and after, the others go to (or stay at) zero.
  """

  def __init__(self, learning_rate: float, grow: str):
    self.lr, self.grow = learning_rate, grow

  def init(self, params):
    return {k: checkerboard(params[k].shape) for k in KERNELS}, 0

  def update(self, grads, state, params):
    masks, t = state
    new = dict(masks)
    if t > 0:
      key = jax.random.fold_in(jax.random.key(SEED), t)
      for i, k in enumerate(KERNELS):
        if self.grow == "random":
          scores = numpy_regrowth_scores(jax.random.fold_in(key, i), masks[k].shape)
        else:
          scores = np.abs(grads[k])
        new[k] = regrow(masks[k], params[k], scores, 0.5)
    out = {}
    for k, g in grads.items():
      out[k] = np.where(masks[k] & new[k], -self.lr * g, -params[k]) if k in masks else -self.lr * g
    return out, (new, t + 1)


def keep_top(scores: np.ndarray, keep: int) -> np.ndarray:
  order = np.argsort(-scores.ravel(), kind="stable")
  out = np.zeros(scores.size, bool)
  out[order[:keep]] = True
  return out.reshape(scores.shape)


def regrow(mask, w, scores, fraction):
  active = int(mask.sum())
  d = round(fraction * active)
  survivors = keep_top(np.where(mask, np.abs(w), -np.inf), active - d)
  return survivors | keep_top(np.where(survivors, -np.inf, scores), d)


class SteSgdRef:
  """STE over SGD: dense steps ``-lr (g + decay (1 - m) w)``; m = top half of |w| each step."""

  def __init__(self, learning_rate: float, decay: float):
    self.lr, self.decay = learning_rate, decay

  def init(self, params):
    return _magnitude_masks(params)

  def update(self, grads, masks, params):
    out = {}
    for k, g in grads.items():
      out[k] = (
        -self.lr * (g + self.decay * np.where(masks[k], 0, params[k]))
        if k in masks
        else -self.lr * g
      )
    return out, _magnitude_masks({k: params[k] + out[k] for k in KERNELS})


# --- the cases ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One shipped transform.

  Attributes:
    name: test id.
    make: ``(params, **hyperparams) -> tx``: the transform (``params`` only gives the
      tree structure, e.g. for fixed masks).
    reference: ``(**hyperparams) -> ref`` with NumPy ``init(params)`` and
      ``update(grads, state, params) -> (updates, state)`` over ``{path: array}``.
    hyperparams: the values of the first step.
    changed: the values of the second step under ``inject_hyperparams``.
    wraps: ``make`` accepts ``inner=`` (an optax transform it wraps).
  """

  name: str
  make: Callable[..., optax.GradientTransformation]
  reference: Callable[..., Any]
  hyperparams: dict[str, float]
  changed: dict[str, float]
  transform: Callable  # the shipped factory this case covers
  wraps: bool = False


def fixed_masks(params: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(checkerboard(x.shape)) if x.ndim == 2 else None, params)


def _masked_pruner(params, learning_rate, inner=None):
  inner = optax.sgd(learning_rate) if inner is None else inner
  return jaxprune.masked(inner, jaxprune.magnitude(0.5))


def _masked_fixed(params, learning_rate, inner=None):
  inner = optax.sgd(learning_rate) if inner is None else inner
  return jaxprune.masked(inner, fixed_masks(params))


SEED = 5


def _static(params, learning_rate, inner=None):
  inner = optax.sgd(learning_rate) if inner is None else inner
  return sparse.static_sparse(inner, fixed_masks(params))


def _set(params, learning_rate, inner=None):
  inner = optax.sgd(learning_rate) if inner is None else inner
  return sparse.set_sparse(
    inner, fixed_masks(params), end=10, every=1, drop_fraction=lambda t: 0.5, seed=SEED
  )


def _rigl(params, learning_rate, inner=None):
  inner = optax.sgd(learning_rate) if inner is None else inner
  return sparse.rigl(inner, fixed_masks(params), end=10, every=1, drop_fraction=lambda t: 0.5)


def _magnitude_masks(params):
  return {k: magnitude_mask(params[k], 0.5) for k in KERNELS}


def _checkerboard_masks(params):
  return {k: checkerboard(params[k].shape) for k in KERNELS}


def _lottery(params, learning_rate, inner=None):
  inner = optax.sgd(learning_rate) if inner is None else inner
  return sparse.lottery(inner, jaxprune.magnitude(jaxprune.one_shot(0.5, at=1)), rewind=0)


CASES = [
  Case(
    "masked_pruner",
    _masked_pruner,
    lambda learning_rate: MaskedSgdRef(_magnitude_masks, learning_rate),
    {"learning_rate": 0.1},
    {"learning_rate": 0.05},
    jaxprune.masked,
    wraps=True,
  ),
  Case(
    "masked_fixed_masks",
    _masked_fixed,
    lambda learning_rate: MaskedSgdRef(_checkerboard_masks, learning_rate),
    {"learning_rate": 0.1},
    {"learning_rate": 0.05},
    jaxprune.masked,
    wraps=True,
  ),
  Case(
    "static_sparse",
    _static,
    lambda learning_rate: MaskedSgdRef(_checkerboard_masks, learning_rate),
    {"learning_rate": 0.1},
    {"learning_rate": 0.05},
    sparse.static_sparse,
    wraps=True,
  ),
  Case(
    "set_sparse",
    _set,
    lambda learning_rate: RegrowSgdRef(learning_rate, "random"),
    {"learning_rate": 0.1},
    {"learning_rate": 0.05},
    sparse.set_sparse,
    wraps=True,
  ),
  Case(
    "rigl",
    _rigl,
    lambda learning_rate: RegrowSgdRef(learning_rate, "gradient"),
    {"learning_rate": 0.1},
    {"learning_rate": 0.05},
    sparse.rigl,
    wraps=True,
  ),
  Case(
    "lottery",
    _lottery,
    LotterySgdRef,
    {"learning_rate": 0.1},
    {"learning_rate": 0.05},
    sparse.lottery,
    wraps=True,
  ),
  Case(
    "ste",
    lambda params, learning_rate, decay: sparse.ste(
      optax.sgd(learning_rate), jaxprune.magnitude(0.5), decay=decay
    ),
    SteSgdRef,
    {"learning_rate": 0.1, "decay": 0.3},
    {"learning_rate": 0.05, "decay": 0.6},
    sparse.ste,
  ),
  Case(
    "sr_ste",
    lambda params, learning_rate, decay: sparse.sr_ste(
      optax.sgd(learning_rate), jaxprune.magnitude(0.5), decay=decay
    ),
    SteSgdRef,
    {"learning_rate": 0.1, "decay": 0.3},
    {"learning_rate": 0.05, "decay": 0.6},
    sparse.sr_ste,
  ),
  Case(
    "group_lasso",
    lambda params, strength, learning_rate: jaxprune.group_lasso(
      strength, groups="filter", learning_rate=learning_rate
    ),
    lambda strength, learning_rate: ProxRef(filter_prox(strength * learning_rate), KERNELS),
    {"strength": 0.3, "learning_rate": 1.0},
    {"strength": 0.6, "learning_rate": 0.5},
    jaxprune.group_lasso,
  ),
  Case(
    "l1",
    lambda params, strength: jaxprune.l1(strength),
    lambda strength: ProxRef(l1_prox(strength), ("bn1/scale",)),
    {"strength": 0.2},
    {"strength": 0.4},
    jaxprune.l1,
  ),
  Case(
    "topk_gradients",
    lambda params, density: jaxprune.topk_gradients(density),
    TopKRef,
    {"density": 0.5},
    {"density": 0.75},
    jaxprune.topk_gradients,
  ),
]
IDS = [c.name for c in CASES]
STRUCTURES = ("linen", "nnx_state")


def test_every_shipped_transform_is_in_the_contract():
  """Every public factory returning an optax transform has a case in CASES."""
  shipped = set()
  modules = (jaxprune, transforms, regularizers, sparsify, sparse, sparse_dynamic, sparse_ste)
  for module in (*modules, sparse_lottery):
    for name in dir(module):
      obj = getattr(module, name)
      if name.startswith("_") or not inspect.isfunction(obj):
        continue
      if "GradientTransformation" in str(inspect.signature(obj).return_annotation):
        shipped.add(obj)
  assert shipped, "found no transform factories"
  missing = shipped - {c.transform for c in CASES}
  assert not missing, f"add these transforms to CASES: {sorted(f.__name__ for f in missing)}"


def reference_steps(case: Case, scale: float = 1.0, second: dict | None = None) -> list[dict]:
  """The params after each of two steps, by the NumPy reference."""
  refs = [case.reference(**case.hyperparams), case.reference(**(second or case.hyperparams))]
  params, state = dict(PARAMS), refs[0].init(PARAMS)
  out = []
  for ref, grads in zip(refs, GRADS):
    updates, state = ref.update({k: scale * g for k, g in grads.items()}, state, params)
    params = {k: params[k] + updates[k] for k in params}
    out.append(params)
  return out


def check_params(got: Any, expected: dict[str, np.ndarray]) -> None:
  """Close to the reference, and exactly zero exactly where the reference is zero."""
  got = flat(got)
  assert sorted(got) == sorted(expected)
  for k, want in expected.items():
    np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_array_equal(got[k] == 0, want == 0, err_msg=k)


def run_two_steps(tx, structure, *, jit=False, extra=None, scale=1.0, between=None):
  params = structured(structure, PARAMS)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  out = []
  for i, grads in enumerate(GRADS):
    if i == 1 and between is not None:
      state = between(state)
    g = structured(structure, {k: scale * v for k, v in grads.items()})
    updates, state = update(g, state, params, **(extra or {}))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out, state


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_cases_are_not_trivial(case):
  """The references move every param, zero some (pruners, regularizers) or hold some back."""
  first = reference_steps(case)[0]
  assert all((first[k] != PARAMS[k]).any() for k in first)
  identity = {k: PARAMS[k] + GRADS[0][k] for k in PARAMS}
  zeroes = any((first[k] == 0).any() for k in first)
  held_back = all((first[k] != identity[k]).any() for k in first)
  assert zeroes or held_back


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference(case, jit, structure):
  tx = case.make(structured(structure, PARAMS), **case.hyperparams)
  got, _ = run_two_steps(tx, structure, jit=jit)
  for g, want in zip(got, reference_steps(case)):
    check_params(g, want)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inside_chain(case, structure):
  tx = optax.chain(optax.scale(2.0), case.make(structured(structure, PARAMS), **case.hyperparams))
  got, _ = run_two_steps(tx, structure, jit=True)
  for g, want in zip(got, reference_steps(case, scale=2.0)):
    check_params(g, want)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_under_inject_hyperparams(case, structure):
  factory = functools.partial(case.make, structured(structure, PARAMS))
  tx = optax.inject_hyperparams(factory)(**case.hyperparams)

  def change(state):
    for name, value in case.changed.items():
      state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
    return state

  got, state = run_two_steps(tx, structure, jit=True, between=change)
  for g, want in zip(got, reference_steps(case, second=case.changed)):
    check_params(g, want)
  for name, value in case.changed.items():
    assert float(state.hyperparams[name]) == pytest.approx(value)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_accepts_extra_args(case, jit, structure):
  tx = case.make(structured(structure, PARAMS), **case.hyperparams)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  got, _ = run_two_steps(tx, structure, jit=jit, extra={"value": jnp.float32(VALUE)})
  for g, want in zip(got, reference_steps(case)):
    check_params(g, want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nnx_optimizer_update_with_value(case):
  model = nnx_model()
  tx = case.make(nnx.state(model, nnx.Param), **case.hyperparams)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, grads, value):
    optimizer.update(model, grads, value=value)

  for grads, want in zip(GRADS, reference_steps(case)):
    train_step(model, optimizer, structured("nnx_state", grads), jnp.float32(VALUE))
    check_params(nnx.state(model, nnx.Param), want)


# --- wrappers forward the extra arguments to their inner transform ----------------------------

WRAPPERS = [c for c in CASES if c.wraps]
MAX_LR = 1e3


def polyak_reference(case: Case, scale: float = 1.0) -> dict[str, np.ndarray]:
  """One step of ``masked(polyak_sgd(max_learning_rate=MAX_LR))``: step ``value / ||masked g||^2``."""
  # the sparse trainers start from checkerboard masks and do not update them at step 0
  masks = (_magnitude_masks if case.name == "masked_pruner" else _checkerboard_masks)(PARAMS)
  if case.name == "lottery":  # dense until its first round
    masks = {}
  grads = {k: scale * g for k, g in GRADS[0].items()}
  masked_grads = {k: np.where(masks[k], g, 0) if k in masks else g for k, g in grads.items()}
  sq_norm = sum(float((g.astype(np.float64) ** 2).sum()) for g in masked_grads.values())
  step = min(VALUE / sq_norm, MAX_LR)
  assert step < MAX_LR  # the value matters
  return {
    k: np.where(masks[k], p - step * masked_grads[k], 0) if k in masks else p - step * grads[k]
    for k, p in PARAMS.items()
  }


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("chained", [False, True], ids=["alone", "in_chain"])
@pytest.mark.parametrize("case", WRAPPERS, ids=[c.name for c in WRAPPERS])
def test_wrapper_forwards_value_to_polyak_sgd(case, chained, structure):
  params = structured(structure, PARAMS)
  tx = case.make(params, 0.0, inner=optax.polyak_sgd(max_learning_rate=MAX_LR))
  if chained:
    tx = optax.chain(optax.scale(2.0), tx)
  grads = structured(structure, GRADS[0])
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, value=jnp.float32(VALUE))
  expected = polyak_reference(case, scale=2.0 if chained else 1.0)
  check_params(optax.apply_updates(params, updates), expected)


@pytest.mark.parametrize("case", WRAPPERS, ids=[c.name for c in WRAPPERS])
def test_wrapper_forwards_value_through_nnx_optimizer(case):
  model = nnx_model()
  inner = optax.polyak_sgd(max_learning_rate=MAX_LR)
  optimizer = nnx.Optimizer(
    model, case.make(nnx.state(model, nnx.Param), 0.0, inner=inner), wrt=nnx.Param
  )
  optimizer.update(model, structured("nnx_state", GRADS[0]), value=jnp.float32(VALUE))
  check_params(nnx.state(model, nnx.Param), polyak_reference(case))
