"""GPU decode suite of ``python -m fastattn.bench`` (the KV-cache decode issue's acceptance table).

Shapes: bf16, head_dim 128, 32 query heads over 8 KV heads (GQA) and over 32 (MHA), batch 1, 8,
32, 128, cache length L = 1024, 8192, 32768 (every sequence holds the full L), one query row
(a decode step), no new k/v appended. Every shape is run as

- ``paged16``     fastattn.flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens,
                  block_table=table): pages (num_pages, 16, Hkv, D), each sequence's pages stored
                  in a random permutation of the cache, block table (B, L / 16) int32;
- ``contiguous``  the same call on a (B, L, Hkv, D) cache without a block table;

with q (B, 1, 32, D), cache_seqlens = L as an int32 tensor and num_splits = 0 (fastattn's
heuristic); and against PyTorch's SDPA restricted to its flash backend and to its cuDNN backend on
a dense contiguous (B, Hkv, L, D) copy of the same cache (q copied to (B, 32, 1, D)). GQA goes
through ``enable_gqa=True``; a backend that refuses it gets K/V expanded to 32 heads
(repeat_interleave, outside the timed region) and is then charged the 4x bytes it really reads
(the row says so).

Bytes (decode_bytes): K and V read once plus q read and out written once,
    B * L * Hkv * D * 2 (K and V) * elem + B * Hq * D * 2 (q and out) * elem,
with elem = 2 bytes; the block table (4 bytes per 16 tokens) is not counted. A rate is these bytes
over the median time (TB/s = 1e12 B/s). The ceiling is the copy bandwidth measured in the same
run: ``dst.copy_(src)`` on a 2 GiB buffer, (read + write bytes) / median time, measured before and
after the shapes (the higher of the two is the ceiling; ~4.3 TB/s on an H200).

Memory: a shape whose K+V cache for one implementation exceeds 24 GiB (MHA, B=128, L=32768:
64 GiB) is recorded as skipped, and so is an expanded SDPA K/V above that size; each shape's
tensors are freed before the next one is built.

Timing (.library/device/METHOD.md, as gpu_prefill): CUDA events around every call; after a probe
call, a correctness call, two warm-up calls and two sizing calls per implementation, and 0.2 s of
copies that bring the GPU back up after the inputs' set-up (rewarm_gpu), the
implementations of one shape are timed in interleaved rounds (3 rounds of up to 30 calls each),
the figure is the median over all calls and the spread of the per-round medians is the noise
estimate. Decode calls take 10 us - 5 ms, often less than their host-side launch cost, so each
round is queued behind a GPU sleep kernel (torch.cuda._sleep) long enough for the host to enqueue
all of the round's calls: the events then time the GPU work back to back, not the host
(``host_s`` records the host time per call; ``host_bound_rounds`` counts rounds where the queue
ran dry anyway). Every shape rotates at least three input sets (fewer only where GPU memory is
short; ``input_sets`` in the record), so that no call follows a call on its own cache and finds its
address translations warm, which no engine's decode step does (each layer's cache is read once per
step): one set read alone was 0.9-1.2% faster than three in rotation for fastattn at the batch 8
rows of 8k-32k, and level for cuDNN (session 61). Small caches (under twice the L2 size) rotate
among more, so that no call finds its K/V in L2. Every implementation reads its own copy of q,
cache_seqlens and the block table (SDPA its own (B, Hq, 1, D) q), so that none finds them in L2
because another read them before it in the round (until session 61 the variants shared them, and
the second of a round ran ~0.1 us faster at batch 1 / 1k; bench/NOTES.md). A deadline
(``--time-limit``, 150 s; 20 s with --quick) shrinks the calls per implementation when the run
is behind.

Correctness: one extra call per fastattn variant into an output poisoned with NaN; max |error|
against SDPA flash's output on the same data (or a float32 torch reference when flash is n/a).
fastattn raising NotImplementedError (no CUDA kernel yet) is recorded as n/a; another failure or a
non-finite output is recorded too and makes the benchmark exit with status 1 (bad_records).

FlashInfer (``--flashinfer``, gpu_decode_flashinfer.py): its paged decode paths timed as further
peers on the paged16 variant's own page pool, in the same rounds, checked against the same
reference; a peer whose output is off by more than 5% of the reference's largest |value| is
recorded as wrong and not timed. For information: the acceptance checks below do not use them.

Acceptance (summarize / summary_lines): (1) fastattn paged16 >= 90% of the copy bandwidth on every
row with B * L >= 262144 tokens; (2) fastattn paged16 and contiguous faster than SDPA cuDNN on
every row; (3) paged16 time <= 1.05 x contiguous time on every row.
"""
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List

import fastattn

from .gpu_prefill import (Deadline, _aligned, _cycle, _event_time, _f, _l2_bytes, _paged, _ratio, _s, _short_error,
                          _torch_dtype, apply_overrides, calls_per_round, error_vs_flash_line, finish_figure,
                          keep_gpu_busy, timing_noise_line, timing_stats, warm_gpu)
from .gpu_prefill import bad_records  # noqa: F401  (the same check for decode records; runner uses it)
from . import gpu_decode_flashinfer

GiB = 1 << 30
HEAD_DIMS = (128,)
DTYPES = ("bf16",)
HEADS_Q = 32
HEADS_KV = (8, 32)
BATCHES = (1, 8, 32, 128)
CACHE_LENS = (1024, 8192, 32768)
PAGE_SIZE = 16
VARIANTS = ("paged16", "contiguous")
PEERS = ("sdpa-flash", "sdpa-cudnn")
QUICK = dict(batches=(1, 32), cache_lens=(1024, 8192), heads_kv=(8,))
MAX_CACHE_BYTES = 24 * GiB        # per implementation (K + V); larger shapes are skipped
COPY_BYTES = 2 * GiB              # source buffer of the copy-bandwidth ceiling (dst as large)
ACCEPT_BW_FRACTION = 0.90         # (1) paged16 >= 90% of the copy bandwidth ...
ACCEPT_BW_MIN_TOKENS = 262144     # ... on rows with batch * L >= 262144
ACCEPT_VS_CUDNN = 1.0             # (2) cuDNN time / fastattn time > 1 on every row
ACCEPT_PAGED_TIME_RATIO = 1.05    # (3) paged16 time <= 1.05 x contiguous time on every row
FLASHINFER_PEERS = gpu_decode_flashinfer.PEERS
PEER_WRONG_FRACTION = 0.05        # a peer off by more than this x max |reference| is not timed
PAGED = "fastattn-paged16"
CONTIG = "fastattn-contiguous"


def impl_key(variant):
    return "fastattn-" + variant


