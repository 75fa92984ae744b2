"""``with compiled() as names:``: the programs JAX compiles inside the block, by name.

Names are as JAX logs them (``jit(cond)``, ``jit(_leaf_scores_eager)``): a test asserts
that a call compiles what it should, once, and nothing per step or per leaf.
"""

import contextlib
import logging
import re

import jax

_COMPILING = re.compile(r"Compiling (\S+)")


@contextlib.contextmanager
def compiled():
  names: list[str] = []

  class Names(logging.Handler):
    def emit(self, record):
      found = _COMPILING.match(record.getMessage())
      if found:
        names.append(found.group(1))

  handler, logger = Names(), logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      yield names
  finally:
    logger.removeHandler(handler)
