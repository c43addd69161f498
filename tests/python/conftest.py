"""pytest fixtures for fastattn's Python tests.

Every test that takes ``rng`` gets fresh random inputs (a new seed each run). On failure the
seed is printed; ``FASTATTN_TEST_SEED=<seed> pytest ...`` reproduces the run.
"""

import os
import secrets
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def rng(request):
    env = os.environ.get("FASTATTN_TEST_SEED")
    seed = int(env) if env else secrets.randbits(63)
    request.node._fastattn_seed = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_fastattn_seed", None)
    if seed is not None and report.failed:
        report.sections.append(
            ("fastattn random seed", f"reproduce with FASTATTN_TEST_SEED={seed}")
        )
