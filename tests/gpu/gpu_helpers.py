"""Helpers shared by the GPU tests: random tensors on the GPU, outputs poisoned with NaN, int32
index tensors and prefix sums, the current stream for the binding, and CUDA-graph capture."""

import os

import pytest
import torch

DEV = "cuda"
# Scenarios per run of each random-scenario test (FASTATTN_RANDOM_SCENARIOS raises it for a soak).
RANDOM_SCENARIOS = int(os.environ.get("FASTATTN_RANDOM_SCENARIOS", "24"))


def randn(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=dtype)


def strided_sinks(heads, scale=2.0):
    """(heads,) float32 attention sinks of about `scale` times a unit normal, as a stride-2 view
    (the ops take any stride)."""
    return (torch.randn(heads, 2, device=DEV) * scale)[:, 0]


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


def make_options(rng, name, batch, heads, *, window_left=64, window_right=16, wright=16, alibi=(0.55, 0.05)):
    """Keyword options of an attention call from a '+'-joined name, values drawn from rng (a
    random.Random) and torch's generator: none, scale, causal, window (both sides bounded), wleft
    (left only), wright (right only), wzero ((0, 0): each query sees at most the key at its own
    position), softcap, alibi ((heads,) slopes), alibi_bh ((batch, heads) slopes).

    window_left / window_right / wright: the largest window sides drawn; alibi: (scale, offset),
    slopes uniform in [offset, offset + scale)."""
    kw = {}
    for part in name.split("+"):
        if part == "none":
            pass
        elif part == "scale":
            kw["softmax_scale"] = rng.uniform(0.05, 0.5)
        elif part == "causal":
            kw["causal"] = True
        elif part == "window":
            kw["window_size"] = (rng.randint(0, window_left), rng.randint(0, window_right))
        elif part == "wleft":
            kw["window_size"] = (rng.randint(0, window_left), -1)
        elif part == "wright":
            kw["window_size"] = (-1, rng.randint(0, wright))
        elif part == "wzero":
            kw["window_size"] = (0, 0)
        elif part == "softcap":
            kw["softcap"] = rng.uniform(0.5, 5.0)
        elif part == "alibi":
            kw["alibi_slopes"] = torch.rand(heads, device=DEV) * alibi[0] + alibi[1]
        elif part == "alibi_bh":
            kw["alibi_slopes"] = torch.rand(batch, heads, device=DEV) * alibi[0] + alibi[1]
        else:
            raise ValueError(part)
    return kw


def stream_ptr():
    """The current torch stream, as the bindings' cuda_stream argument."""
    return int(torch.cuda.current_stream().cuda_stream)


def _warm_on_side_stream(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def warm_and_capture(fn):
    """Warm up on a side stream, then capture fn() into a CUDA graph (as torch's docs advise)."""
    _warm_on_side_stream(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def dlpack_capture_problem():
    """None when a torch CUDA tensor's plain __dlpack__() (what nanobind calls, without a stream
    argument) can be made inside a CUDA graph capture, else the error it causes."""
    x = torch.zeros(8, device="cuda")
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            x.add_(1)
            x.__dlpack__()
    except Exception as e:  # noqa: BLE001 (torch raises RuntimeError; report whatever it is)
        torch.cuda.synchronize()
        return first_line(e)
    return None


def capture_or_xfail(fn):
    """warm_and_capture(fn), except that when the capture fails and so does a bare torch
    __dlpack__() export inside a capture, the cause is the import of the arguments, not the
    kernels: xfail with that diagnosis."""
    _warm_on_side_stream(fn)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001
        xfail_if_dlpack_cannot_be_captured(e, "the call")
        raise
    return graph


def xfail_if_dlpack_cannot_be_captured(e, what):
    """After the capture of `what` failed with `e`: when a bare torch __dlpack__() export fails
    inside a capture too, the cause is the import of the arguments, not the kernels: xfail with
    that diagnosis. Otherwise return (the caller decides)."""
    torch.cuda.synchronize()
    problem = dlpack_capture_problem()
    if problem is not None:
        pytest.xfail(
            "CUDA graph capture of %s failed (%s) and so does a bare "
            "torch.Tensor.__dlpack__() inside a capture (%s): torch syncs with the legacy default "
            "stream when __dlpack__ gets no stream argument, as nanobind calls it; the binding "
            "must import CUDA tensors with __dlpack__(stream=-1) to be capturable (nanobind#1241, "
            "pytorch#163242)" % (what, first_line(e), problem))


def first_line(e):
    """An exception's type and first message line (for skip / failure reasons)."""
    return "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def run_random_scenarios(rng, count, draw, run):
    """`count` scenarios, each drawn by draw(rng) -> (dtype, knobs) and checked by run(dtype, knobs).
    A failure is re-raised naming the scenario's number, dtype and knobs (long lists cut to 8
    items); the caller's seed (FASTATTN_TEST_SEED) replays the whole draw."""
    for i in range(count):
        dtype, cfg = draw(rng)
        try:
            run(dtype, cfg)
        except Exception as e:
            shown = {k: (v if not isinstance(v, list) or len(v) <= 8 else f"{v[:8]}... ({len(v)})")
                     for k, v in cfg.items()}
            raise AssertionError(f"random scenario {i} ({dtype}, {shown}): {e}") from e
        torch.cuda.empty_cache()
