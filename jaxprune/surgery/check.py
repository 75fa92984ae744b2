"""What surgery checks its results with: masks applied by exact path, inputs at several
sizes, and one output comparison (``shrink`` and ``fold_batchnorm`` both use it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import tree as tree_lib
from jaxprune.surgery import capture
from jaxprune.surgery.source import exception_line

# The batch of the random inputs that check constancy and equality: one batch size, so
# later eager runs reuse the ops compiled by the first.
CHECK_BATCH = 3


def masked_variables(variables: Any, masks: Any) -> Any:
  """``variables`` with every masked-out entry set to zero.

  Masks are matched to arrays by their exact path, after dropping the ``params/``
  collection prefix Linen adds (a mask tree over ``variables["params"]`` names
  ``Dense_0/kernel`` what the variables call ``params/Dense_0/kernel``); never by
  suffix: ``Dense_0/kernel`` and ``Res_0/Dense_0/kernel`` are different layers.

  Raises:
    ValueError: for a mask naming no array (the message lists the arrays), or one
      whose shape is not its array's.
  """
  if masks is None:
    return variables
  by_path = {
    tree_lib.strip_collection(p): m
    for p, m in tree_lib.leaves_with_paths(masks, is_leaf=tree_lib.is_none)
    if m is not None
  }
  names = {}

  def one(path, x):
    p = tree_lib.path_str(path)
    names[tree_lib.strip_collection(p)] = np.shape(x)
    m = by_path.pop(tree_lib.strip_collection(p), None)
    if m is None:
      return x
    if np.shape(m) != np.shape(x):
      raise ValueError(
        f"masks: the mask for {p!r} has shape {np.shape(m)}, the array {np.shape(x)}."
      )
    if tree_lib.is_key(x):
      if np.asarray(m).all():  # a mask tree built over all variables: keys kept
        return x
      raise ValueError(f"masks: the mask for {p!r} zeroes part of a PRNG key array.")
    x = np.asarray(x)  # numpy: eager jnp ops would compile one program per shape
    return jnp.asarray(np.where(np.asarray(m), x, np.zeros((), x.dtype)))

  out = jax.tree_util.tree_map_with_path(one, variables)
  if by_path:
    raise ValueError(
      f"masks: {sorted(by_path)[:5]} name no array of this model (paths are matched "
      f"exactly, after a leading 'params/'); its arrays: {_listing(names)}"
    )
  return out


def _listing(shapes: dict[str, tuple[int, ...]], limit: int = 20) -> str:
  items = [f"{p} {tuple(s)}" for p, s in shapes.items()]
  more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def example_input_error(caller: str, inputs: tuple, e: Exception) -> ValueError:
  """The error for a model that does not run on ``example_input``: the user's shapes."""
  shapes = ", ".join(f"{tuple(jnp.shape(x))} {jnp.dtype(jnp.result_type(x)).name}" for x in inputs)
  line = exception_line(e)
  return ValueError(
    f"{caller}(): the model does not run on example_input of shape {shapes}"
    + (f" (at {line})" if line else "")
    + f": {str(e).splitlines()[0] if str(e) else type(e).__name__} Pass an input the "
    "model accepts, batch axis first."
  )


def _runs(fn: Callable[..., Any], variables: Any, shapes: list, dtypes: list) -> bool:
  """Whether the model traces (shapes only) on inputs of ``shapes``."""
  specs = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes)]
  try:
    jax.eval_shape(fn, variables, *specs)
  except Exception:  # any failure means: not an input size this model takes
    return False
  return True


def check_batch_axis(caller: str, fn: Callable[..., Any], variables: Any, inputs: tuple) -> None:
  """Raises when ``inputs`` have no batch axis first: the model runs on them but not on a
  batch of :data:`CHECK_BATCH` along their first axis (the size surgery checks with).

  The error says the shapes the model does run on (a batch axis added) and the input
  shape its first linear layer reads.
  """
  shapes = [tuple(jnp.shape(x)) for x in inputs]
  dtypes = [jnp.result_type(x) for x in inputs]
  other = [(CHECK_BATCH, *s[1:]) if s else s for s in shapes]
  if other == shapes or _runs(fn, variables, other, dtypes):
    return
  said = (
    f"{caller}(): example_input of shape {', '.join(map(str, shapes))} must have a batch "
    f"axis first: the model does not run with {CHECK_BATCH} along that axis "
    f"(shape {', '.join(map(str, other))}), which surgery needs to check the small model."
  )
  batched = [(1, *s) for s in shapes]
  if _runs(fn, variables, batched, dtypes):
    specs = [jax.ShapeDtypeStruct(s, d) for s, d in zip(batched, dtypes)]
    first = capture.param_consumers(capture.trace(fn, variables, *specs))[:1]
    said += f" The model runs on shape {', '.join(map(str, batched))}"
    for c in first:
      shape = tuple(c.node.eqn.invars[1 - c.operand].aval.shape)
      said += f" (its first layer, {c.path!r}, reads inputs of shape {shape})"
    said += ": add the batch axis, e.g. example_input[None]."
  raise ValueError(said)


