"""Hypothesis profiles: "ci" (the default: derandomized, a fixed example budget) and "long".

Select one with ``pytest --hypothesis-profile=long`` (see docs/testing.md).
"""

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", max_examples=150, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("long", max_examples=1000, print_blob=True, **_COMMON)
settings.load_profile("ci")
