"""GPU prefill suite of ``python -m fastattn.bench`` (issue 3's performance table).

Shapes: a fixed budget of 16384 tokens per call (batch = 16384 / seqlen), hidden size 2048
(heads = 2048 / head_dim: 32 at 64, 16 at 128, 8 at 256), seqlen 512 ... 16384, causal and not,
fp16 and bf16, head_dim 64 / 128 / 256. Every shape is run as

- ``dense``    fastattn.flash_attn_func on q/k/v (B, S, H, D);
- ``varlen``   fastattn.flash_attn_varlen_func on the same tokens packed (B*S, H, D), cu_seqlens
               = [0, S, 2S, ...];
- ``pagedP``   the same call with k and v in a paged cache of page size P (16 and 256; any P
               with --variants): each sequence's keys cut into pages stored in a random
               permutation of the cache, addressed by a block table (B, ceil(S/P)) int32;

and against PyTorch's SDPA restricted to its flash backend (FlashAttention-2) and to its cuDNN
backend, on the same data as (B, H, S, D) views (the transposes are made once, outside the timed
region; SDPA reads the (B, S, H, D) storage through the strides, no copy).

FLOPs (the usual convention of FlashAttention's benchmarks): 4 * B * H * Sq * Sk * D per call
(two matrix products of 2 FLOPs per multiply-add), halved when causal. Rates are these FLOPs over
the median time; a causal kernel thus gets no credit for the diagonal tiles it also computes.

Timing (.library/device/METHOD.md): CUDA events around every call; after a probe call, a
correctness call, two warm-up calls and two sizing calls per implementation, the implementations of one shape are
timed in interleaved rounds (all of them once per round, each for n calls, n sized from a
measured time per call so that each gets about the same wall time), so that clock or thermal
drift hits every column alike; the figure is the median over all calls, and the spread of the
per-round medians is recorded as the noise estimate. When one input set (q, k, v, output) fits in
twice the L2 cache, several input sets are built and the calls rotate among them (at the issue's
sizes, 64 MiB per tensor, they never fit: one set). A deadline (``--time-limit``) shrinks the
per-implementation budget when the run is behind, so the whole suite keeps to its time.

Correctness: one extra call per fastattn variant into an output poisoned with NaN; max |error|
against SDPA flash's output on the same data (and cuDNN's difference from flash, for scale).
A non-finite fastattn output, or a fastattn failure other than NotImplementedError, makes the
benchmark exit with status 1.
"""
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import fastattn

TOKENS = 16384
HIDDEN = 2048
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128, 256)
DTYPES = ("fp16", "bf16")
VARIANTS = ("dense", "varlen", "paged16", "paged256")
PEERS = ("sdpa-flash", "sdpa-cudnn")
QUICK = dict(seqlens=(1024, 4096), head_dims=(64, 128), dtypes=("fp16",))
ACCEPT_DENSE_MIN_SEQLEN = 2048  # issue 3: fastattn >= 1.0x flash on dense rows with seqlen >= 2048
ACCEPT_VARIANT_RATIO = 0.9      # issue 3: varlen/paged within 10% of dense


def valid_variant(v):
    """dense, varlen, or pagedN for a page size N >= 1 (paged16 and paged256 by default)."""
    p = v[len("paged"):] if v.startswith("paged") else ""
    return v in ("dense", "varlen") or (p.isdigit() and int(p) >= 1)


def impl_key(variant):
    return "fastattn" if variant == "dense" else "fastattn-" + variant


def page_size_of(variant):
    return int(variant[len("paged"):]) if variant.startswith("paged") else None


def apply_overrides(settings, overrides):
    """The suites' Settings.for_mode: each override that is not None replaces its field (a list
    becomes a tuple). Returns settings."""
    for k, v in overrides.items():
        if v is not None:
            setattr(settings, k, tuple(v) if isinstance(v, list) else v)
    return settings