@dataclass
class Settings:
    """What to run and how long to spend. Full mode: 24 shapes (one skipped) x (2 fastattn
    variants + 2 peers), about a minute on an H200 (the cuDNN graph builds and the input set-up
    dominate; timing is 3 rounds x 30 calls per implementation); --quick: 4 GQA shapes."""
    dtypes: tuple = DTYPES
    head_dims: tuple = HEAD_DIMS
    heads_q: int = HEADS_Q
    heads_kv: tuple = HEADS_KV
    batches: tuple = BATCHES
    cache_lens: tuple = CACHE_LENS
    max_cache_bytes: int = MAX_CACHE_BYTES
    copy_bytes: int = COPY_BYTES
    rounds: int = 3             # interleaved timing rounds per shape
    budget_s: float = 0.5       # timed wall time per implementation and shape (upper bound)
    min_budget_s: float = 0.005  # lower bound when the deadline squeezes
    min_calls: int = 9          # timed calls per implementation, at least (over all rounds)
    max_calls: int = 90         # ... and at most (30 per round)
    warmup: int = 2
    queue_ahead: bool = True    # queue each round behind a GPU sleep (see the module notes)
    time_limit_s: float = 150.0
    seed: int = 0
    flashinfer: bool = False    # also time FlashInfer's paged decode (gpu_decode_flashinfer.py)

    @classmethod
    def for_mode(cls, quick, **overrides):
        s = cls()
        if quick:
            s = cls(batches=QUICK["batches"], cache_lens=QUICK["cache_lens"],
                    heads_kv=QUICK["heads_kv"], rounds=2, budget_s=0.1, min_budget_s=0.005,
                    min_calls=6, max_calls=40, time_limit_s=20.0)
        return apply_overrides(s, overrides)


def decode_bytes(batch, cache_len, heads_kv, heads_q, head_dim, elem_bytes=2):
    """Device-memory bytes one decode step must move: K and V of every cached token read once
    (batch * cache_len * heads_kv * head_dim * 2 * elem_bytes) plus q read and out written once
    (batch * heads_q * head_dim * 2 * elem_bytes, < 0.4% of the total at L >= 1024). For an SDPA
    peer that needs K/V expanded to every query head, pass heads_kv = heads_q: it reads that many.
    The block table of a paged cache (4 bytes per page) is not counted."""
    return float(elem_bytes * (2 * batch * cache_len * heads_kv * head_dim
                               + 2 * batch * heads_q * head_dim))


def kv_cache_bytes(batch, cache_len, heads_kv, head_dim, elem_bytes=2):
    """Bytes of one implementation's K + V cache (what the 24 GiB skip rule looks at)."""
    return float(2 * elem_bytes * batch * cache_len * heads_kv * head_dim)


@dataclass
class Shape:
    dtype: str
    head_dim: int
    heads_q: int
    heads_kv: int
    batch: int
    cache_len: int

    @property
    def name(self):
        return "%s d%d %d/%d b%d L%d" % (self.dtype, self.head_dim, self.heads_q, self.heads_kv,
                                         self.batch, self.cache_len)

    @property
    def tokens(self):
        return self.batch * self.cache_len

    @property
    def elem_bytes(self):
        return 2  # fp16 / bf16

    @property
    def bytes(self):
        return decode_bytes(self.batch, self.cache_len, self.heads_kv, self.heads_q,
                            self.head_dim, self.elem_bytes)

    def peer_bytes(self, expanded):
        return decode_bytes(self.batch, self.cache_len, self.heads_q if expanded else self.heads_kv,
                            self.heads_q, self.head_dim, self.elem_bytes)

    @property
    def kv_bytes(self):
        return kv_cache_bytes(self.batch, self.cache_len, self.heads_kv, self.head_dim, self.elem_bytes)

    @property
    def expanded_kv_bytes(self):
        return kv_cache_bytes(self.batch, self.cache_len, self.heads_q, self.head_dim, self.elem_bytes)

    def skip_reason(self, settings):
        if self.kv_bytes > settings.max_cache_bytes:
            return "K+V cache %.4g GiB per implementation > %.4g GiB limit" % (
                self.kv_bytes / GiB, settings.max_cache_bytes / GiB)
        return None


def plan(settings: Settings) -> List[Shape]:
    """Every shape of the suite, skipped ones included (they are recorded as skipped)."""
    shapes = []
    for dtype in settings.dtypes:
        for d in settings.head_dims:
            for hkv in settings.heads_kv:
                for b in settings.batches:
                    for L in settings.cache_lens:
                        shapes.append(Shape(dtype, d, settings.heads_q, hkv, b, L))
    return shapes


# ---- inputs and calls ---------------------------------------------------------------------------


def _backend(name):
    from torch.nn.attention import SDPBackend
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]


class InputSet:
    """One set of inputs for a shape: q, a contiguous (B, L, Hkv, D) cache, its paged copy (same
    values, pages in a random permutation) and the peers' dense (B, Hkv, L, D) copy. Every
    implementation reads its own copy of the small inputs (own_small_inputs)."""

    def __init__(self, torch, shape: Shape, page_size, gen_perm):
        dev = torch.device("cuda")
        dt = _torch_dtype(torch, shape.dtype)
        b, L, hq, hkv, d = shape.batch, shape.cache_len, shape.heads_q, shape.heads_kv, shape.head_dim
        self.q = torch.randn(b, 1, hq, d, device=dev, dtype=dt)
        self.k = torch.randn(b, L, hkv, d, device=dev, dtype=dt)
        self.v = torch.randn(b, L, hkv, d, device=dev, dtype=dt)
        self.seqlens = torch.full((b,), L, device=dev, dtype=torch.int32)
        self.kp, self.vp, self.table = _paged(torch, self.k, self.v, page_size, gen_perm)
        # SDPA's layout (B, H, S, D): its own contiguous copies, made once here.
        self.tq = self.q.transpose(1, 2).contiguous()
        self.tk = self.k.transpose(1, 2).contiguous()
        self.tv = self.v.transpose(1, 2).contiguous()
        self._expanded = None
        self._small = {}

    def own_small_inputs(self, impl):
        """(q, tq, seqlens, table) for implementation `impl`: the set's values in storage that no
        other implementation reads. A round times one implementation's calls after another's, and
        these tensors are small enough to stay in L2 from one block of calls to the next (the K/V
        are not: the sets rotate them out): shared, the second reader of a round found them in L2
        and the first in DRAM, ~0.1 us of a 10 us call at batch 1 (bench/NOTES.md, session 61)."""
        if impl not in self._small:
            self._small[impl] = (self.q.clone(), self.tq.clone(), self.seqlens.clone(), self.table.clone())
        return self._small[impl]

    def expanded(self, torch):
        """K/V repeated to every query head (B, Hq, L, D), for a backend that refuses GQA."""
        if self._expanded is None:
            g = self.q.shape[2] // self.tk.shape[1]
            self._expanded = (self.tk.repeat_interleave(g, dim=1),
                              self.tv.repeat_interleave(g, dim=1))
        return self._expanded

    def fastattn_call(self, variant, out=None):
        kw = {} if out is None else {"out": out}
        q, _, seqlens, table = self.own_small_inputs(impl_key(variant))
        if variant == "contiguous":
            return lambda: fastattn.flash_attn_with_kvcache(
                q, self.k, self.v, cache_seqlens=seqlens, num_splits=0, **kw)
        return lambda: fastattn.flash_attn_with_kvcache(
            q, self.kp, self.vp, cache_seqlens=seqlens, block_table=table, num_splits=0, **kw)

    def sdpa_call(self, torch, peer, mode):
        """mode: "plain" (MHA), "enable_gqa" (GQA, native) or "expanded" (K/V repeated)."""
        from torch.nn.attention import sdpa_kernel
        backend = _backend(peer)
        F = torch.nn.functional
        q = self.own_small_inputs(peer)[1]
        k, v = self.expanded(torch) if mode == "expanded" else (self.tk, self.tv)
        kw = {"enable_gqa": True} if mode == "enable_gqa" else {}

        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, **kw)
        return run


