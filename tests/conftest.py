"""Shared test settings: small shapes, hypothesis profile sized for a 2-core machine."""

import os

from hypothesis import HealthCheck, settings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

settings.register_profile(
  "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")
