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
