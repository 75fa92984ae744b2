"""Shared test settings: fast XLA compiles, hypothesis profile sized for a 2-core machine."""

import os

from hypothesis import HealthCheck, settings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Tests run tiny shapes, so XLA's compile time dominates: less LLVM optimisation makes the
# suite about a third faster (read when the backend starts; subprocesses inherit it).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] = flags.strip()

settings.register_profile(
  "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")

# The longest tests first (each of these modules holds a test of 20-60 s on 2 cores). With
# `-n 2 --dist worksteal` each worker takes half of the collection in order and steals from
# the tail of the other's queue, so a long test collected late can be all that runs at the
# end. Tests stay grouped by module, in their own order: module fixtures are set up once.
SLOW_FIRST = (
  "test_posttrain_sharded.py",  # one 8-device subprocess of ~90 s under load
  "test_structured_recipes.py",
  "test_accelerator_benchmark.py",
  "test_packaging.py",
  "test_checkpoint.py",
  "test_sharding.py",
  "test_notebooks.py",
  "test_sparse_recipes.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # a stable sort
