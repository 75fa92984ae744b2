"""Shared test settings: fast XLA compiles, hypothesis profile sized for a 2-core machine."""

import os

from hypothesis import HealthCheck, settings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Tests run tiny shapes, so XLA's compile time dominates (about 30 ms of CPU for one eager op,
# 60 ms for a small jit, hundreds of compiles per module). Less LLVM optimisation made the
# suite about a third faster; XLA:CPU's older elemental emitters instead of its MLIR fusion
# emitters halve each compile again (the backend compile share of a run fell from 84 s to
# 41 s on test_surgery + test_masks + test_structures). Both are read when the backend
# starts; subprocesses (notebooks, multi-device runs) inherit them.
_FAST_COMPILE = {
  "xla_backend_optimization_level": "0",
  "xla_cpu_use_fusion_emitters": "false",
}
for _name, _value in _FAST_COMPILE.items():
  if _name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_name}={_value}".strip()

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
