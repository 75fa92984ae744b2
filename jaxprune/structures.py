"""Sparsity structures: which weights are removed together.

A structure turns per-weight scores into per-group scores and a per-group mask back
into a per-weight mask. Kernels follow Flax's layout: Dense ``(in, out)``, conv
``(kh, kw, cin, cout)``; the output axis is last and the input axis second to last.

* ``"unstructured"``: every weight on its own (the default).
* :func:`neurons` / :func:`filters`: whole output units (a Dense column, a conv filter),
  scored by the L2 / L1 norm of their scores (Li et al. 2017 use L1 for filters).
* :func:`channels`: whole input channels / input features (a Dense row).
* :func:`blocks`: ``(bi, bo)`` tiles over the ``(in, out)`` axes (all leading kernel
  axes included), scored by their pooled norm.
* :func:`n_m`: N:M, exactly N kept in every M consecutive weights along the input axis.

Group sparsity counts groups: 50% of filters removes half the filters. Groups are
scored by a norm of their weights' scores, so scores should be non-negative like the
built-in ones (``|w|``, ``|w * g|``): a custom score function returning signed values
(negative = unimportant) has its group ranked by ``|score|``, which inverts it.

A pruner sees only the params, so these axes are read from the kernel's shape alone:
axis ``-1`` is taken as the output and ``-2`` as the input whatever the layer. That is
right for ``Dense``, ``Conv`` of any rank (``(k, cin, cout)``, ``(kd, kh, kw, cin,
cout)``) and ``ConvTranspose`` (``(kh, kw, cin, cout)``), but not for:

* ``ConvTranspose(..., transpose_kernel=True)``: its kernel is ``(kh, kw, cout, cin)``,
  so :func:`filters` removes input channels and :func:`channels` output ones.
* Grouped convs (``feature_group_count=g``): the kernel is ``(kh, kw, cin // g, cout)``,
  and channel ``i`` of :func:`channels` is input ``i`` of every group (a depthwise conv
  has one such channel); :func:`filters` is right.
* Kernels with several output or input axes (``nnx.LinearGeneral``'s ``(in, heads,
  head_dim)``, ``nnx.Einsum`` weights): :func:`neurons` groups one ``head_dim`` index
  across all heads, :func:`channels` takes the heads axis as inputs.

Leave such params out with ``where=``; :func:`jaxprune.posttrain.prune` and
:mod:`jaxprune.surgery` find the axes from the traced ``dot_general`` / conv instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.select import element_keys, score_dtype, topk_by_count

Removed = Callable[[int], "int | jax.Array"]  # weights (groups) of a set of n to remove


@runtime_checkable
class Structure(Protocol):
  """What every sparsity structure implements: which weights go together.

  ``group_scores`` pools per-weight scores into one score per group, ``select`` keeps
  the best groups given how many of ``n`` to remove, ``expand`` maps a group mask back
  to the kernel's shape. Pruners use nothing else.
  """

  @property
  def name(self) -> str:
    """How errors and reports call the structure (``"filters"``, ``"n:m"``, ...)."""
    ...

  @property
  def poolable(self) -> bool:
    """Whether one threshold can pool its groups over layers (``scope="global"``)."""
    ...

  def check(self, path: str, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` naming ``path`` when the kernel's shape does not fit."""
    ...

  def check_target(self, final: float | None) -> None:
    """Raises ``ValueError`` when a schedule ending at ``final`` cannot be met."""
    ...

  def group_scores(self, scores: jax.Array) -> jax.Array: ...

  def group_mask(self, mask: jax.Array) -> jax.Array:
    """A group is kept when any of its weights is kept."""
    ...

  def select(self, group_scores: jax.Array, removed: Removed) -> jax.Array:
    """The group mask keeping the best groups; ``removed(n)`` of every ``n`` go."""
    ...

  def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array: ...


class _Ranked:
  """Selection shared by the structures that rank all groups of a kernel together."""

  poolable = True

  def check_target(self, final: float | None) -> None:
    del final

  def select(self, group_scores: jax.Array, removed: Removed) -> jax.Array:
    return topk_by_count([group_scores], [removed(int(group_scores.size))], "layer")[0]


def _norm(x: jax.Array, axes: tuple[int, ...], ord: str) -> jax.Array:
  x = x.astype(score_dtype(x.dtype))
  if ord == "l1":
    return jnp.sum(jnp.abs(x), axis=axes)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))


def _is_int(x: object) -> bool:
  """An integer (Python or numpy), not a bool."""
  return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _check_rank(name: str, path: str, shape: tuple[int, ...]) -> None:
  """Raises unless ``shape`` has an input and an output axis (a bias or a scale has not)."""
  if len(shape) < 2:
    raise ValueError(
      f"The {name} structure needs a kernel with ndim >= 2, but {path!r} has shape "
      f"{shape}. Narrow `where=` to weight matrices and conv kernels."
    )