def reference_f32(torch, q, k_bhld, v_bhld, chunk_bytes=1 << 30):
    """float32 attention of q (B, 1, Hq, D) over k/v (B, Hkv, L, D), query head h reading KV head
    h // (Hq / Hkv), no mask; returns (B, 1, Hq, D) float32. Computed in batch chunks of about
    chunk_bytes of float32 K/V so that the largest caches fit."""
    b, _, hq, d = q.shape
    hkv, L = k_bhld.shape[1], k_bhld.shape[2]
    g = hq // hkv
    per_seq = 2 * hkv * L * d * 4
    step = max(1, int(chunk_bytes // max(1, per_seq)))
    out = torch.empty((b, 1, hq, d), dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(d)
    for i in range(0, b, step):
        j = min(b, i + step)
        qq = q[i:j, 0].float().reshape(j - i, hkv, g, d)
        kk, vv = k_bhld[i:j].float(), v_bhld[i:j].float()
        p = torch.softmax(torch.matmul(qq, kk.transpose(-1, -2)) * scale, dim=-1)
        out[i:j, 0] = torch.matmul(p, vv).reshape(j - i, hq, d)
    return out


def _call_with_warnings(torch, fn):
    """fn() then synchronize; an exception carries the backend's warnings (why SDPA refused)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            y = fn()
            torch.cuda.synchronize()
            return y
        except Exception as e:
            why = [str(w.message).splitlines()[0] for w in caught if str(w.message)]
            msg = _short_error(e)
            if why:
                msg += " [" + "; ".join(x[:120] for x in why[:2]) + "]"
            raise RuntimeError(msg) from e


# ---- timing ---------------------------------------------------------------------------------------


def make_sleeper(torch):
    """A function sleep(seconds) that enqueues a GPU spin of about that long (torch.cuda._sleep,
    calibrated here in cycles per second), or None when torch has no _sleep."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return None
    try:
        sleep(1000)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 5_000_000
        a.record()
        sleep(cycles)
        b.record()
        torch.cuda.synchronize()
        rate = cycles / max(a.elapsed_time(b) / 1e3, 1e-6)
    except Exception:
        return None

    def run(seconds):
        sleep(int(max(0.0, min(seconds, 0.2)) * rate))
    run.cycles_per_s = rate
    return run


def time_interleaved(torch, fns: Dict[str, Callable], settings: Settings, budget_s, sleeper=None):
    """gpu_prefill.time_interleaved with the queue filled ahead: every callable of `fns` timed in
    settings.rounds interleaved rounds of per-call CUDA event pairs, each round enqueued behind a
    GPU sleep of 1.5 x (its calls x host time per call) when a sleeper is given. Returns
    {name: stats}; each callable gets about budget_s of timed calls within [min_calls, max_calls]."""
    per_call, host = {}, {}
    for name, fn in fns.items():
        for _ in range(settings.warmup):
            fn()
        torch.cuda.synchronize()
        # The host time of one timed call: the call and its two event records (the records alone
        # cost several microseconds; leaving them out let the queue run dry behind short calls).
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(3)]
        t0 = time.perf_counter()
        for a, b in ev:
            a.record()
            fn()
            b.record()
        host[name] = (time.perf_counter() - t0) / 3
        torch.cuda.synchronize()
        per_call[name] = max(_event_time(torch, fn, 2, sleeper, 3 * host[name] + 50e-6), 1e-7)
    counts = calls_per_round(per_call, settings, budget_s)
    samples = {name: [] for name in fns}
    round_medians = {name: [] for name in fns}
    host_bound = {name: 0 for name in fns}
    for _ in range(max(1, settings.rounds)):
        for name, fn in fns.items():
            n = counts[name]
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            ahead = 1.5 * n * host[name] + 50e-6
            if sleeper is not None:
                sleeper(ahead)
            t0 = time.perf_counter()
            for a, b in ev:
                a.record()
                fn()
                b.record()
            enqueue = time.perf_counter() - t0
            torch.cuda.synchronize()
            if sleeper is None or enqueue > ahead:
                host_bound[name] += 1
            ts = [a.elapsed_time(b) / 1e3 for a, b in ev]
            samples[name] += ts
            round_medians[name].append(statistics.median(ts))
    out = timing_stats(samples, round_medians, per_call)
    for name, st in out.items():
        st.update(host_s=host[name], host_bound_rounds=host_bound[name])
    return out


def rewarm_gpu(torch, seconds=0.2, nbytes=256 << 20):
    """Streams a buffer for about `seconds` (device-to-device copies) right before a shape is timed.
    Building a shape's inputs leaves the GPU idle for up to seconds, and the memory-bound calls
    timed next then ran ~14% slower, all implementations alike, until the GPU came back up tens of
    ms later: whole rounds of MHA batch 128 / 1k at 544-548 us against 476-482 (session 61)."""
    src = torch.empty(nbytes // 2, device=torch.device("cuda"), dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    keep_gpu_busy(torch, lambda: dst.copy_(src), seconds, max_steps=20000, sync_every=20)


def measure_copy(torch, settings: Settings, sleeper=None):
    """The copy-bandwidth ceiling: dst.copy_(src) of settings.copy_bytes (less when memory is
    short: at most an eighth of the free memory per buffer), TB/s = 2 x buffer bytes / median."""
    free = torch.cuda.mem_get_info()[0]
    nbytes = int(min(settings.copy_bytes, free // 8)) // 4096 * 4096
    n = nbytes // 2
    src = torch.randn(n, device=torch.device("cuda"), dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    st = time_interleaved(torch, {"copy": lambda: dst.copy_(src)}, settings, 1e9, sleeper)["copy"]
    del src, dst
    torch.cuda.empty_cache()
    st["buffer_bytes"] = nbytes
    st["bytes"] = 2.0 * nbytes
    st["tbps"] = st["bytes"] / st["s"] / 1e12
    return st


# ---- one shape ------------------------------------------------------------------------------------


def _max_err(out_bshd, ref_bshd):
    return float((out_bshd.float() - ref_bshd.float()).abs().max())


MIN_INPUT_SETS = 3  # every shape's calls rotate among at least this many caches (module notes)


def _n_sets(kv_bytes, l2_bytes, fit=None):
    """Input sets to rotate among: at least MIN_INPUT_SETS, so that no call follows a call on its
    own cache, and more for small caches, so that one set's K/V has left L2 before it is read
    again; at most `fit` (the sets GPU memory holds), and at least 1."""
    n = MIN_INPUT_SETS
    if kv_bytes < 2 * l2_bytes:
        n = max(n, min(32, int(math.ceil(2 * l2_bytes / kv_bytes)) + 1))
    return max(1, n if fit is None else min(n, fit))


def base_record(shape: Shape):
    return {"name": shape.name, "dtype": shape.dtype, "head_dim": shape.head_dim,
            "heads_q": shape.heads_q, "heads_kv": shape.heads_kv,
            "gqa": shape.heads_q != shape.heads_kv, "batch": shape.batch,
            "cache_len": shape.cache_len, "tokens": shape.tokens, "bytes": shape.bytes,
            "kv_cache_bytes": shape.kv_bytes, "impls": {}, "ratios": {}}


def measure_shape(torch, shape: Shape, settings: Settings, budget_s, gen_perm, l2_bytes,
                  sleeper=None, flashinfer=None, max_sets=None):
    """Builds the inputs of one shape (at most max_sets input sets), checks and times both
    fastattn variants and both peers (and FlashInfer's, given a gpu_decode_flashinfer.Peers).
    Returns its record (see run_suite) and the seconds spent in timed rounds."""
    rec = base_record(shape)
    n_sets = _n_sets(shape.kv_bytes, l2_bytes, max_sets)
    rec["input_sets"] = n_sets
    sets = [InputSet(torch, shape, PAGE_SIZE, gen_perm) for _ in range(n_sets)]
    s0 = sets[0]

    fns = {}
    # Probe: one call each (also the cuDNN graph build and the first launch of each kernel).
    for var in VARIANTS:
        key = impl_key(var)
        try:
            s0.fastattn_call(var)()
            torch.cuda.synchronize()
            fns[key] = _cycle([st.fastattn_call(var) for st in sets])
        except NotImplementedError as e:
            rec["impls"][key] = {"s": None, "error": _short_error(e), "not_implemented": True}
        except Exception as e:
            rec["impls"][key] = {"s": None, "error": _short_error(e), "failed": True}
    ref, ref_from = None, None
    modes = ("plain",) if shape.heads_q == shape.heads_kv else ("enable_gqa", "expanded")
    for peer in PEERS:
        refused = []
        for mode in modes:
            if mode == "expanded" and shape.expanded_kv_bytes > settings.max_cache_bytes:
                refused.append("expanded: skipped, K/V at %d heads would be %.4g GiB > %.4g GiB"
                               % (shape.heads_q, shape.expanded_kv_bytes / GiB,
                                  settings.max_cache_bytes / GiB))
                break
            try:
                y = _call_with_warnings(torch, s0.sdpa_call(torch, peer, mode))
            except Exception as e:
                refused.append("%s: %s" % (mode, str(e)[:300]))
                continue
            fns[peer] = _cycle([st.sdpa_call(torch, peer, mode) for st in sets])
            info = {"gqa_mode": mode, "bytes": shape.peer_bytes(mode == "expanded")}
            if refused:
                info["refused"] = refused
            y = y.transpose(1, 2)  # (B, 1, Hq, D)
            if peer == "sdpa-flash":
                ref, ref_from = y, "sdpa-flash"
            elif ref is not None:
                info["max_abs_err"] = _max_err(y, ref)
            rec["impls"][peer] = info
            del y
            break
        if peer not in fns:
            rec["impls"][peer] = {"s": None, "error": "; ".join(refused)}
    if ref is None and (flashinfer is not None or any(k.startswith("fastattn") for k in fns)):
        ref, ref_from = reference_f32(torch, s0.q, s0.tk, s0.tv), "float32 torch"
    if flashinfer is not None:
        _add_flashinfer(torch, rec, fns, flashinfer, sets, shape, ref, ref_from)

    # Correctness: fastattn into NaN-poisoned outputs, against SDPA flash on the same data.
    for var in VARIANTS:
        key = impl_key(var)
        if key not in fns:
            continue
        out = torch.full_like(s0.q, float("nan"))
        try:
            s0.fastattn_call(var, out=out)()
            torch.cuda.synchronize()
            info = {"finite": bool(torch.isfinite(out).all())}
            if ref is not None:
                info["max_abs_err"] = _max_err(out, ref)
                info["err_vs"] = ref_from
            rec["impls"][key] = info
        except Exception as e:
            rec["impls"][key] = {"check_error": _short_error(e)}
        del out
    del ref

    stats, timed = {}, 0.0
    if fns:
        rewarm_gpu(torch)
        t0 = time.perf_counter()
        stats = time_interleaved(torch, fns, settings, budget_s, sleeper)
        timed = time.perf_counter() - t0
    for key, st in stats.items():
        info = rec["impls"].setdefault(key, {})
        info.update(st)
        info.setdefault("bytes", shape.bytes)
        info["tbps"] = info["bytes"] / st["s"] / 1e12
    del sets, s0, fns
    _ratios(rec)
    return rec, timed


def _add_flashinfer(torch, rec, fns, peers, sets, shape, ref, ref_from):
    """FlashInfer's peers of one shape: each set's calls built (plans made here, untimed), the
    first set's output checked into a NaN-poisoned buffer against ref (B, 1, Hq, D), and the
    callables added to fns unless the peer failed or was wrong."""
    # FlashInfer's paths share one copy of the small inputs among themselves, not with fastattn's.
    per_set = []
    for st in sets:
        q, _, seqlens, table = st.own_small_inputs("flashinfer")
        per_set.append(peers.calls(q, st.kp, st.vp, table, seqlens, shape.cache_len))
    ref3 = ref.reshape(shape.batch, shape.heads_q, shape.head_dim).float()
    scale = float(ref3.abs().max())
    for name in FLASHINFER_PEERS:
        make, err = per_set[0][name]
        info = {"bytes": shape.bytes, "layout": "the paged16 pool (NHD pages of %d)" % PAGE_SIZE}
        rec["impls"][name] = info
        if make is None:
            info.update(s=None, error=err)
            continue
        out = torch.full((shape.batch, shape.heads_q, shape.head_dim), float("nan"),
                         dtype=sets[0].q.dtype, device=sets[0].q.device)
        try:
            make(out)()
            torch.cuda.synchronize()
        except Exception as e:
            info.update(s=None, error=_short_error(e))
            continue
        e = float((out.float() - ref3).abs().max()) if bool(torch.isfinite(out).all()) else math.inf
        info.update(max_abs_err=e, err_vs=ref_from)
        if not e <= PEER_WRONG_FRACTION * scale:
            info.update(s=None, error="wrong output: max |err| %.3g against max |reference| %.3g; "
                                      "not timed" % (e, scale))
            continue
        makes = [ps[name][0] for ps in per_set]
        if any(m is None for m in makes):
            info.update(s=None, error=next(ps[name][1] for ps in per_set if ps[name][0] is None))
            continue
        # Timed into outputs made here, so no call allocates (as an engine's preallocated out).
        fns[name] = _cycle([m(torch.empty_like(out)) for m in makes])


def _ratios(rec):
    """paged16/cudnn, contiguous/flash, ...: the peer's time / that fastattn variant's time (> 1:
    fastattn faster); paged16_time/contiguous_time: paged time / contiguous time (<= 1.05 accepted);
    paged16/flashinfer-*: FlashInfer's time on the same pool / paged16's, where it ran."""
    r = rec["ratios"]
    for key in (PAGED, CONTIG):
        var = key[len("fastattn-"):]
        r[var + "/cudnn"] = _ratio(_s(rec, key), _s(rec, "sdpa-cudnn"))
        r[var + "/flash"] = _ratio(_s(rec, key), _s(rec, "sdpa-flash"))
    for peer in FLASHINFER_PEERS:
        if peer in rec["impls"]:
            r["paged16/" + peer] = _ratio(_s(rec, PAGED), _s(rec, peer))
    p, c = _s(rec, PAGED), _s(rec, CONTIG)
    r["paged16_time/contiguous_time"] = (p / c) if (p and c) else None


def add_copy_fractions(records, copy_tbps):
    """Each timed implementation's rate as a fraction of the copy bandwidth."""
    for r in records:
        for info in r["impls"].values():
            if info.get("tbps") is not None and copy_tbps:
                info["copy_fraction"] = info["tbps"] / copy_tbps


# ---- the suite ------------------------------------------------------------------------------------


def skipped_record(shape: Shape, reason):
    rec = base_record(shape)
    rec["skipped"] = reason
    _ratios(rec)
    return rec


def run_suite(torch, settings: Settings, log=print):
    """Runs every shape of the plan. Returns (records, meta): one record per shape with
    impls[fastattn-paged16 | fastattn-contiguous | sdpa-flash | sdpa-cudnn] = {s, tbps, bytes,
    copy_fraction, runs, host_s, ..., max_abs_err, gqa_mode (peers), error} and ratios; meta has
    the copy bandwidth (meta["copy"]["tbps"], the acceptance ceiling)."""
    shapes = plan(settings)
    n_active = sum(1 for s in shapes if not s.skip_reason(settings))
    fi_peers, fi_meta = None, None
    if settings.flashinfer:
        try:
            fi_peers = gpu_decode_flashinfer.Peers(torch, gpu_decode_flashinfer.load(), PAGE_SIZE)
            fi_meta = {"version": fi_peers.version, "peers": list(FLASHINFER_PEERS)}
        except ImportError as e:
            fi_meta = {"error": str(e)}
        log("  FlashInfer peers: %s" % (fi_meta.get("error") or "flashinfer %s" % fi_meta["version"]),
            flush=True)
    deadline = Deadline(settings, max(1, n_active),
                        len(VARIANTS) + len(PEERS) + (len(FLASHINFER_PEERS) if fi_peers else 0),
                        first_overhead_s=1.0 if settings.budget_s > 0.2 else 0.3)
    gen = torch.Generator().manual_seed(settings.seed)
    gen_perm = lambda n: torch.randperm(n, generator=gen)
    l2 = _l2_bytes(torch)
    warm_gpu(torch)
    sleeper = make_sleeper(torch) if settings.queue_ahead else None
    copy_start = measure_copy(torch, settings, sleeper)
    log("  copy bandwidth (dst.copy_(src), %.1f GiB): %.2f TB/s" % (
        copy_start["buffer_bytes"] / GiB, copy_start["tbps"]), flush=True)
    records = []
    for i, shape in enumerate(shapes):
        reason = shape.skip_reason(settings)
        max_sets = None
        if reason is None:
            free = torch.cuda.mem_get_info()[0]
            per_set = 3 * shape.kv_bytes  # contiguous, paged and SDPA's copy
            max_sets = int((free - GiB) // per_set)  # a GiB kept for everything else
            if max_sets < 1:
                reason = "needs ~%.0f GiB of GPU memory, %.0f GiB free" % ((per_set + GiB) / GiB, free / GiB)
        if reason:
            rec = skipped_record(shape, reason)
            records.append(rec)
            log("  [%2d/%d] %-28s skipped: %s" % (i + 1, len(shapes), shape.name, reason), flush=True)
            continue
        torch.manual_seed(settings.seed * 1000003 + i)
        budget = deadline.impl_budget()
        t0 = time.perf_counter()
        try:
            rec, timed = measure_shape(torch, shape, settings, budget, gen_perm, l2, sleeper,
                                       fi_peers, max_sets)
        except Exception as e:  # e.g. out of memory: keep the row, keep going
            rec = base_record(shape)
            rec["error"] = _short_error(e)
            _ratios(rec)
            timed = 0.0
        rec["budget_s"] = budget
        rec["wall_s"] = time.perf_counter() - t0
        deadline.timed_s += timed
        deadline.done += 1
        records.append(rec)
        torch.cuda.empty_cache()
        log("  [%2d/%d] %-28s %s  (%.1f s)" % (i + 1, len(shapes), shape.name, _brief(rec),
                                               rec["wall_s"]), flush=True)
    copy_end = measure_copy(torch, settings, sleeper)
    copy_tbps = max(copy_start["tbps"], copy_end["tbps"])
    add_copy_fractions(records, copy_tbps)
    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:
        cudnn = None
    meta = {"elapsed_s": time.perf_counter() - deadline.start, "l2_bytes": l2, "cudnn": cudnn,
            "copy": {"tbps": copy_tbps, "start": copy_start, "end": copy_end,
                     "method": "dst.copy_(src) of a bf16 buffer; bytes = 2 x buffer (read + "
                               "write); ceiling = the higher of the measurements before and "
                               "after the shapes"},
            "queue_ahead": sleeper is not None,
            "flashinfer": fi_meta,
            "sleep_cycles_per_s": getattr(sleeper, "cycles_per_s", None),
            "settings": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in settings.__dict__.items()},
            "bytes_convention": "K+V read once + q read + out written, 2-byte elements; SDPA with "
                                "expanded K/V is charged heads_q heads; block table not counted",
            "peer_layout": "SDPA on its own contiguous (B, Hkv, L, D) copy of the cache and a "
                           "(B, Hq, 1, D) copy of q; enable_gqa for GQA, else K/V expanded "
                           "outside the timed region"}
    return records, meta


def _brief(rec):
    def t(key):
        v = rec["impls"].get(key, {}).get("tbps")
        return "n/a" if v is None else "%.2f" % v
    return "paged %s contig %s flash %s cudnn %s TB/s" % (
        t(PAGED), t(CONTIG), t("sdpa-flash"), t("sdpa-cudnn"))


# ---- report ---------------------------------------------------------------------------------------


def _us(s):
    return "%.1f" % (s * 1e6) if s < 1e-3 else "%.0f" % (s * 1e6)


def _time_cell(rec, key):
    info = rec["impls"].get(key)
    if rec.get("skipped"):
        return "skip"
    if info is None:
        return "error" if rec.get("error") else "-"
    if info.get("s") is not None:
        return _us(info["s"])
    return "n/a" if (info.get("error") or info.get("check_error")) else "-"


def _rate_cell(rec, key):
    info = rec["impls"].get(key, {})
    v = info.get("tbps")
    if v is None:
        return "-"
    return "%.2f%s" % (v, "*" if info.get("gqa_mode") == "expanded" else "")


def format_table(records, copy_tbps=None):
    """One line per shape: time (us) and TB/s of fastattn paged16 and contiguous and of the
    peers, paged16's fraction of the copy bandwidth, the time ratios and the max error."""
    head = ["shape", "paged us", "TB/s", "%copy", "contig us", "TB/s", "flash us", "TB/s",
            "cuDNN us", "TB/s", "pg/cuDNN", "ct/cuDNN", "pg/flash", "ct/flash", "pg/ct time",
            "max err"]
    lines = []
    for r in records:
        im, ra = r["impls"], r["ratios"]
        errs = [im[k].get("max_abs_err") for k in (PAGED, CONTIG)
                if im.get(k, {}).get("max_abs_err") is not None]
        nonfinite = any(im.get(k, {}).get("finite") is False for k in (PAGED, CONTIG))
        frac = im.get(PAGED, {}).get("copy_fraction")
        cells = [r["name"],
                 _time_cell(r, PAGED), _rate_cell(r, PAGED),
                 "-" if frac is None else "%.0f%%" % (100 * frac),
                 _time_cell(r, CONTIG), _rate_cell(r, CONTIG),
                 _time_cell(r, "sdpa-flash"), _rate_cell(r, "sdpa-flash"),
                 _time_cell(r, "sdpa-cudnn"), _rate_cell(r, "sdpa-cudnn"),
                 _f(ra.get("paged16/cudnn"), "%.2fx"), _f(ra.get("contiguous/cudnn"), "%.2fx"),
                 _f(ra.get("paged16/flash"), "%.2fx"), _f(ra.get("contiguous/flash"), "%.2fx"),
                 _f(ra.get("paged16_time/contiguous_time"), "%.3f"),
                 "NaN!" if nonfinite else ("%.1e" % max(errs) if errs else "-")]
        lines.append(cells)
    out = _aligned(head, lines)
    notes = sorted({("" if k.startswith("fastattn") else k + ": ")
                    + (info.get("error") or info.get("check_error"))
                    for r in records for k, info in r["impls"].items()
                    if info.get("error") or info.get("check_error")})
    notes += sorted({"%s (%s)" % (r["name"], r["skipped"]) for r in records if r.get("skipped")})
    notes += sorted({"%s: %s" % (r["name"], r["error"]) for r in records if r.get("error")})
    for n in notes[:5]:
        out.append("n/a: " + (n if len(n) <= 240 else n[:237] + "..."))
    if len(notes) > 5:
        out.append("n/a: ... %d more messages in the JSON" % (len(notes) - 5))
    out.append("TB/s = (K+V read + q + out) bytes / median time%s; *: SDPA with K/V expanded to "
               "every query head (charged the bytes it reads); %%copy = paged16 TB/s / copy "
               "bandwidth" % (" (copy bandwidth %.2f TB/s)" % copy_tbps if copy_tbps else ""))
    out.append("pg/x, ct/x = x's time / fastattn paged16's, contiguous's (> 1: fastattn faster); "
               "pg/ct time = paged16 time / contiguous time; max err = max |fastattn - SDPA flash|")
    fi = format_flashinfer_table(records)
    return "\n".join(out + ([""] + [fi] if fi else []))


def format_flashinfer_table(records):
    """One line per shape with FlashInfer figures: fastattn paged16's time, each FlashInfer
    peer's time and TB/s on the same page pool, and its time over paged16's; "" when none ran."""
    peers = [p for p in FLASHINFER_PEERS if any(p in r["impls"] for r in records)]
    if not peers:
        return ""
    head = ["shape", "paged us"]
    for p in peers:
        short = p[len("flashinfer-"):]
        head += ["fi-%s us" % short, "TB/s", "fi-%s/pg" % short]
    head.append("fi max err")
    lines = []
    for r in records:
        if not any(p in r["impls"] for p in peers) and not r.get("skipped"):
            continue
        cells = [r["name"], _time_cell(r, PAGED)]
        for p in peers:
            cells += [_time_cell(r, p), _rate_cell(r, p),
                      _f(r["ratios"].get("paged16/" + p), "%.2fx")]
        errs = [r["impls"][p].get("max_abs_err") for p in peers
                if r["impls"].get(p, {}).get("max_abs_err") is not None]
        cells.append("%.1e" % max(errs) if errs else "-")
        lines.append(cells)
    out = _aligned(head, lines)
    out.append("FlashInfer on fastattn paged16's own pool (NHD pages of %d, the same block table); "
               "fi-x/pg = its time / paged16's (> 1: fastattn faster); plan() untimed; "
               "max err = max |FlashInfer - reference|" % PAGE_SIZE)
    return "\n".join(out)


def _check(vals, ok):
    """vals: [(label, value or None)]; ok(value) -> bool. The acceptance figures of one check."""
    have = [(v, n) for n, v in vals if v is not None]
    s = {"n": len(have), "of": len(vals),
         "missing": [n for n, v in vals if v is None],
         "failing": [[n, v] for v, n in sorted(have) if not ok(v)]}
    if have:
        lo, hi = min(have), max(have)
        s.update(min=lo[0], min_at=lo[1], max=hi[0], max_at=hi[1],
                 median=statistics.median(v for v, _ in have))
    if not vals:
        s["status"] = "NO ROWS"
    elif s["failing"]:
        s["status"] = "FAIL"
    elif s["missing"]:
        s["status"] = "INCOMPLETE"
    else:
        s["status"] = "PASS"
    return s


def summarize(records, copy_tbps, budget_s=None):
    """The figures the decode issue accepts on, as a dict (summary_lines makes the lines)."""
    rows = [r for r in records if not r.get("skipped")]
    s = {"copy_tbps": copy_tbps}

    def frac(r):
        t = r["impls"].get(PAGED, {}).get("tbps")
        return None if (t is None or not copy_tbps) else t / copy_tbps

    s["bandwidth"] = _check([(r["name"], frac(r)) for r in rows
                             if r["tokens"] >= ACCEPT_BW_MIN_TOKENS],
                            lambda v: v >= ACCEPT_BW_FRACTION)
    s["vs_cudnn"] = _check([("%s %s" % (var, r["name"]), r["ratios"].get(var + "/cudnn"))
                            for r in rows for var in ("paged16", "contiguous")],
                           lambda v: v > ACCEPT_VS_CUDNN)
    for var in ("paged16", "contiguous"):
        s["vs_cudnn_" + var] = _check([(r["name"], r["ratios"].get(var + "/cudnn")) for r in rows],
                                      lambda v: v > ACCEPT_VS_CUDNN)
        s["vs_flash_" + var] = _check([(r["name"], r["ratios"].get(var + "/flash")) for r in rows],
                                      lambda v: v >= 1.0)
    s["paged_vs_contiguous"] = _check(
        [(r["name"], r["ratios"].get("paged16_time/contiguous_time")) for r in rows],
        lambda v: v <= ACCEPT_PAGED_TIME_RATIO)
    s["skipped"] = [[r["name"], r["skipped"]] for r in records if r.get("skipped")]
    n_fa = sum(1 for r in rows for k in (PAGED, CONTIG))
    n_fa_na = sum(1 for r in rows for k in (PAGED, CONTIG)
                  if r["impls"].get(k, {}).get("s") is None)
    s["fastattn_na"] = {"n": n_fa_na, "of": n_fa,
                        "not_implemented": sum(1 for r in rows for k in (PAGED, CONTIG)
                                               if r["impls"].get(k, {}).get("not_implemented"))}
    peers = {}
    for p in PEERS:
        modes = {}
        for r in rows:
            info = r["impls"].get(p, {})
            m = info.get("gqa_mode") if info.get("s") is not None else "n/a"
            if m is not None:
                key = ("gqa " if r["gqa"] else "mha ") + m
                modes[key] = modes.get(key, 0) + 1
        peers[p] = modes
    s["peers"] = peers
    fi = {}
    for p in FLASHINFER_PEERS:
        vals = [(r["name"], r["ratios"].get("paged16/" + p)) for r in rows if p in r["impls"]]
        if vals:
            fi[p] = _check(vals, lambda v: v > 1.0)
    if fi:
        s["vs_flashinfer"] = fi
    errs = [r["impls"].get(k, {}).get("max_abs_err") for r in rows for k in (PAGED, CONTIG)]
    errs = [e for e in errs if e is not None and math.isfinite(e)]
    cerrs = [r["impls"].get("sdpa-cudnn", {}).get("max_abs_err") for r in rows]
    cerrs = [e for e in cerrs if e is not None]
    s["nonfinite_fastattn"] = [r["name"] + " " + k for r in rows for k in (PAGED, CONTIG)
                               if r["impls"].get(k, {}).get("finite") is False]
    s["max_err_fastattn"] = max(errs) if errs else None
    s["max_err_cudnn_vs_flash"] = max(cerrs) if cerrs else None
    spreads = [i["spread"] for r in rows for i in r["impls"].values() if "spread" in i]
    s["timing_spread"] = ({"median": statistics.median(spreads), "max": max(spreads)}
                          if spreads else None)
    s["host_bound"] = sorted({"%s %s" % (r["name"], k) for r in rows
                              for k, i in r["impls"].items() if i.get("host_bound_rounds")})
    if budget_s is not None:
        s["budget_squeezed"] = sum(1 for r in rows if r.get("budget_s", budget_s) < 0.999 * budget_s)
    return s


def _list(items, fmt, limit=6):
    if not items:
        return ""
    shown = ", ".join(fmt(x) for x in items[:limit])
    more = " ... %d more" % (len(items) - limit) if len(items) > limit else ""
    return " (%s%s)" % (shown, more)


def summary_lines(s, gpu, date, command):
    """The summary block: the copy bandwidth, the issue's three acceptance checks with min/median
    and the failing rows, then n/a counts, errors and timing noise."""
    copy = s.get("copy_tbps")
    lines = ["### GPU decode summary: %s, %s" % (gpu, date), "`%s`" % command,
             "- copy bandwidth measured in this run (dst.copy_(src), read + write): %s"
             % _f(copy, "%.2f TB/s")]

    def status(c, what):
        if c["status"] == "NO ROWS":
            return "no rows -> NO ROWS"
        miss = ("; %d without figures%s" % (len(c["missing"]), _list(c["missing"], str, 4))
                if c["missing"] else "")
        return "%s%s -> %s" % (what, miss, c["status"])

    b = s["bandwidth"]
    head = ("- (1) fastattn paged16 >= %.0f%% of the copy bandwidth on rows with batch*L >= %d "
            "tokens: " % (100 * ACCEPT_BW_FRACTION, ACCEPT_BW_MIN_TOKENS))
    if b["n"]:
        lines.append(head + status(b, "min %.1f%% (%s), median %.1f%% over %d of %d rows; %d below%s"
                                   % (100 * b["min"], b["min_at"], 100 * b["median"], b["n"], b["of"],
                                      len(b["failing"]),
                                      _list(b["failing"], lambda x: "%s %.1f%%" % (x[0], 100 * x[1])))))
    else:
        lines.append(head + status(b, "no figures"))

    c = s["vs_cudnn"]
    per = "; ".join("%s min %.2fx (%s), median %.2fx" % (var, st["min"], st["min_at"], st["median"])
                    for var in ("paged16", "contiguous") for st in [s["vs_cudnn_" + var]] if st["n"])
    lines.append("- (2) fastattn faster than SDPA cuDNN on every row (cuDNN time / fastattn time > "
                 "1.00x): " + status(c, "%s%s%d of %d figures; %d not faster%s" % (
                     per, "; " if per else "", c["n"], c["of"], len(c["failing"]),
                     _list(c["failing"], lambda x: "%s %.2fx" % (x[0], x[1])))))

    p = s["paged_vs_contiguous"]
    head = "- (3) paged16 time <= %.2fx contiguous time on every row: " % ACCEPT_PAGED_TIME_RATIO
    if p["n"]:
        worst = sorted(p["failing"], key=lambda x: -x[1])
        lines.append(head + status(p, "max %.3fx (%s), median %.3fx over %d of %d rows; %d above%s"
                                   % (p["max"], p["max_at"], p["median"], p["n"], p["of"],
                                      len(worst), _list(worst, lambda x: "%s %.3fx" % (x[0], x[1])))))
    else:
        lines.append(head + status(p, "no figures"))

    fl = "; ".join("%s min %.2fx (%s), median %.2fx" % (var, st["min"], st["min_at"], st["median"])
                   for var in ("paged16", "contiguous") for st in [s["vs_flash_" + var]] if st["n"])
    lines.append("- fastattn vs SDPA flash (flash time / fastattn time, for information): %s"
                 % (fl or "no rows with both figures"))
    for p, st in s.get("vs_flashinfer", {}).items():
        if st["n"]:
            lines.append("- fastattn paged16 vs %s on the same page pool (its time / paged16's, for "
                         "information): min %.2fx (%s), median %.2fx over %d of %d rows; %d not "
                         "faster%s" % (p, st["min"], st["min_at"], st["median"], st["n"], st["of"],
                                       len(st["failing"]),
                                       _list(st["failing"], lambda x: "%s %.2fx" % (x[0], x[1]))))
        else:
            lines.append("- %s: no figures (errors in the table's notes)" % p)
    lines.append("- SDPA rows by GQA handling: %s (expanded: K/V repeated to every query head "
                 "outside the timed region, charged the bytes read)" % "; ".join(
                     "%s %s" % (p, ", ".join("%s %d" % kv for kv in sorted(m.items())) or "-")
                     for p, m in s["peers"].items()))
    if s["skipped"]:
        lines.append("- skipped rows: %s" % ", ".join("%s (%s)" % (n, why) for n, why in s["skipped"]))
    na = s["fastattn_na"]
    lines.append("- fastattn n/a (no CUDA kernel or failed): %d of %d fastattn timings (%d "
                 "NotImplementedError)" % (na["n"], na["of"], na["not_implemented"]))
    e, ce = s["max_err_fastattn"], s["max_err_cudnn_vs_flash"]
    lines.append(error_vs_flash_line(e, ce, s["nonfinite_fastattn"]))
    if timing_noise_line(s["timing_spread"]):
        lines.append(timing_noise_line(s["timing_spread"]))
    if s.get("host_bound"):
        lines.append("- host-bound timings (the GPU queue ran dry in some round): %d%s"
                     % (len(s["host_bound"]), _list(s["host_bound"], str, 4)))
    if s.get("budget_squeezed"):
        lines.append("- the time limit shortened the timing of %d shapes (see budget_s in the JSON)"
                     % s["budget_squeezed"])
    return lines


def save_plot(records, path, title, copy_tbps=None):
    """TB/s against cache length, one panel per (heads, batch): fastattn paged16 and contiguous,
    SDPA flash and cuDNN, with the copy bandwidth and 90% of it as horizontal lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return "no plot (matplotlib unavailable: %s)" % type(e).__name__
    rows_keys = sorted({(r["dtype"], r["head_dim"], r["heads_q"], r["heads_kv"]) for r in records},
                       key=lambda x: (x[0], x[1], -x[2] // max(1, x[3])))
    cols = sorted({r["batch"] for r in records})
    if not rows_keys or not cols:
        return "no plot (no records)"
    width = max(3.6 * len(cols), 9.0)
    height = 3.2 * len(rows_keys) + 1.3
    fig, axes = plt.subplots(len(rows_keys), len(cols), figsize=(width, height), squeeze=False,
                             sharey=True)
    styles = [(PAGED, "fastattn paged 16", dict(color="C0", lw=2.2, marker="o")),
              (CONTIG, "fastattn contiguous", dict(color="C2", lw=1.4, ls="--", marker=".")),
              ("sdpa-flash", "SDPA flash", dict(color="C1", lw=1.6, marker="s")),
              ("sdpa-cudnn", "SDPA cuDNN", dict(color="C3", lw=1.6, marker="^"))]
    for i, (dt, d, hq, hkv) in enumerate(rows_keys):
        for j, b in enumerate(cols):
            ax = axes[i][j]
            sub = sorted((r for r in records if (r["dtype"], r["head_dim"], r["heads_q"],
                                                 r["heads_kv"], r["batch"]) == (dt, d, hq, hkv, b)),
                         key=lambda r: r["cache_len"])
            for key, label, st in styles:
                pts = [(r["cache_len"], r["impls"].get(key, {}).get("tbps")) for r in sub]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], label=label, **st)
            if copy_tbps:
                ax.axhline(copy_tbps, color="k", lw=1, label="copy bandwidth")
                ax.axhline(ACCEPT_BW_FRACTION * copy_tbps, color="k", lw=0.8, ls=":",
                           label="%.0f%% of copy" % (100 * ACCEPT_BW_FRACTION))
            for r in sub:
                if r.get("skipped"):
                    ax.annotate("skipped", (r["cache_len"], 0), fontsize=7, ha="center",
                                va="bottom", color="0.4")
            ax.set_xscale("log", base=2)
            xs = sorted({r["cache_len"] for r in sub})
            if xs:
                ax.set_xticks(xs)
                ax.set_xticklabels(["%dk" % (x // 1024) if x % 1024 == 0 else str(x) for x in xs],
                                   fontsize=8)
            ax.minorticks_off()
            ax.set_title("%s d%d %d/%d heads, batch %d" % (dt, d, hq, hkv, b), fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            if j == 0:
                ax.set_ylabel("TB/s (K+V+q+out bytes)")
            if i == len(rows_keys) - 1:
                ax.set_xlabel("cache length")
    return finish_figure(plt, fig, axes, width, height, title, path)
