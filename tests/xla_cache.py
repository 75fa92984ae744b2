"""A module-scoped fixture: XLA compiles each byte-identical program once per test module.

Tests build the same programs again and again under new Python closures: a fresh
``jax.jit(tx.update)`` per test, Linen and nnx.State trees that flatten to the same
arrays. jit's in-memory cache is keyed on the function object, so each of these
recompiles. JAX's persistent compilation cache is keyed
on the lowered module itself (debug info stripped), so with it pointed at a temporary
directory every test still traces and lowers its own program and runs the executable XLA
built for it; only the compile of a module identical to one compiled earlier is skipped.

Use: ``from xla_cache import reuse_identical_compiles  # noqa: F401`` in a test module
(the fixture is autouse). The settings are restored when the module's tests end. It pays
only where programs repeat: writing each executable to the cache costs time, and on the
surgery modules (distinct shapes, few repeats) it was neutral or slower.
"""

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

_SETTINGS = {
  "jax_persistent_cache_min_compile_time_secs": 0.0,
  "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="module", autouse=True)
def reuse_identical_compiles(tmp_path_factory):
  names = ("jax_compilation_cache_dir", *_SETTINGS)
  old = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  for name, value in _SETTINGS.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # the cache is set up on the next compile, with these
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