def _check_ord(ord: str) -> None:
  if ord not in ("l1", "l2"):
    raise ValueError(f"norm must be 'l1' or 'l2', got {ord!r}.")


@dataclasses.dataclass(frozen=True)
class Unstructured(_Ranked):
  """Every weight is its own group."""

  name = "unstructured"

  def check(self, path: str, shape: tuple[int, ...]) -> None:
    del path, shape

  def group_scores(self, scores: jax.Array) -> jax.Array:
    return scores

  def group_mask(self, mask: jax.Array) -> jax.Array:
    return mask

  def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    del shape
    return group_mask


@dataclasses.dataclass(frozen=True)
class Axis(_Ranked):
  """Whole slices along one kernel axis (-1: output units, -2: input channels)."""

  axis: int
  ord: str
  name: str

  def __post_init__(self):
    _check_ord(self.ord)

  def check(self, path: str, shape: tuple[int, ...]) -> None:
    _check_rank(self.name, path, shape)

  def _others(self, ndim: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a != ndim + self.axis)

  def group_scores(self, scores: jax.Array) -> jax.Array:
    return _norm(scores, self._others(scores.ndim), self.ord)

  def group_mask(self, mask: jax.Array) -> jax.Array:
    return jnp.any(mask, axis=self._others(mask.ndim))

  def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    view = [1] * len(shape)
    view[self.axis] = shape[self.axis]
    return jnp.broadcast_to(group_mask.reshape(view), shape)


