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