def grown_shapes(fn: Callable[..., Any], variables: Any, inputs: tuple) -> tuple | None:
  """Input shapes with every non-batch axis the model lets vary grown by one.

  An axis can vary when the model traces (shapes only) with that axis one longer: the
  spatial axes of a fully convolutional net, the length of a sequence; not the feature
  axis of a Dense input, nor the spatial axes of a net that flattens into a Dense.
  ``None`` when no axis can vary.
  """
  shapes = [tuple(jnp.shape(x)) for x in inputs]
  dtypes = [jnp.result_type(x) for x in inputs]

  def runs(candidate):
    return _runs(fn, variables, candidate, dtypes)

  grown = [list(s) for s in shapes]
  for i, shape in enumerate(shapes):
    for a in range(1, len(shape)):
      trial = [list(s) for s in shapes]
      trial[i][a] += 1
      if runs([tuple(s) for s in trial]):
        grown[i][a] += 1
  grown_t = [tuple(s) for s in grown]
  if grown_t == shapes or not runs(grown_t):
    return None
  return tuple(grown_t)


def random_inputs(inputs: tuple, rng: np.random.Generator, shapes: tuple | None = None) -> list:
  """Normal random inputs of batch :data:`CHECK_BATCH`, at ``shapes`` (default: the inputs')."""
  shapes = shapes or tuple(tuple(jnp.shape(x)) for x in inputs)
  return [
    jnp.asarray(rng.normal(size=(CHECK_BATCH, *s[1:])), jnp.result_type(x))
    for x, s in zip(inputs, shapes)
  ]


class NonFiniteReference(ValueError):
  """The reference of a check outputs NaN or inf: nothing can be compared with it."""


def check_outputs(
  expected: Any,
  outputs: Any,
  rtol: float,
  *,
  check: str,
  model: str,
  reference: str,
  where: str = "",
  nonfinite_hint: str = "",
) -> float:
  """The largest ``|outputs - expected|``; raises when it exceeds ``rtol * max|expected|``.

  The scale is at least 1, output shapes must match, and a NaN difference fails. The
  error reads "``check`` check failed: the ``model``'s outputs differ from the
  ``reference``'s by ..." followed by ``where`` (e.g. the input shape). A reference with
  NaN or inf outputs raises :class:`NonFiniteReference` (ending with ``nonfinite_hint``).

  Examples:
    >>> import numpy as np
    >>> check_outputs(np.ones(3), np.ones(3) + 1e-7, 1e-5, check="Surgery",
    ...               model="shrunk model", reference="masked model")
    1.1920928955078125e-07
  """
  err, scale = 0.0, 1.0
  expected_leaves, output_leaves = jax.tree.leaves(expected), jax.tree.leaves(outputs)
  if not all(np.isfinite(np.asarray(a, np.float32)).all() for a in expected_leaves):
    raise NonFiniteReference(
      f"{check} check failed: the {reference} itself outputs NaN or inf{where}, so the "
      f"{model} cannot be compared with it.{nonfinite_hint}"
    )
  if len(expected_leaves) != len(output_leaves):
    raise ValueError(
      f"{check} check failed: the {model} returns {len(output_leaves)} arrays, the "
      f"{reference} {len(expected_leaves)}{where}."
    )
  for a, b in zip(expected_leaves, output_leaves):
    if np.shape(a) != np.shape(b):
      raise ValueError(
        f"{check} check failed: the {model}'s output has shape {np.shape(b)}, the "
        f"{reference}'s {np.shape(a)}{where}."
      )
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # np.max, not max(): it propagates a NaN, which then fails the test below
    err = float(np.max([err, np.max(np.abs(a32 - b32), initial=0.0)]))
    scale = float(np.max([scale, np.max(np.abs(a32), initial=0.0)]))
  if not err <= rtol * scale:  # NaN fails too
    raise ValueError(
      f"{check} check failed: the {model}'s outputs differ from the {reference}'s "
      f"by {err:.3g} (tolerance {rtol * scale:.3g}){where}. Please report this model."
    )
  return err