@dataclasses.dataclass(frozen=True)
class Blocks(_Ranked):
  """``(bi, bo)`` tiles over the (input, output) axes, all leading axes included."""

  shape: tuple[int, int]
  ord: str = "l2"
  name = "blocks"

  def __post_init__(self):
    _check_ord(self.ord)
    if len(self.shape) != 2 or not all(_is_int(d) and d >= 1 for d in self.shape):
      raise ValueError(f"blocks need a (rows, cols) shape of positive ints, got {self.shape}.")
    object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))

  def check(self, path: str, shape: tuple[int, ...]) -> None:
    _check_rank(self.name, path, shape)
    bi, bo = self.shape
    if shape[-2] % bi or shape[-1] % bo:
      raise ValueError(
        f"{bi}x{bo} blocks need a kernel whose last two axes divide by ({bi}, {bo}); "
        f"{path!r} has shape {shape}."
      )

  def _tiles(self, x: jax.Array) -> jax.Array:
    bi, bo = self.shape
    *lead, n_in, n_out = x.shape
    return x.reshape(*lead, n_in // bi, bi, n_out // bo, bo)

  def group_scores(self, scores: jax.Array) -> jax.Array:
    lead = tuple(range(scores.ndim - 2))
    return _norm(self._tiles(scores), (*lead, scores.ndim - 1, scores.ndim + 1), self.ord)

  def group_mask(self, mask: jax.Array) -> jax.Array:
    lead = tuple(range(mask.ndim - 2))
    return jnp.any(self._tiles(mask), axis=(*lead, mask.ndim - 1, mask.ndim + 1))

  def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    bi, bo = self.shape
    tiled = jnp.repeat(jnp.repeat(group_mask, bi, axis=0), bo, axis=1)
    return jnp.broadcast_to(tiled, shape)


@dataclasses.dataclass(frozen=True)
class NM:
  """Exactly ``n`` kept of every ``m`` consecutive weights along the input axis.

  A pruner sees only the params, so the input axis is Flax's: ``-2``. For weights of
  another layout (a PyTorch ``[out, in]`` weight, an einsum weight whose inputs are
  several axes) use :func:`jaxprune.posttrain.prune`, whose groups follow the axes the
  traced ``dot_general`` contracts, in the weight's own order.
  """

  n: int
  m: int
  name = "n:m"
  poolable = False  # every group of m has its own count

  def __post_init__(self):
    if not (_is_int(self.n) and _is_int(self.m) and 0 < self.n <= self.m):
      raise ValueError(f"N:M needs integers 0 < n <= m, got n={self.n!r}, m={self.m!r}.")
    object.__setattr__(self, "n", int(self.n))  # numpy integers are taken as ints
    object.__setattr__(self, "m", int(self.m))

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def check_target(self, final: float | None) -> None:
    if final is None or abs(final - self.sparsity) > 1e-6:
      raise ValueError(
        f"{self.n}:{self.m} sparsity removes {self.sparsity:g} of the weights, but the "
        f"schedule ends at {final}; pass sparsity={self.sparsity:g} "
        "(or a schedule that ends there)."
      )

  def select(self, group_scores: jax.Array, removed: Removed) -> jax.Array:
    return self.keep(group_scores, self.m - jnp.asarray(removed(self.m), jnp.int32))

  def expand(self, group_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    del shape
    return group_mask

  def group_scores(self, scores: jax.Array) -> jax.Array:
    return scores  # selection happens inside each group, in `keep`

  def group_mask(self, mask: jax.Array) -> jax.Array:
    return mask

  def check(self, path: str, shape: tuple[int, ...]) -> None:
    _check_rank(self.name, path, shape)
    if shape[-2] % self.m:
      raise ValueError(
        f"{self.n}:{self.m} sparsity groups {self.m} consecutive inputs; the input axis "
        f"(-2) of {path!r} must divide by {self.m}, but its shape is {shape}."
      )

  def keep(self, scores: jax.Array, n_keep: jax.Array) -> jax.Array:
    """Keeps the ``n_keep`` largest of each group (ties: the lower input index)."""
    *lead, n_in, n_out = scores.shape
    # exact keys (float32 would merge int32 or float64 neighbours; NaN ranks first)
    g = element_keys(scores).reshape(*lead, n_in // self.m, self.m, n_out)
    a, b = g[..., :, None, :], g[..., None, :, :]  # a: this weight, b: the others
    idx = jnp.arange(self.m)
    before = (idx[None, :] < idx[:, None])[:, :, None]  # other index < this index
    rank = jnp.sum((b > a) | ((b == a) & before), axis=-2)
    return (rank < n_keep).reshape(scores.shape)


def as_structure(structure: str | Structure | None) -> Structure:
  """A structure object from a name or an object (``None`` -> unstructured)."""
  if structure is None or structure == "unstructured":
    return Unstructured()
  if isinstance(structure, str):
    named = {"neurons": neurons, "filters": filters, "channels": channels}
    if structure not in named:
      raise ValueError(
        f"Unknown structure {structure!r}; use 'unstructured', 'neurons', 'filters', "
        "'channels', jaxprune.blocks((r, c)) or jaxprune.n_m(n, m)."
      )
    return named[structure]()
  if isinstance(structure, Structure):
    return structure
  raise TypeError(f"Not a sparsity structure: {structure!r}.")


def unit(structure: Structure) -> str:
  """What a sparsity of ``structure`` counts, for messages: ``"weights"``, ``"filters"`` ..."""
  return "weights" if structure.name == "unstructured" else structure.name


def neurons(norm: str = "l2") -> Axis:
  """Output units: the columns of a Dense kernel (all of a conv filter), L2 by default.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> w = jnp.array([[1., 0., 3.], [1., 0., 4.]])
    >>> jaxprune.magnitude(1 / 3, structure=jaxprune.neurons()).masks({"w": w})["w"].tolist()
    [[True, False, True], [True, False, True]]
  """
  return Axis(-1, norm, "neurons")


def filters(norm: str = "l1") -> Axis:
  """Conv filters (output channels), scored by L1 norm as in Li et al. 2017."""
  return Axis(-1, norm, "filters")


def channels(norm: str = "l2") -> Axis:
  """Input channels of a conv kernel / input features (rows) of a Dense kernel."""
  return Axis(-2, norm, "channels")


def blocks(shape: tuple[int, int], norm: str = "l2") -> Blocks:
  """``shape`` tiles over the kernel's (input, output) axes, scored by their pooled norm.

  Examples:
    >>> import jax.numpy as jnp, jaxprune
    >>> w = jnp.arange(16.).reshape(4, 4)
    >>> m = jaxprune.magnitude(0.75, structure=jaxprune.blocks((2, 2))).masks({"w": w})["w"]
    >>> m.astype(int).tolist()
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
  """
  if isinstance(shape, str) or np.ndim(shape) != 1 or len(shape) != 2:  # not len(2): a TypeError
    raise ValueError(f"blocks need a (rows, cols) shape of positive ints, got {shape!r}.")
  return Blocks((shape[0], shape[1]), norm)


def n_m(n: int, m: int) -> NM:
  """N:M sparsity: exactly ``n`` of every ``m`` consecutive inputs kept (2:4 for GPUs).

  Use it with sparsity ``1 - n/m`` (a float, or a schedule ending there: on the way
  every group keeps ``m - round(s * m)``).

  Examples:
    >>> import jax, jaxprune
    >>> w = jax.random.normal(jax.random.key(0), (8, 3))
    >>> m = jaxprune.magnitude(0.5, structure=jaxprune.n_m(2, 4)).masks({"w": w})["w"]
    >>> m.reshape(2, 4, 3).sum(axis=1).tolist()
    [[2, 2, 2], [2, 2, 2]]
  """
  return NM(n, m)
