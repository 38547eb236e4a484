"""Test-wide settings.

NOTE: with OpenMP's default active waiting, torch's parallel regions stall badly when the cores are
shared with other processes (a 2-core CI machine running the suite): passive waiting keeps the tests
fast there. It must be set before torch is imported, which is why it lives here.

Property-based tests run a fixed set of examples by default (the ``deterministic`` profile), so a CI
run cannot fail on an example no earlier run saw; ``HYPOTHESIS_PROFILE=explore pytest ...`` draws new
examples, and what it finds becomes an ``@example`` of its test.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from hypothesis import settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    settings.register_profile("deterministic", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


def pytest_collection_modifyitems(config, items):
    """Every test that skips without a GPU is marked ``gpu`` (``pytest -m gpu`` selects what a GPU machine
    must run: benchmarks/gpu_check.sh), however its file spells the skip."""
    import pytest
    for item in items:
        for mark in item.iter_markers("skipif"):
            reason = str(mark.kwargs.get("reason", ""))
            if "cuda" in reason.lower() or "gpu" in reason.lower():
                item.add_marker(pytest.mark.gpu)
                break