@dataclass
class Settings:
    """What to run and how long to spend. Full mode: 72 shapes x (4 fastattn variants + 2 peers),
    estimated 2.5-3 minutes on an H200 when fastattn runs near SDPA flash's speed (most shapes hit
    max_calls; the largest ones hit budget_s), never much over time_limit_s; --quick: 8 shapes,
    a few seconds."""
    tokens: int = TOKENS
    hidden: int = HIDDEN
    seqlens: tuple = SEQLENS
    head_dims: tuple = HEAD_DIMS
    dtypes: tuple = DTYPES
    variants: tuple = VARIANTS
    causal: tuple = (False, True)
    rounds: int = 3             # interleaved timing rounds per shape
    budget_s: float = 0.5       # timed wall time per implementation and shape (upper bound)
    min_budget_s: float = 0.02  # lower bound when the deadline squeezes
    min_calls: int = 10         # timed calls per implementation, at least (over all rounds)
    max_calls: int = 300        # ... and at most
    warmup: int = 2
    time_limit_s: float = 330.0
    seed: int = 0

    @classmethod
    def for_mode(cls, quick, **overrides):
        s = cls()
        if quick:
            s = cls(seqlens=QUICK["seqlens"], head_dims=QUICK["head_dims"], dtypes=QUICK["dtypes"],
                    rounds=2, budget_s=0.05, min_budget_s=0.01, min_calls=6, max_calls=60,
                    time_limit_s=25.0)
        return apply_overrides(s, overrides)


@dataclass
class Shape:
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    heads: int

    @property
    def name(self):
        return "%s d%d s%d%s" % (self.dtype, self.head_dim, self.seqlen, " causal" if self.causal else "")

    @property
    def flops(self):
        f = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        return f / 2 if self.causal else f

    @property
    def bytes(self):
        """Fewest device-memory bytes: q, k, v read once, out written once (2-byte elements)."""
        return 4.0 * 2 * self.batch * self.seqlen * self.heads * self.head_dim


