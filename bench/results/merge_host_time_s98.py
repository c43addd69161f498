"""Session 98, fourth run: host time of the public merge calls in the build before their outputs and stream moved
into the binding (c6d2cf2, `prev`) and after (`new`), one process per build. Rows (bf16 values, float32 LSEs, 32
heads, head_dim 128): merge_state at S = 8 and 256, merge_states at S = 8 with 4 states, merge_state_in_place and
merge_attention_sinks at S = 8. Variants: the op called directly with its outputs given (`ws`, the same code path in
both builds) and the public call. 400 calls per sample after 50 warm, 15 rounds interleaved (reversed every other
round); medians, and each variant's paired difference from `ws` within a round (median, range). The public calls'
outputs are checked bitwise against `ws`."""
import statistics
import sys
import time

import torch

import fastattn

label = sys.argv[1]
H, D = 32, 128


def timed(fn, n=400):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return dt


def measure(variants, rounds=15):
    for fn in variants.values():
        for _ in range(50):
            fn()
    torch.cuda.synchronize()
    names = list(variants)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            samples[n].append(timed(variants[n]))
    return samples


def report(title, samples):
    parts = []
    for n, xs in samples.items():
        s = f"{n} {statistics.median(xs):.2f}"
        if n != "ws":
            d = [a - b for a, b in zip(xs, samples["ws"])]
            s += f" (- ws {statistics.median(d):.2f}, {min(d):.2f} to {max(d):.2f})"
        parts.append(s)
    print(f"[{label}] {title} | " + " | ".join(parts), flush=True)


def same(a, b):
    torch.cuda.synchronize()
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def state(*shape):
    return (torch.randn(*shape, H, D, device="cuda", dtype=torch.bfloat16),
            torch.randn(*shape, H, device="cuda", dtype=torch.float32) * 3)


print(f"[{label}] fastattn from {fastattn.__file__}", flush=True)
C = fastattn._C
stream = torch.cuda.current_stream().cuda_stream
torch.manual_seed(98)

for S in (8, 256):
    (va, sa), (vb, sb) = state(S), state(S)
    vo, so = torch.empty_like(va), torch.empty_like(sa)
    C.merge_state(va, sa, vb, sb, vo, so, cuda_stream=stream)
    v, s = fastattn.merge_state(va, sa, vb, sb)
    assert same(v, vo) and same(s, so)
    report(f"merge_state S {S}", measure({
        "ws": lambda: C.merge_state(va, sa, vb, sb, vo, so, cuda_stream=stream),
        "public": lambda: fastattn.merge_state(va, sa, vb, sb),
    }))

vn, sn = state(8, 4)
vo, so = torch.empty(8, H, D, device="cuda", dtype=torch.bfloat16), torch.empty(8, H, device="cuda")
C.merge_states(vn, sn, vo, so, cuda_stream=stream)
v, s = fastattn.merge_states(vn, sn)
assert same(v, vo) and same(s, so)
report("merge_states S 8 N 4", measure({
    "ws": lambda: C.merge_states(vn, sn, vo, so, cuda_stream=stream),
    "public": lambda: fastattn.merge_states(vn, sn),
}))

# In place: the same inputs merged again and again (values drift, the work does not).
(va, sa), (vb, sb) = state(8), state(8)
sinks = torch.randn(H, device="cuda")
report("merge_state_in_place S 8", measure({
    "ws": lambda: C.merge_state_in_place(va, sa, vb, sb, cuda_stream=stream),
    "public": lambda: fastattn.merge_state_in_place(va, sa, vb, sb),
}))
report("merge_attention_sinks S 8", measure({
    "ws": lambda: C.merge_attention_sinks(va, sa, sinks, cuda_stream=stream),
    "public": lambda: fastattn.merge_attention_sinks(va, sa, sinks),
}))
print(f"[{label}] done", flush=True)
