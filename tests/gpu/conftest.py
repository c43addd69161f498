"""tests/gpu: tests that need a CUDA GPU and PyTorch with CUDA.

Everything here is skipped (not failed, not errored) when torch is missing or sees no GPU, so
`pytest tests/python tests/gpu` runs unchanged on the CPU-only CI. Test modules import torch with
``pytest.importorskip("torch")`` so that collection works without it.
Run on the GPU machine through scripts/gpu_check.sh.
"""
import os

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def _why_no_gpu():
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        return "torch is not importable (%s)" % (e.__class__.__name__,)
    if not torch.cuda.is_available():
        return "torch %s sees no CUDA device" % torch.__version__
    return None


WHY_NO_GPU = _why_no_gpu()


def pytest_configure(config):
    # On the GPU machine (scripts/gpu_check.sh sets this) a missing GPU is an error, not a skip.
    if os.environ.get("FASTATTN_REQUIRE_GPU") == "1" and WHY_NO_GPU is not None:
        raise pytest.UsageError("FASTATTN_REQUIRE_GPU=1 but " + WHY_NO_GPU)


def pytest_report_header(config):
    if WHY_NO_GPU is not None:
        return "tests/gpu: skipped, %s" % WHY_NO_GPU
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return "tests/gpu: torch %s (CUDA %s) on %s" % (torch.__version__, torch.version.cuda, ", ".join(names))


def pytest_collection_modifyitems(config, items):
    if WHY_NO_GPU is None:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: " + WHY_NO_GPU)
    for item in items:
        if str(item.path).startswith(_HERE + os.sep):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cuda_device():
    """The torch device the GPU tests run on (cuda:0)."""
    import torch

    return torch.device("cuda", 0)


# ---- random seeds (tests/gpu/test_prefill.py and later GPU test modules) -------------------------
# Shared helpers (gpu_reference.py) are imported by plain module name, whatever pytest's import mode.
import sys  # noqa: E402

if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def seed(request):
    """A fresh seed per test (FASTATTN_TEST_SEED=<seed> replays one), applied to torch's CPU and
    CUDA generators. Returns a `random.Random` seeded with it, for drawing option values.
    The seed is printed in the report of a failing test."""
    import random
    import secrets

    import torch

    env = os.environ.get("FASTATTN_TEST_SEED")
    value = int(env) if env else secrets.randbits(63)
    request.node._fastattn_gpu_seed = value
    torch.manual_seed(value)
    return random.Random(value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    value = getattr(item, "_fastattn_gpu_seed", None)
    if value is not None and report.failed:
        report.sections.append(
            ("fastattn random seed", "reproduce with FASTATTN_TEST_SEED=%d" % value))
