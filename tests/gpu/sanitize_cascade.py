"""A small representative set of CUDA shared-prefix (cascade) calls for compute-sanitizer
(scripts/gpu_sanitize.sh): decode with the stacked prefix pass (split over the prefix), with no
prefix (the suffix pass writes out directly) and with the per-request prefix pass (sliding window,
ALiBi); prefill with causal (the device-side choice between the stacked and the per-request pass,
both ways), non-causal with rows past qo_indptr[B] and fixed splits, every option at head_dim 64,
a call with no request; page sizes 1, 16 and 256; decode with a fixed suffix split count on
ragged suffixes; and the decode wrapper with a too small workspace_buffer (whose begin_forward
splits its ragged suffixes). Each call runs twice into NaN-poisoned buffers and, unless
--no-check, is compared with the float64 reference (as tests/gpu/test_cascade_gpu.py does).

Not collected by pytest (no test_ prefix). Usage:
    python tests/gpu/sanitize_cascade.py [--no-check] [--only SUBSTRING] [--seed N]
Exit status 0 when every case ran (and matched the reference).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import test_cascade_gpu as T  # noqa: E402  (its helpers; importing it runs no test)
from sanitize_runner import run_cases  # noqa: E402

F16, B16 = torch.float16, torch.bfloat16


def call(rng, check, dtype, cfg, extra=None):
    case = T.build_case(rng, dtype, **cfg)
    extra = extra or {}
    out, lse = T.run_twice(lambda o: T.cascade_call(case, o, **extra), case.make_out)
    if check:
        T.check("out", out, lse, T.reference(case))


def wrapper(rng, check, dtype):
    case = T.build_case(rng, dtype, P=700, suffix=[0, 1, 17, 113], page=16)
    w = T.decode_wrapper(case, workspace_bytes=64)
    out, lse = w.forward_return_lse(case.q, case.k_shared, case.v_shared, case.kv_data)
    torch.cuda.synchronize()
    if check:
        T.check("wrapper", out, lse, T.reference(case))


def cases():
    """(name, function, arguments after (rng, check))."""
    yield "decode stacked fp16 P799 page16 gqa4", call, (F16, dict(P=799, suffix=[0, 1, 17, 113, 300], page=16))
    yield "decode no prefix bf16 page1", call, (B16, dict(P=0, suffix=[0, 5, 40], page=1))
    yield "decode per-request wleft+alibi_bh page256", call, (B16, dict(
        P=1000, suffix=[0, 300, 17], page=256, opt="wleft+alibi_bh"))
    yield "prefill causal stacked P300 page16", call, (F16, dict(
        P=300, suffix=[1, 40, 3, 100], qo=[1, 17, 0, 64], page=16, opt="causal"))
    yield "prefill causal queries inside prefix", call, (B16, dict(
        P=300, suffix=[3, 0, 20], qo=[17, 5, 30], page=16, opt="causal"))
    yield "prefill noncausal pad rows splits3", call, (F16, dict(
        P=900, suffix=[30, 2], qo=[4, 2], page=16, pad_rows=5), dict(num_splits=3))
    yield "prefill everything d64 page1", call, (B16, dict(
        P=2000, suffix=[5, 1, 130], qo=[5, 0, 40], page=1, D=64, Hq=8, Hkv=2, opt=T.ALL))
    yield "decode suffix splits 7 ragged page16", call, (B16, dict(
        P=500, suffix=[0, 3000, 40, 1], page=16), dict(suffix_num_splits=7))
    yield "no request", call, (F16, dict(P=100, suffix=[], qo=[], page=16, pad_rows=3))
    yield "decode wrapper tiny workspace", wrapper, (F16,)


if __name__ == "__main__":
    sys.exit(run_cases("sanitize_cascade", __doc__, cases()))
