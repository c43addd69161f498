"""The CUDA build itself: the package was compiled with the CUDA backend and reports the GPUs it
carries device code for. Build archs: sm_80 family (8.x) and sm_90a (9.0 exactly), see
cmake/cuda.cmake. backend_available (the ops run there) stays False until the attention kernels
exist; device_code_available says whether the backend was compiled for the GPU."""
import pytest

torch = pytest.importorskip("torch")
import fastattn  # noqa: E402


def _built_for(major, minor):
    # 80-real SASS runs on every 8.x GPU; 90a-real only on 9.0; no PTX is embedded.
    return major == 8 or (major, minor) == (9, 0)


def test_cpu_backend_available():
    assert fastattn.backend_available("cpu")


def test_backend_available_reports_each_gpu():
    n = torch.cuda.device_count()
    assert n >= 1
    for i in range(n):
        major, minor = torch.cuda.get_device_capability(i)
        expected = _built_for(major, minor)
        assert fastattn.device_code_available("cuda:%d" % i) is expected, (
            "cuda:%d is %s (sm_%d%d): expected device_code_available == %s; was the package built "
            "with FASTATTN_CUDA=ON?" % (i, torch.cuda.get_device_name(i), major, minor, expected))
    # "cuda" means cuda:0
    assert fastattn.device_code_available("cuda") is fastattn.device_code_available("cuda:0")


def test_backend_available_false_for_missing_device():
    missing = "cuda:%d" % torch.cuda.device_count()
    assert fastattn.backend_available(missing) is False
    assert fastattn.device_code_available(missing) is False


def test_backend_available_does_not_disturb_current_device_or_errors():
    before = torch.cuda.current_device()
    fastattn.device_code_available("cuda:%d" % (torch.cuda.device_count() + 3))
    fastattn.device_code_available("cuda:0")
    assert torch.cuda.current_device() == before
    # A failed query must not leave a CUDA error behind for the next framework call.
    x = torch.ones(1024, device="cuda")
    torch.cuda.synchronize()
    assert float(x.sum()) == 1024.0
