"""Hypothesis profiles: ``dev`` (fast, the default) and ``ci`` (thorough; selected when CI is set).

Choose explicitly with ``HYPOTHESIS_PROFILE=dev|ci``.
"""

import os

# OpenMP's default busy-wait makes 2-thread torch pathological when the cores are shared (AdamW
# seen at 1.2 s instead of 7 ms): yield instead. Set before torch is imported by any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


def pytest_terminal_summary(terminalreporter):
    """Report how many state-machine rule steps ran (the ci profile must reach 10^5)."""
    import sys

    mod = sys.modules.get("tests.sim.test_stateful")
    if mod is not None and mod.STEPS["machines"]:
        terminalreporter.write_line(
            f"stateful: {mod.STEPS['rules']} rule steps over {mod.STEPS['machines']} machines "
            f"(profile {settings.get_current_profile_name()})"
        )