def plan(settings: Settings) -> List[Shape]:
    shapes = []
    for dtype in settings.dtypes:
        for d in settings.head_dims:
            for causal in settings.causal:
                for s in settings.seqlens:
                    shapes.append(Shape(dtype, d, s, causal, batch=max(1, settings.tokens // s),
                                        heads=max(1, settings.hidden // d)))
    return shapes


# ---- inputs and calls ---------------------------------------------------------------------------


def _torch_dtype(torch, name):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _paged(torch, k, v, page, gen_perm):
    """k/v (B, S, H, D) -> (k_pages, v_pages, block_table): sequence b's page i is stored at
    physical page block_table[b, i], a random permutation of all pages."""
    b, s, h, d = k.shape
    npp = (s + page - 1) // page
    n = b * npp

    def cut(x):
        if npp * page != s:  # pad the last page (its tail is never read: lengths are S)
            pad = torch.zeros((b, npp * page, h, d), dtype=x.dtype, device=x.device)
            pad[:, :s] = x
            x = pad
        return x.reshape(n, page, h, d)

    perm = gen_perm(n).to(k.device)
    kp = torch.empty((n, page, h, d), dtype=k.dtype, device=k.device)
    vp = torch.empty_like(kp)
    kp[perm] = cut(k)
    vp[perm] = cut(v)
    table = perm.reshape(b, npp).to(torch.int32).contiguous()
    return kp, vp, table


class InputSet:
    """One set of inputs for a shape: dense q/k/v, their packed views and paged copies."""

    def __init__(self, torch, shape: Shape, variants, gen_perm):
        dev = torch.device("cuda")
        dt = _torch_dtype(torch, shape.dtype)
        b, s, h, d = shape.batch, shape.seqlen, shape.heads, shape.head_dim
        self.q, self.k, self.v = (torch.randn(b, s, h, d, device=dev, dtype=dt) for _ in range(3))
        self.qf, self.kf, self.vf = (x.view(b * s, h, d) for x in (self.q, self.k, self.v))
        self.cu = (torch.arange(b + 1, device=dev, dtype=torch.int32) * s).contiguous()
        self.pages = {}
        for var in variants:
            p = page_size_of(var)
            if p is not None:
                self.pages[p] = _paged(torch, self.k, self.v, p, gen_perm)
        # SDPA's (B, H, S, D): views of the same storage, made once here.
        self.tq, self.tk, self.tv = (x.transpose(1, 2) for x in (self.q, self.k, self.v))

    def fastattn_call(self, shape: Shape, variant, out=None):
        s, c = shape.seqlen, shape.causal
        kw = {} if out is None else {"out": out}
        if variant == "dense":
            return lambda: fastattn.flash_attn_func(self.q, self.k, self.v, causal=c, **kw)
        if variant == "varlen":
            return lambda: fastattn.flash_attn_varlen_func(
                self.qf, self.kf, self.vf, self.cu, self.cu, s, s, causal=c, **kw)
        kp, vp, table = self.pages[page_size_of(variant)]
        return lambda: fastattn.flash_attn_varlen_func(
            self.qf, kp, vp, self.cu, self.cu, s, s, causal=c, block_table=table, **kw)

    def sdpa_call(self, torch, backend_name, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION,
                   "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
        F = torch.nn.functional
        q, k, v = self.tq, self.tk, self.tv

        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run


def _short_error(e):
    msg = str(e).splitlines()[0] if str(e) else ""
    return "%s: %s" % (type(e).__name__, msg[:140])


def _cycle(calls):
    if len(calls) == 1:
        return calls[0]
    state = [0]

    def run():
        i = state[0]
        state[0] = (i + 1) % len(calls)
        return calls[i]()
    return run


# ---- timing ---------------------------------------------------------------------------------------


class Deadline:
    """Splits what is left of the time limit over what is left to time. The per-shape overhead
    (building inputs, probes, checks, warm-up) is learnt from the shapes done so far."""

    def __init__(self, settings: Settings, n_shapes, impls_per_shape, first_overhead_s):
        self.s = settings
        self.start = time.perf_counter()
        self.n_shapes = n_shapes
        self.per_shape = impls_per_shape
        self.overhead0 = first_overhead_s
        self.timed_s = 0.0
        self.done = 0

    def impl_budget(self):
        elapsed = time.perf_counter() - self.start
        left = self.n_shapes - self.done
        overhead = ((elapsed - self.timed_s) / self.done) if self.done else self.overhead0
        avail = self.s.time_limit_s - elapsed - overhead * left
        per = avail / max(1, left * self.per_shape)
        return min(self.s.budget_s, max(self.s.min_budget_s, per))


def _event_time(torch, fn, n, sleeper=None, ahead_s=0.0):
    """Seconds per call of n back-to-back calls (one event pair), enqueued behind a GPU sleep of
    ahead_s when a sleeper (gpu_decode.make_sleeper) is given."""
    if sleeper is not None:
        sleeper(ahead_s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n


def time_interleaved(torch, fns: Dict[str, Callable], settings: Settings, budget_s):
    """Times every callable of `fns` in settings.rounds interleaved rounds of per-call CUDA event
    pairs. Returns {name: stats}. Each callable gets about budget_s of timed calls, within
    [min_calls, max_calls]."""
    per_call = {}
    for name, fn in fns.items():
        for _ in range(settings.warmup):
            fn()
        per_call[name] = max(_event_time(torch, fn, 2), 1e-7)
    counts = calls_per_round(per_call, settings, budget_s)
    samples = {name: [] for name in fns}
    round_medians = {name: [] for name in fns}
    for _ in range(max(1, settings.rounds)):
        for name, fn in fns.items():
            n = counts[name]
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            for a, b in ev:
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            ts = [a.elapsed_time(b) / 1e3 for a, b in ev]
            samples[name] += ts
            round_medians[name].append(statistics.median(ts))
    return timing_stats(samples, round_medians, per_call)


def calls_per_round(per_call, settings: Settings, budget_s):
    """Timed calls per round for each callable: about budget_s of calls (at per_call[name] seconds
    each) within [min_calls, max_calls], spread over settings.rounds rounds (rounded up)."""
    rounds = max(1, settings.rounds)
    counts = {}
    for name, t in per_call.items():
        n = int(min(settings.max_calls, max(settings.min_calls, budget_s / t)))
        counts[name] = max(1, -(-n // rounds))
    return counts


def timing_stats(samples, round_medians, per_call):
    """{name: stats} from every callable's per-call times (seconds) and per-round medians: median,
    count, the estimate per_call[name], min / p10 / p90, and the spread of the round medians."""
    out = {}
    for name, ts in samples.items():
        med = statistics.median(ts)
        rm = round_medians[name]
        qs = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[name] = {
            "s": med, "runs": len(ts), "est_s": per_call[name],
            "min_s": min(ts), "p10_s": qs[0], "p90_s": qs[-1],
            "round_medians_s": rm,
            "spread": (max(rm) - min(rm)) / med if med > 0 else 0.0,
        }
    return out


# ---- one shape ------------------------------------------------------------------------------------


def _max_err(torch, out_bshd, ref_bhsd):
    return float((out_bshd.float() - ref_bhsd.transpose(1, 2).float()).abs().max())


def _l2_bytes(torch):
    try:
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)) or (50 << 20)
    except Exception:
        return 50 << 20


def measure_shape(torch, shape: Shape, settings: Settings, budget_s, gen_perm, l2_bytes):
    """Builds the inputs of one shape, checks and times every variant and peer. Returns its
    record (see run_suite) and the seconds spent in timed rounds."""
    rec = {"name": shape.name, "dtype": shape.dtype, "head_dim": shape.head_dim,
           "seqlen": shape.seqlen, "causal": shape.causal, "batch": shape.batch,
           "heads": shape.heads, "flops": shape.flops, "bytes": shape.bytes,
           "impls": {}, "ratios": {}}
    # Rotation: enough input sets that one set's working set (q, k, v, out) is evicted from L2
    # before it is used again. At the sizes (64 MiB per tensor) this is one set.
    working = shape.bytes
    n_sets = 1 if working >= 2 * l2_bytes else min(16, int(math.ceil(2 * l2_bytes / working)) + 1)
    rec["input_sets"] = n_sets
    sets = [InputSet(torch, shape, settings.variants, gen_perm) for _ in range(n_sets)]
    s0 = sets[0]

    fns = {}
    # Probe: one call each (also the cuDNN graph build and the first launch of each kernel).
    for var in settings.variants:
        key = impl_key(var)
        try:
            s0.fastattn_call(shape, var)()
            torch.cuda.synchronize()
            fns[key] = _cycle([st.fastattn_call(shape, var) for st in sets])
        except NotImplementedError as e:
            rec["impls"][key] = {"s": None, "error": _short_error(e), "not_implemented": True}
        except Exception as e:
            rec["impls"][key] = {"s": None, "error": _short_error(e), "failed": True}
    ref = None
    for peer in PEERS:
        try:
            y = s0.sdpa_call(torch, peer, shape.causal)()
            torch.cuda.synchronize()
            fns[peer] = _cycle([st.sdpa_call(torch, peer, shape.causal) for st in sets])
            if peer == "sdpa-flash":
                ref = y
            elif ref is not None:
                rec["impls"][peer] = {"max_abs_err": _max_err(torch, y.transpose(1, 2), ref)}
            del y
        except Exception as e:  # the backend refuses the shape or dtype
            rec["impls"][peer] = {"s": None, "error": _short_error(e)}

    # Correctness: fastattn into NaN-poisoned outputs, against SDPA flash on the same data.
    for var in settings.variants:
        key = impl_key(var)
        if key not in fns:
            continue
        like = s0.q if var == "dense" else s0.qf
        out = torch.full_like(like, float("nan"))
        try:
            s0.fastattn_call(shape, var, out=out)()
            torch.cuda.synchronize()
            o4 = out.view(s0.q.shape)
            finite = bool(torch.isfinite(o4).all())
            info = {"finite": finite}
            if ref is not None:
                info["max_abs_err"] = _max_err(torch, o4, ref)
                info["err_vs"] = "sdpa-flash"
            rec["impls"][key] = info
        except Exception as e:
            rec["impls"][key] = {"check_error": _short_error(e)}
        del out
    del ref

    t0 = time.perf_counter()
    stats = time_interleaved(torch, fns, settings, budget_s) if fns else {}
    timed = time.perf_counter() - t0
    for key, st in stats.items():
        st["tflops"] = shape.flops / st["s"] / 1e12
        rec["impls"].setdefault(key, {}).update(st)
    del sets, s0, fns
    _ratios(rec)
    return rec, timed


def _s(rec, key):
    return rec["impls"].get(key, {}).get("s")


def _ratio(a_s, b_s):
    """Speed of a relative to b (b's time over a's time), None when either is missing."""
    return None if (not a_s or not b_s) else b_s / a_s


def _ratios(rec):
    r = rec["ratios"]
    fa = _s(rec, "fastattn")
    r["fastattn/flash"] = _ratio(fa, _s(rec, "sdpa-flash"))
    r["fastattn/cudnn"] = _ratio(fa, _s(rec, "sdpa-cudnn"))
    for key, info in rec["impls"].items():
        if key.startswith("fastattn-"):
            var = key[len("fastattn-"):]
            r[var + "/dense"] = _ratio(info.get("s"), fa)
            r[var + "/flash"] = _ratio(info.get("s"), _s(rec, "sdpa-flash"))


# ---- the suite ------------------------------------------------------------------------------------


def keep_gpu_busy(torch, step, seconds, max_steps, sync_every):
    """Calls step() for about `seconds` of wall time (at most max_steps calls), synchronizing every
    sync_every calls so that the host does not run far ahead of the GPU."""
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds and n < max_steps:
        step()
        n += 1
        if n % sync_every == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()


def warm_gpu(torch, seconds=0.3):
    """Brings the clocks up before the first shape: matrix products for ~0.3 s."""
    a = torch.randn(4096, 4096, device=torch.device("cuda"), dtype=torch.bfloat16)
    keep_gpu_busy(torch, lambda: a @ a, seconds, max_steps=3000, sync_every=10)


def run_suite(torch, settings: Settings, log=print):
    """Runs every shape of the plan. Returns (records, meta): one record per shape with
    impls[fastattn | fastattn-<variant> | sdpa-flash | sdpa-cudnn] = {s, tflops, runs, ...,
    max_abs_err, error} and ratios."""
    shapes = plan(settings)
    n_impls = len(settings.variants) + len(PEERS)
    deadline = Deadline(settings, len(shapes), n_impls,
                        first_overhead_s=1.0 if settings.budget_s > 0.1 else 0.3)
    gen = torch.Generator().manual_seed(settings.seed)
    gen_perm = lambda n: torch.randperm(n, generator=gen)
    l2 = _l2_bytes(torch)
    warm_gpu(torch)
    records = []
    for i, shape in enumerate(shapes):
        torch.manual_seed(settings.seed * 1000003 + i)
        budget = deadline.impl_budget()
        t0 = time.perf_counter()
        try:
            rec, timed = measure_shape(torch, shape, settings, budget, gen_perm, l2)
        except Exception as e:  # e.g. out of memory: keep the row, keep going
            rec = {"name": shape.name, "dtype": shape.dtype, "head_dim": shape.head_dim,
                   "seqlen": shape.seqlen, "causal": shape.causal, "batch": shape.batch,
                   "heads": shape.heads, "flops": shape.flops, "bytes": shape.bytes,
                   "impls": {}, "ratios": {}, "error": _short_error(e)}
            timed = 0.0
        rec["budget_s"] = budget
        rec["wall_s"] = time.perf_counter() - t0
        deadline.timed_s += timed
        deadline.done += 1
        records.append(rec)
        torch.cuda.empty_cache()
        log("  [%2d/%d] %-24s B=%-3d H=%-2d %s  (%.1f s)" % (
            i + 1, len(shapes), shape.name, shape.batch, shape.heads,
            _brief(rec), rec["wall_s"]), flush=True)
    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:
        cudnn = None
    meta = {"elapsed_s": time.perf_counter() - deadline.start, "l2_bytes": l2, "cudnn": cudnn,
            "settings": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in settings.__dict__.items()},
            "flops_convention": "4*B*H*Sq*Sk*D, halved when causal",
            "peer_layout": "SDPA on (B, H, S, D) transposed views of the (B, S, H, D) tensors"}
    return records, meta


def _brief(rec):
    def t(key):
        v = rec["impls"].get(key, {}).get("tflops")
        return "n/a" if v is None else "%.0f" % v
    return "fa %s flash %s cudnn %s TFLOP/s" % (t("fastattn"), t("sdpa-flash"), t("sdpa-cudnn"))


def bad_records(records):
    """Names of shapes where fastattn failed (not NotImplementedError) or wrote non-finite output."""
    bad = []
    for r in records:
        if r.get("error"):
            bad.append("%s (%s)" % (r["name"], r["error"]))
        for key, info in r["impls"].items():
            if not key.startswith("fastattn"):
                continue
            if info.get("failed") or info.get("check_error"):
                bad.append("%s %s (%s)" % (r["name"], key, info.get("error") or info.get("check_error")))
            elif info.get("finite") is False:
                bad.append("%s %s (non-finite output)" % (r["name"], key))
    return bad


# ---- report ---------------------------------------------------------------------------------------


def _f(x, fmt):
    return "-" if x is None else fmt % x


def timing_noise_line(spread):
    """The summary line on timing noise (a summary's timing_spread), or None without one."""
    if not spread:
        return None
    return ("- timing noise (spread of per-round medians / median): median %.1f%%, max %.1f%%"
            % (100 * spread["median"], 100 * spread["max"]))


def error_vs_flash_line(err, cudnn_err, nonfinite):
    """The summary line on fastattn's and cuDNN's max |error| against SDPA flash, naming the rows
    where fastattn's output was not finite."""
    return ("- max |error| vs SDPA flash: fastattn %s, cuDNN %s (for scale)%s"
            % (_f(err, "%.1e"), _f(cudnn_err, "%.1e"),
               ("; NON-FINITE fastattn output in %d rows: %s" % (len(nonfinite), ", ".join(nonfinite[:4])))
               if nonfinite else ""))


def _peer_cell(info):
    if info.get("tflops") is not None:
        return "%.1f" % info["tflops"]
    return "n/a" if info.get("error") else "-"


def _aligned(head, lines):
    """Header, rule and rows of a plain-text table: the first column left-aligned, the rest right."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines]


def format_table(records, variants=VARIANTS):
    """One line per shape: TFLOP/s of fastattn (dense) and the peers, the ratios, the max error
    of any fastattn variant vs SDPA flash, and each varlen/paged variant's speed over dense."""
    extra = [v for v in variants if v != "dense"]
    head = ["shape", "fastattn", "flash", "cuDNN", "fa/flash", "fa/cuDNN", "max err"] + extra
    lines = []
    for r in records:
        im = r["impls"]
        errs = [im[k].get("max_abs_err") for k in im if k.startswith("fastattn")
                and im[k].get("max_abs_err") is not None]
        nonfinite = any(im[k].get("finite") is False for k in im if k.startswith("fastattn"))
        fa = im.get("fastattn", {})
        cells = [r["name"],
                 "n/a" if fa.get("s") is None and "fastattn" in im else _f(fa.get("tflops"), "%.1f"),
                 _peer_cell(im.get("sdpa-flash", {})),
                 _peer_cell(im.get("sdpa-cudnn", {})),
                 _f(r["ratios"].get("fastattn/flash"), "%.2fx"),
                 _f(r["ratios"].get("fastattn/cudnn"), "%.2fx"),
                 "NaN!" if nonfinite else ("%.1e" % max(errs) if errs else "-")]
        for v in extra:
            info = im.get("fastattn-" + v, {})
            ratio = r["ratios"].get(v + "/dense")
            if ratio is not None:
                cells.append("%.2fx" % ratio)
            elif info.get("tflops") is not None:
                cells.append("%.0fT" % info["tflops"])  # dense missing: the variant's own rate
            else:
                cells.append("n/a" if info else "-")
        if r.get("error"):
            cells[1] = "error"
        lines.append(cells)
    out = _aligned(head, lines)
    notes = sorted({("" if k.startswith("fastattn") else k + ": ") + info["error"]
                    for r in records for k, info in r["impls"].items() if info.get("error")})
    for n in notes[:4]:
        out.append("n/a: " + n)
    if len(notes) > 4:
        out.append("n/a: ... %d more messages in the JSON" % (len(notes) - 4))
    out.append("TFLOP/s = 4*B*H*S*S*D (halved if causal) / median time; fa/x = x's time / fastattn "
               "dense's; max err = max |fastattn - SDPA flash| over all fastattn variants")
    if extra:
        out.append("%s = that fastattn variant's speed / fastattn dense's (nT: its TFLOP/s when dense "
                   "is n/a); issue 3 accepts fa/flash >= 1.00x at seqlen >= %d, variants >= %.2fx"
                   % ("/".join(extra), ACCEPT_DENSE_MIN_SEQLEN, ACCEPT_VARIANT_RATIO))
    return "\n".join(out)


def summarize(records, variants=VARIANTS, budget_s=None):
    """The figures issue 3 accepts on, as a dict (summary_lines makes the lines to paste)."""
    dense = [r for r in records if r["seqlen"] >= ACCEPT_DENSE_MIN_SEQLEN]
    s = {}

    def stats(rows, key):
        vals = [(r["ratios"].get(key), r["name"]) for r in rows if r["ratios"].get(key) is not None]
        if not vals:
            return None
        lo = min(vals)
        return {"n": len(vals), "of": len(rows), "min": lo[0], "min_at": lo[1],
                "median": statistics.median(v for v, _ in vals),
                "below_1": sum(1 for v, _ in vals if v < 1.0),
                "worst": [[n, v] for v, n in sorted(vals)[:6]]}

    s["dense_vs_flash"] = stats(dense, "fastattn/flash")
    s["dense_vs_cudnn"] = stats(dense, "fastattn/cudnn")
    var_rows = []
    for v in variants:
        if v == "dense":
            continue
        st = stats(records, v + "/dense")
        if st:
            st["below_accept"] = sum(1 for r in records if (r["ratios"].get(v + "/dense") or 9)
                                     < ACCEPT_VARIANT_RATIO)
        s[v + "_vs_dense"] = st
        var_rows += [(r["ratios"][v + "/dense"], "%s %s" % (v, r["name"])) for r in records
                     if r["ratios"].get(v + "/dense") is not None]
    s["variants_vs_dense"] = ({"n": len(var_rows), "min": min(var_rows)[0], "min_at": min(var_rows)[1],
                               "median": statistics.median(x for x, _ in var_rows),
                               "below_accept": sum(1 for x, _ in var_rows if x < ACCEPT_VARIANT_RATIO),
                               "worst": [[n, v] for v, n in sorted(var_rows)[:6]]}
                              if var_rows else None)
    n_fa = sum(1 for r in records for k in r["impls"] if k.startswith("fastattn"))
    n_fa_na = sum(1 for r in records for k, i in r["impls"].items()
                  if k.startswith("fastattn") and i.get("s") is None)
    s["fastattn_na"] = {"n": n_fa_na, "of": n_fa}
    errs = [i.get("max_abs_err") for r in records for k, i in r["impls"].items()
            if k.startswith("fastattn") and i.get("max_abs_err") is not None]
    cerrs = [r["impls"].get("sdpa-cudnn", {}).get("max_abs_err") for r in records]
    cerrs = [e for e in cerrs if e is not None]
    nonfinite = [r["name"] + " " + k for r in records for k, i in r["impls"].items()
                 if k.startswith("fastattn") and i.get("finite") is False]
    errs = [e for e in errs if math.isfinite(e)]
    s["nonfinite_fastattn"] = nonfinite
    s["max_err_fastattn_vs_flash"] = max(errs) if errs else None
    s["max_err_cudnn_vs_flash"] = max(cerrs) if cerrs else None
    spreads = [i["spread"] for r in records for i in r["impls"].values() if "spread" in i]
    s["timing_spread"] = ({"median": statistics.median(spreads), "max": max(spreads)}
                          if spreads else None)
    if budget_s is not None:
        s["budget_squeezed"] = sum(1 for r in records if r.get("budget_s", budget_s) < 0.999 * budget_s)
    return s


def summary_lines(s, gpu, date, command):
    def worst(st, limit):
        w = [(n, v) for n, v in st["worst"] if v < limit]
        return (" (%s)" % ", ".join("%s %.2fx" % (n, v) for n, v in w)) if w else ""

    def pair(st, what, list_worst=True):
        if not st:
            return "%s: no rows with both figures" % what
        return ("%s: min %.2fx (%s), median %.2fx over %d of %d rows; %d below 1.00x%s"
                % (what, st["min"], st["min_at"], st["median"], st["n"], st["of"], st["below_1"],
                   worst(st, 1.0) if list_worst else ""))
    lines = ["### GPU prefill summary: %s, %s" % (gpu, date),
             "`%s`" % command,
             "- dense, seqlen >= %d, " % ACCEPT_DENSE_MIN_SEQLEN
             + pair(s["dense_vs_flash"], "fastattn/flash (accept: >= 1.00x every row)"),
             "- dense, seqlen >= %d, " % ACCEPT_DENSE_MIN_SEQLEN
             + pair(s["dense_vs_cudnn"], "fastattn/cuDNN", list_worst=False)]
    v = s.get("variants_vs_dense")
    if v:
        per = ", ".join("%s min %.2fx" % (k[:-len("_vs_dense")], st["min"])
                        for k, st in s.items() if k.endswith("_vs_dense") and st
                        and k != "variants_vs_dense")
        lines.append("- varlen/paged vs fastattn dense (accept: >= %.2fx): min %.2fx (%s), median "
                     "%.2fx over %d rows; %d below%s; %s" % (
                         ACCEPT_VARIANT_RATIO, v["min"], v["min_at"], v["median"], v["n"],
                         v["below_accept"], worst(v, ACCEPT_VARIANT_RATIO), per))
    else:
        lines.append("- varlen/paged vs fastattn dense: no rows with both figures")
    na = s["fastattn_na"]
    lines.append("- fastattn n/a (no CUDA kernel or failed): %d of %d fastattn timings" % (na["n"], na["of"]))
    e, ce = s["max_err_fastattn_vs_flash"], s["max_err_cudnn_vs_flash"]
    lines.append(error_vs_flash_line(e, ce, s["nonfinite_fastattn"]))
    if timing_noise_line(s["timing_spread"]):
        lines.append(timing_noise_line(s["timing_spread"]))
    if s.get("budget_squeezed"):
        lines.append("- the time limit shortened the timing of %d shapes (see budget_s in the JSON)"
                     % s["budget_squeezed"])
    return lines


def finish_figure(plt, fig, axes, width, height, title, path):
    """One legend below the panels (each label once), the title, layout, saved to `path` (the
    figure is width x height inches). Returns path."""
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    ncol = min(len(labels), max(3, int(width // 2.3))) if labels else 1
    legend_rows = -(-len(labels) // ncol) if labels else 0
    bottom = (0.25 + 0.22 * legend_rows) / height
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.6 / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_plot(records, path, title):
    """TFLOP/s against seqlen, one panel per (dtype, causal, head_dim): fastattn (dense, varlen,
    paged), SDPA flash, SDPA cuDNN."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return "no plot (matplotlib unavailable: %s)" % type(e).__name__
    rows_keys = sorted({(r["dtype"], r["causal"]) for r in records},
                       key=lambda x: (DTYPES.index(x[0]) if x[0] in DTYPES else 9, x[1]))
    cols = sorted({r["head_dim"] for r in records})
    width = max(4.6 * len(cols), 9.0)
    fig, axes = plt.subplots(len(rows_keys), len(cols), figsize=(width, 3.4 * len(rows_keys) + 1.2),
                             squeeze=False, sharex=True)
    styles = [("fastattn", "fastattn", dict(color="C0", lw=2.2, marker="o")),
              ("fastattn-varlen", "fastattn varlen", dict(color="C0", lw=1, ls="--", marker=".")),
              ("fastattn-paged16", "fastattn paged 16", dict(color="C2", lw=1, ls=":", marker=".")),
              ("fastattn-paged256", "fastattn paged 256", dict(color="C4", lw=1, ls="-.", marker="."))]
    others = sorted({k for r in records for k in r["impls"] if k.startswith("fastattn-")}
                    - {k for k, _, _ in styles})  # other page sizes (--variants paged64 ...)
    styles += [(k, k.replace("-", " "), dict(color="C%d" % (5 + i % 5), lw=1, ls="--", marker="."))
               for i, k in enumerate(others)]
    styles += [("sdpa-flash", "SDPA flash", dict(color="C1", lw=1.8, marker="s")),
               ("sdpa-cudnn", "SDPA cuDNN", dict(color="C3", lw=1.8, marker="^"))]
    for i, (dt, causal) in enumerate(rows_keys):
        for j, d in enumerate(cols):
            ax = axes[i][j]
            sub = sorted((r for r in records if r["dtype"] == dt and r["causal"] == causal
                          and r["head_dim"] == d), key=lambda r: r["seqlen"])
            for key, label, st in styles:
                pts = [(r["seqlen"], r["impls"].get(key, {}).get("tflops")) for r in sub]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], label=label, **st)
            ax.set_xscale("log", base=2)
            xs = sorted({r["seqlen"] for r in sub})
            ax.set_xticks(xs)
            ax.set_xticklabels(["%dk" % (x // 1024) if x % 1024 == 0 else str(x) for x in xs],
                               fontsize=8)
            ax.minorticks_off()
            ax.set_title("%s d%d %s" % (dt, d, "causal" if causal else "non-causal"), fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            if j == 0:
                ax.set_ylabel("TFLOP/s")
            if i == len(rows_keys) - 1:
                ax.set_xlabel("seqlen (batch = tokens / seqlen)")
    return finish_figure(plt, fig, axes, width, 3.4 * len(rows_keys) + 1.2, title, path)
