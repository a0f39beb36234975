"""Hypothesis profiles: ``dev`` (fast, the default) and ``ci`` (thorough; selected when CI is set).

Choose explicitly with ``HYPOTHESIS_PROFILE=dev|ci``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
