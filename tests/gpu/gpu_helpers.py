"""Helpers shared by the GPU tests: random tensors on the GPU, outputs poisoned with NaN, int32
index tensors and prefix sums, the current stream for the binding, and CUDA-graph capture."""

import torch

DEV = "cuda"


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype)


def nan_full(shape, dtype):
    """An output buffer poisoned with NaN (a value the call must overwrite)."""
    return torch.full(tuple(shape), float("nan"), device=DEV, dtype=dtype)


def i32(values):
    return torch.tensor([int(x) for x in values], dtype=torch.int32, device=DEV)


def cumsum0(lens):
    """[0, lens[0], lens[0] + lens[1], ...]: offsets (cu_seqlens, indptr) from lengths."""
    out = [0]
    for n in lens:
        out.append(out[-1] + int(n))
    return out


def stream_ptr():
    """The current torch stream, as the bindings' cuda_stream argument."""
    return int(torch.cuda.current_stream().cuda_stream)


def warm_and_capture(fn):
    """Warm up on a side stream, then capture fn() into a CUDA graph (as torch's docs advise)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def first_line(e):
    """An exception's type and first message line (for skip / failure reasons)."""
    return "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
