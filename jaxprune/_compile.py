"""Eager helper programs on small inputs, compiled for compile time rather than run time.

On XLA:CPU a program's compile time is LLVM's (about 15-90 ms a kernel; a mask selection
is dozens of kernels), while on a small model the program then runs for a millisecond.
Users meet this compile on the first ``pruner.masks(params)`` or ``init`` of every
process, so the library's own eagerly called selection and random-mask programs compile,
on CPU, for inputs of at most :data:`SMALL` elements, with LLVM's optimisation off and
XLA:CPU's elemental emitters (:data:`FAST_OPTIONS`): a LeNet-300-100 selection compiles in
0.15-0.27 s instead of 0.44-0.53 s and then runs 5-10x longer (about 35 ms instead of
3.5 ms at :data:`SMALL` elements). Larger inputs, other backends and every call inside a
trace (the user's ``jit``, where the program is part of a training step) get the ordinary
compile.

Only programs whose results are exact take it (keys, integer histograms, comparisons,
random bits), so they do not depend on how they were compiled (tested bit for bit against
XLA's default options). Float reductions do: an L2 filter norm came out one ulp apart
between the two compiles, so the pruners' scores keep the ordinary compile, and a mask
computed eagerly ranks the same scores as one computed inside a training step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import core as jax_core

SMALL = 1 << 20
"""Largest total element count of a call's arrays that is compiled for compile time."""

FAST_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _on_cpu(x: Any) -> bool:
  if isinstance(x, jax.Array):
    return all(d.platform == "cpu" for d in x.devices())
  return jax.default_backend() == "cpu"


def small_cpu_call(leaves: list[Any], extra_elements: int = 0) -> bool:
  """Whether a call with these argument leaves takes the compile-time-first program:
  no tracer among them, every array on the CPU, at most :data:`SMALL` elements in all."""
  arrays = [x for x in leaves if isinstance(x, (jax.Array, np.ndarray, np.generic))]
  if any(isinstance(x, jax_core.Tracer) for x in arrays):
    return False
  if not all(_on_cpu(x) for x in arrays) or (not arrays and jax.default_backend() != "cpu"):
    return False
  return sum(math.prod(np.shape(x)) for x in arrays) + extra_elements <= SMALL


def eager_jit(
  fn: Callable[..., Any], *, extra_elements: Callable[..., int] | None = None, **jit_kwargs: Any
) -> Callable[..., Any]:
  """``jax.jit(fn, **jit_kwargs)``, compiled with :data:`FAST_OPTIONS` for small CPU calls.

  Args:
    fn: the function to jit.
    extra_elements: ``(*args, **kwargs) -> int``, elements the call makes that are not in
      its arrays (e.g. random scores drawn from static shapes).
    **jit_kwargs: passed to both ``jax.jit`` calls (``static_argnums``, ...).

  Returns:
    A callable with the signature of ``fn``; ``.plain`` is the ordinary jit and ``.fast``
    the compile-time-first one.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxprune._compile import eager_jit
    >>> double = eager_jit(lambda x: 2 * x)
    >>> double(jnp.arange(3)).tolist()
    [0, 2, 4]
  """
  plain = jax.jit(fn, **jit_kwargs)
  fast = jax.jit(fn, compiler_options=FAST_OPTIONS, **jit_kwargs)

  @functools.wraps(fn)
  def call(*args: Any, **kwargs: Any) -> Any:
    extra = 0 if extra_elements is None else extra_elements(*args, **kwargs)
    if small_cpu_call(jax.tree.leaves((args, kwargs)), extra):
      return fast(*args, **kwargs)
    return plain(*args, **kwargs)

  call.plain, call.fast = plain, fast  # type: ignore[attr-defined]
  return call
