"""A small representative set of CUDA merge calls for compute-sanitizer (scripts/gpu_sanitize.sh):
merge_state on the 16-byte vector path (head_dim 128; 40, where some lanes of a row have no chunk;
fp32 256, two chunks per lane), on the scalar fallback (head_dim 100 and 520, rows misaligned by one
element), strided / transposed views, an output aliasing an input, empty states with NaN behind
them; merge_state_in_place with bool, uint8 and strided masks; merge_states with N = 1, 2, 7, 33
(strided, some states empty), an odd head_dim, and zero-size shapes (head_dim 0: LSE only). Inputs
live in their own allocations sized exactly (tests/gpu/test_merge_gpu.py strided()), so memcheck sees
a read or write past any tensor. Unless --no-check, every result is compared with the float64
reference as tests/gpu/test_merge_gpu.py does.

Not collected by pytest (no test_ prefix). Usage:
    python tests/gpu/sanitize_merge.py [--no-check] [--only SUBSTRING] [--seed N]
Exit status 0 when every case ran (and matched the reference).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fastattn  # noqa: E402
import test_merge_gpu as T  # noqa: E402  (its helpers; importing it runs no test)
from sanitize_runner import run_cases  # noqa: E402

F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32


def states(shape, dtype, order=None, pad=0, offset=0, behind_empty="zero"):
    """Random states (some empty) copied into exactly sized strided views."""
    v0, s0 = T.rand_states(shape, dtype, behind_empty=behind_empty)
    v = T.fill_(T.strided(shape, dtype, order=order, pad=pad, offset=offset), v0)
    s_order = None if order is None else [i for i in order if i < len(shape) - 1]
    s = T.fill_(T.strided(shape[:-1], torch.float32, order=s_order), s0)
    return v, s


def merge_state(rng, check, dtype, S, H, D, order=None, pad=0, offset=0, alias=False, behind_empty="zero"):
    va, sa = states((S, H, D), dtype, order, pad, offset, behind_empty)
    vb, sb = states((S, H, D), dtype, None, 0, offset, behind_empty)
    ref = T.merge2_ref(va, sa, vb, sb) if check else None
    vmax = T.finite_max(va, vb)
    if alias:
        T.c_merge_state(va, sa, vb, sb, va, sa)
        v, s = va, sa
    else:
        v_out = T.strided((S, H, D), dtype, order=order, pad=pad, offset=offset)
        s_out = T.strided((S, H), torch.float32)
        v, s = T.c_merge_state(va, sa, vb, sb, v_out, s_out)
    torch.cuda.synchronize()
    if check:
        T.check_merged("merge_state", v, s, *ref, dtype, vmax, 2)


def in_place(rng, check, dtype, S, H, D, mask_kind):
    v, s = states((S, H, D), dtype, order=(1, 0, 2), pad=1)
    vo, so = states((S, H, D), dtype)
    keep = torch.rand(S, device=T.DEV) < 0.6
    if mask_kind == "bool":
        mask = keep.clone()
    elif mask_kind == "uint8":
        mask = keep.to(torch.uint8) * 7
    else:  # strided bool
        mask = torch.zeros(2 * S, device=T.DEV, dtype=torch.bool)[::2]
        mask.copy_(keep)
    before = v.clone(), s.clone()
    ref = T.merge2_ref(v, s, vo, so) if check else None
    vmax = T.finite_max(v, vo)
    fastattn.merge_state_in_place(v, s, vo, so, mask=mask)
    torch.cuda.synchronize()
    if check:
        assert torch.equal(T.bits(v[~keep]), T.bits(before[0][~keep]))
        assert torch.equal(T.bits(s[~keep]), T.bits(before[1][~keep]))
        T.check_merged("merge_state_in_place", v[keep], s[keep], ref[0][keep], ref[1][keep], dtype, vmax, 2)


def merge_states(rng, check, dtype, S, N, H, D, offset=0):
    v0, s0 = T.rand_states((N, S, H, D), dtype, behind_empty="nan")
    v = T.fill_(T.strided((S, N, H, D), dtype, order=(1, 0, 2, 3), offset=offset), v0.permute(1, 0, 2, 3))
    s = T.fill_(T.strided((S, N, H), torch.float32, order=(1, 2, 0)), s0.permute(1, 0, 2))
    v_out = T.strided((S, H, D), dtype, offset=offset)
    s_out = T.strided((S, H), torch.float32)
    T.c_merge_states(v, s, v_out, s_out)
    torch.cuda.synchronize()
    if check:
        T.check_merged("merge_states", v_out, s_out, *T.merge_ref(v, s), dtype, T.finite_max(v), N)


def zero_sizes(rng, check):
    for shape in ((0, 4, 64), (5, 0, 64), (5, 3, 0)):
        merge_state(rng, check, F16, *shape)
        merge_states(rng, check, F16, shape[0], 3, shape[1], shape[2])


def cases():
    """(name, function, arguments after (rng, check))."""
    yield "merge_state fp16 h32 d128 S799", merge_state, (F16, 799, 32, 128)
    yield "merge_state bf16 h8 d40 S113 (lanes without a chunk)", merge_state, (B16, 113, 8, 40)
    yield "merge_state fp32 h5 d256 S113 (two chunks per lane)", merge_state, (F32, 113, 5, 256)
    yield "merge_state fp16 d100 misaligned (scalar)", merge_state, (F16, 113, 3, 100, None, 0, 1)
    yield "merge_state bf16 d520 misaligned (scalar, 65 chunks)", merge_state, (B16, 17, 2, 520, None, 0, 3)
    yield "merge_state fp16 strided (H, S, D) padded", merge_state, (F16, 799, 6, 128, (1, 0, 2), 2)
    yield "merge_state bf16 NaN behind empty states", merge_state, (B16, 113, 4, 64, None, 0, 0, False, "nan")
    yield "merge_state fp32 output aliases v_a", merge_state, (F32, 113, 4, 64, None, 0, 0, True)
    yield "merge_state_in_place bool mask", in_place, (F16, 799, 8, 128, "bool")
    yield "merge_state_in_place uint8 mask", in_place, (B16, 113, 3, 40, "uint8")
    yield "merge_state_in_place strided mask fp32", in_place, (F32, 113, 4, 128, "strided")
    yield "merge_states N=1 fp16", merge_states, (F16, 113, 1, 8, 128)
    yield "merge_states N=2 bf16", merge_states, (B16, 799, 2, 4, 128)
    yield "merge_states N=7 fp32 d256", merge_states, (F32, 113, 7, 3, 256)
    yield "merge_states N=33 fp16 d64", merge_states, (F16, 17, 33, 32, 64)
    yield "merge_states N=7 bf16 d36 misaligned (scalar)", merge_states, (B16, 113, 7, 3, 36, 1)
    yield "zero-size shapes (head_dim 0: LSE only)", zero_sizes, ()


if __name__ == "__main__":
    sys.exit(run_cases("sanitize_merge", __doc__, cases()))
