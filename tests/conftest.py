"""Hypothesis profiles (see docs/testing.md).

- ``ci`` (the default): derandomized (a fixed seed, so every run tests the same examples) with a
  fixed example budget; the property suite (tests/test_properties.py) stays well under 3 minutes.
- ``long``: 1000 random examples per property, for a search before a release:
  ``python -m pytest tests/test_properties.py --hypothesis-profile=long``.
"""

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=1000, **_COMMON)


def pytest_configure(config) -> None:
    # A profile named with --hypothesis-profile wins; otherwise "ci".
    settings.load_profile(config.getoption("--hypothesis-profile", None) or "ci")
