"""GPU cascade suite of ``python -m fastattn.bench`` (the cascade issue's acceptance table).

Shapes: fp16, head_dim 128, 32 query heads over 32 KV heads, page size 16, a shared prefix of
P = 1024, 8192, 32768 tokens, batch B = 16, 64, 128 decode requests (one query row each), each
with a unique suffix of 256 tokens. Every shape is run as

- ``cascade``    BatchDecodeWithSharedPrefixPagedKVCacheWrapper.forward(q, k_shared, v_shared,
                 unique_kv_data) after begin_forward (what a serving loop times per step):
                 k_shared / v_shared (P, 32, 128), unique_kv_data (B * 16 pages, 2, 16, 32, 128)
                 NHD with each request's 16 pages at random places, a 128 MiB workspace_buffer;
- ``paged``      fastattn's own plain paged decode of the same batch with the prefix physically
                 duplicated into every request's pages: flash_attn_with_kvcache(q, k_cache,
                 v_cache, cache_seqlens = P + 256, block_table) over (B * (P + 256) / 16, 16, 32,
                 128) page pools whose pages are in a random permutation (as the decode suite),
                 num_splits = 0 (the heuristic);

and the speedup is paged time / cascade time. Acceptance (the cascade issue): >= 20x at
P = 32768, B = 128. The duplicated cache at that shape is 2 x 128 x 33024 x 32 x 128 x 2 bytes
= 69 GB (an H200 has 141 GB): it is built in place (page pools allocated once, filled with
index copies from the prefix and suffix tensors: no temporaries of its size) and freed before
the next shape; a shape whose cache does not fit in the free memory is recorded as skipped.

Bytes (for the TB/s columns): cascade reads the prefix K/V once and every suffix K/V once,
2 * 2 * (P + B * 256) * Hkv * D bytes, plus q and out; the plain decode reads every request's
P + 256 tokens, 2 * 2 * B * (P + 256) * Hkv * D bytes, plus q and out. TB/s = bytes / median
time (the prefix pass of cascade is partly compute-bound: its rate is not a bandwidth).

Timing (gpu_decode.time_interleaved, .library/device/METHOD.md): CUDA events around every call;
after a correctness call, two warm-up calls and two sizing calls per implementation, the two
implementations of a shape are timed in interleaved rounds (3 rounds of up to 30 calls each), each
round queued behind a GPU sleep long enough for the host to enqueue all of its calls; the figure
is the median over all calls, the spread of the per-round medians the noise estimate. The cascade
inputs are rotated among several sets when they are smaller than twice the L2 cache, so that no
call finds its prefix in L2 from the previous one (a serving loop reads other layers in between).

Correctness: one call of each into an output poisoned with NaN; max |cascade - paged| (the same
attention computed two ways) and both against a float32 torch reference on 4 sampled requests.
A failure, a non-finite output or an error above 2e-2 makes the benchmark exit with status 1.

``--suite cascade`` also runs the merge suite (gpu_merge.py, the merge kernels' table, the same
as ``--suite merge``), so the cascade issue's whole table comes from one command (runner.py).
"""
import math
import statistics
import time
from dataclasses import dataclass
from typing import List

import fastattn

from .gpu_decode import _n_sets, make_sleeper, time_interleaved
from .gpu_prefill import _aligned, _f, _l2_bytes, _short_error, apply_overrides, timing_noise_line, warm_gpu

GiB = 1 << 30
HEADS_Q = 32
HEADS_KV = 32
HEAD_DIM = 128
PAGE_SIZE = 16
SUFFIX = 256
PREFIXES = (1024, 8192, 32768)
BATCHES = (16, 64, 128)
QUICK = dict(prefixes=(1024, 8192), batches=(16, 64))
ACCEPT_SPEEDUP = 20.0           # paged time / cascade time ...
ACCEPT_AT = (32768, 128)        # ... at (prefix, batch)
MAX_ERR = 2e-2                  # fp16 outputs of the same attention computed two ways
WORKSPACE_BYTES = 128 << 20     # the wrapper's workspace_buffer (FlashInfer's usual size)
CASCADE, PAGED = "cascade", "paged"


@dataclass
class Settings:
    """Full mode: 9 shapes x 2 implementations, about a minute on an H200 (building the duplicated
    caches and the plain decode of the 32k shapes dominate); --quick: 4 shapes, no 32k."""
    prefixes: tuple = PREFIXES
    batches: tuple = BATCHES
    heads_q: int = HEADS_Q
    heads_kv: int = HEADS_KV
    head_dim: int = HEAD_DIM
    page_size: int = PAGE_SIZE
    suffix: int = SUFFIX
    rounds: int = 3
    budget_s: float = 0.5
    min_calls: int = 9
    max_calls: int = 90
    warmup: int = 2
    queue_ahead: bool = True
    time_limit_s: float = 150.0   # informational: the shapes are few, each bounded by max_calls
    seed: int = 0

    @classmethod
    def for_mode(cls, quick, **overrides):
        s = cls()
        if quick:
            s = cls(prefixes=QUICK["prefixes"], batches=QUICK["batches"], rounds=2, budget_s=0.1,
                    min_calls=6, max_calls=40, time_limit_s=20.0)
        return apply_overrides(s, overrides)


@dataclass
class Shape:
    prefix: int
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    page_size: int
    suffix: int

    @property
    def name(self):
        return "fp16 d%d %d/%d P%d b%d s%d" % (self.head_dim, self.heads_q, self.heads_kv,
                                               self.prefix, self.batch, self.suffix)

    def kv_token_bytes(self):
        return 2 * 2 * self.heads_kv * self.head_dim  # K and V, fp16

    def qo_bytes(self):
        return 2 * 2 * self.batch * self.heads_q * self.head_dim

    @property
    def cascade_bytes(self):
        return float(self.kv_token_bytes() * (self.prefix + self.batch * self.suffix) + self.qo_bytes())

    @property
    def paged_bytes(self):
        return float(self.kv_token_bytes() * self.batch * (self.prefix + self.suffix) + self.qo_bytes())

    @property
    def paged_cache_bytes(self):
        pages = self.batch * (-(-(self.prefix + self.suffix) // self.page_size))
        return float(pages * self.page_size * self.kv_token_bytes())


def plan(settings: Settings) -> List[Shape]:
    return [Shape(p, b, settings.heads_q, settings.heads_kv, settings.head_dim, settings.page_size,
                  settings.suffix) for p in settings.prefixes for b in settings.batches]


# ---- inputs ---------------------------------------------------------------------------------------


class CascadeInputs:
    """q, the shared prefix and the unique suffix pages (NHD, random page placement), and a decode
    wrapper planned for them."""

    def __init__(self, torch, shape: Shape, gen):
        dev = torch.device("cuda")
        dt = torch.float16
        b, hq, hkv, d, ps = shape.batch, shape.heads_q, shape.heads_kv, shape.head_dim, shape.page_size
        npp = -(-shape.suffix // ps)
        self.q = torch.randn(b, hq, d, device=dev, dtype=dt)
        self.k_shared = torch.randn(shape.prefix, hkv, d, device=dev, dtype=dt)
        self.v_shared = torch.randn(shape.prefix, hkv, d, device=dev, dtype=dt)
        self.kv_data = torch.randn(b * npp, 2, ps, hkv, d, device=dev, dtype=dt)
        perm = torch.randperm(b * npp, generator=gen).to(torch.int32).to(dev)
        self.indices = perm                                   # request r: perm[r*npp:(r+1)*npp]
        self.indptr = torch.arange(0, b * npp + 1, npp, device=dev, dtype=torch.int32)
        last = shape.suffix - (npp - 1) * ps
        self.last = torch.full((b,), last, device=dev, dtype=torch.int32)
        self.npp = npp
        self.wrapper = fastattn.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev))
        self.wrapper.begin_forward(self.indptr, self.indices, self.last, hq, hkv, d, ps, "float16")

    def call(self):
        return self.wrapper.forward(self.q, self.k_shared, self.v_shared, self.kv_data)


class PagedCopy:
    """The same batch as plain paged decode: every request's pages hold the prefix, then its own
    suffix; pages of all requests in a random permutation of one pool per K and V. Filled with
    index copies from the cascade inputs (no temporary of the pool's size)."""

    def __init__(self, torch, shape: Shape, inp: CascadeInputs, gen):
        dev = torch.device("cuda")
        b, hkv, d, ps = shape.batch, shape.heads_kv, shape.head_dim, shape.page_size
        assert shape.prefix % ps == 0, "the prefix fills whole pages"
        ppp = shape.prefix // ps                      # prefix pages per request
        npp = ppp + inp.npp                           # pages per request
        n = b * npp
        self.k = torch.empty((n, ps, hkv, d), device=dev, dtype=torch.float16)
        self.v = torch.empty_like(self.k)
        perm = torch.randperm(n, generator=gen).to(dev)
        self.table = perm.reshape(b, npp).to(torch.int32).contiguous()
        kp = inp.k_shared.view(ppp, ps, hkv, d)
        vp = inp.v_shared.view(ppp, ps, hkv, d)
        sk, sv = inp.kv_data[:, 0], inp.kv_data[:, 1]
        sfx = inp.indices.long().view(b, inp.npp)
        for r in range(b):
            rows = perm[r * npp:(r + 1) * npp]
            self.k[rows[:ppp]] = kp
            self.v[rows[:ppp]] = vp
            self.k[rows[ppp:]] = sk[sfx[r]]
            self.v[rows[ppp:]] = sv[sfx[r]]
        self.seqlens = torch.full((b,), shape.prefix + shape.suffix, device=dev, dtype=torch.int32)
        self.q4 = inp.q.view(b, 1, shape.heads_q, d)

    def call(self):
        return fastattn.flash_attn_with_kvcache(self.q4, self.k, self.v, cache_seqlens=self.seqlens,
                                                block_table=self.table)


def reference_f32(torch, inp: CascadeInputs, shape: Shape, rows):
    """float32 attention of the sampled requests over prefix + suffix: (len(rows), Hq, D)."""
    outs = []
    g = shape.heads_q // shape.heads_kv
    scale = 1.0 / math.sqrt(shape.head_dim)
    for r in rows:
        pages = inp.indices[r * inp.npp:(r + 1) * inp.npp].long()
        ks = inp.kv_data[pages, 0].reshape(-1, shape.heads_kv, shape.head_dim)[:shape.suffix]
        vs = inp.kv_data[pages, 1].reshape(-1, shape.heads_kv, shape.head_dim)[:shape.suffix]
        k = torch.cat([inp.k_shared, ks]).float().repeat_interleave(g, dim=1)  # (L, Hq, D)
        v = torch.cat([inp.v_shared, vs]).float().repeat_interleave(g, dim=1)
        q = inp.q[r].float()                                                  # (Hq, D)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(outs)


# ---- one shape ------------------------------------------------------------------------------------


def base_record(shape: Shape):
    return {"name": shape.name, "prefix": shape.prefix, "batch": shape.batch,
            "suffix": shape.suffix, "heads_q": shape.heads_q, "heads_kv": shape.heads_kv,
            "head_dim": shape.head_dim, "page_size": shape.page_size,
            "cascade_bytes": shape.cascade_bytes, "paged_bytes": shape.paged_bytes,
            "paged_cache_bytes": shape.paged_cache_bytes, "impls": {}, "speedup": None}


def _max_err(a, b):
    return float((a.float() - b.float()).abs().max())


def measure_shape(torch, shape: Shape, settings: Settings, gen, l2_bytes, sleeper):
    rec = base_record(shape)
    n_sets = _n_sets(shape.cascade_bytes, l2_bytes)
    rec["cascade_input_sets"] = n_sets
    sets = [CascadeInputs(torch, shape, gen) for _ in range(n_sets)]
    s0 = sets[0]
    fns = {}
    outs = {}
    # Correctness: the functional form of the same call (the wrapper's forward has no out=) into
    # a NaN-poisoned output, with the sizes the wrapper planned.
    try:
        y = torch.full_like(s0.q, float("nan"))
        fastattn.shared_prefix_attention(
            s0.q, s0.k_shared, s0.v_shared, s0.kv_data[:, 0], s0.kv_data[:, 1], s0.indptr,
            s0.indices, s0.last, out=y, max_seqlen_q=1, max_suffix_len=shape.suffix)
        s0.call()  # the wrapper once before timing (planning checks)
        torch.cuda.synchronize()
        outs[CASCADE] = y
        rec["impls"][CASCADE] = {"finite": bool(torch.isfinite(y).all())}
        calls = [st.call for st in sets]
        state = [0]

        def run_cascade():
            i = state[0]
            state[0] = (i + 1) % len(calls)
            return calls[i]()
        fns[CASCADE] = run_cascade
    except Exception as e:  # noqa: BLE001
        rec["impls"][CASCADE] = {"s": None, "error": _short_error(e), "failed": True}
    paged = None
    try:
        paged = PagedCopy(torch, shape, s0, gen)
        out = torch.full_like(paged.q4, float("nan"))
        y = fastattn.flash_attn_with_kvcache(paged.q4, paged.k, paged.v, cache_seqlens=paged.seqlens,
                                             block_table=paged.table, out=out)
        torch.cuda.synchronize()
        outs[PAGED] = y[:, 0]
        rec["impls"][PAGED] = {"finite": bool(torch.isfinite(y).all())}
        fns[PAGED] = paged.call
    except Exception as e:  # noqa: BLE001 (out of memory included: the row says so)
        rec["impls"][PAGED] = {"s": None, "error": _short_error(e), "failed": "out of memory" not in str(e)}
        paged = None
        torch.cuda.empty_cache()
    if CASCADE in outs and PAGED in outs:
        rec["impls"][CASCADE]["max_abs_err_vs_paged"] = _max_err(outs[CASCADE], outs[PAGED])
    rows = list(range(0, shape.batch, max(1, shape.batch // 4)))[:4]
    ref = reference_f32(torch, s0, shape, rows)
    for key, y in outs.items():
        rec["impls"][key]["max_abs_err_vs_f32"] = _max_err(y[rows], ref)
    del outs, ref

    t0 = time.perf_counter()
    stats = time_interleaved(torch, fns, settings, settings.budget_s, sleeper) if fns else {}
    timed = time.perf_counter() - t0
    for key, st in stats.items():
        info = rec["impls"].setdefault(key, {})
        info.update(st)
        info["bytes"] = shape.cascade_bytes if key == CASCADE else shape.paged_bytes
        info["tbps"] = info["bytes"] / st["s"] / 1e12
    c, p = rec["impls"].get(CASCADE, {}).get("s"), rec["impls"].get(PAGED, {}).get("s")
    rec["speedup"] = (p / c) if (c and p) else None
    del sets, s0, paged, fns
    return rec, timed


def skipped_record(shape, reason):
    rec = base_record(shape)
    rec["skipped"] = reason
    return rec


def run_suite(torch, settings: Settings, log=print):
    """Runs every shape. Returns (records, meta): per shape impls[cascade | paged] = {s, tbps,
    bytes, runs, ..., finite, max_abs_err_vs_paged, max_abs_err_vs_f32, error} and speedup."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed)
    l2 = _l2_bytes(torch)
    warm_gpu(torch)
    sleeper = make_sleeper(torch) if settings.queue_ahead else None
    records = []
    shapes = plan(settings)
    for i, shape in enumerate(shapes):
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        need = shape.paged_cache_bytes + 4 * shape.cascade_bytes + GiB
        if need > free:
            rec = skipped_record(shape, "needs ~%.0f GiB of GPU memory, %.0f GiB free" % (need / GiB, free / GiB))
            records.append(rec)
            log("  [%d/%d] %-34s skipped: %s" % (i + 1, len(shapes), shape.name, rec["skipped"]), flush=True)
            continue
        torch.manual_seed(settings.seed * 1000003 + i)
        t0 = time.perf_counter()
        try:
            rec, timed = measure_shape(torch, shape, settings, gen, l2, sleeper)
        except Exception as e:  # noqa: BLE001
            rec, timed = base_record(shape), 0.0
            rec["error"] = _short_error(e)
        rec["wall_s"] = time.perf_counter() - t0
        rec["timed_s"] = timed
        records.append(rec)
        torch.cuda.empty_cache()
        log("  [%d/%d] %-34s %s  (%.1f s)" % (i + 1, len(shapes), shape.name, _brief(rec), rec["wall_s"]),
            flush=True)
    meta = {"elapsed_s": time.perf_counter() - start, "l2_bytes": l2,
            "queue_ahead": sleeper is not None, "workspace_bytes": WORKSPACE_BYTES,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()}}
    return records, meta


# ---- report ---------------------------------------------------------------------------------------


def _us(s):
    return "%.1f" % (s * 1e6) if s < 1e-2 else "%.0f" % (s * 1e6)


def _time_cell(rec, key):
    if rec.get("skipped"):
        return "skip"
    info = rec["impls"].get(key)
    if info is None:
        return "error" if rec.get("error") else "-"
    if info.get("s") is not None:
        return _us(info["s"])
    return "n/a" if info.get("error") else "-"


def _brief(rec):
    return "cascade %s us, paged %s us, speedup %s" % (
        _time_cell(rec, CASCADE), _time_cell(rec, PAGED), _f(rec.get("speedup"), "%.1fx"))


def format_table(records):
    head = ["shape", "cascade us", "TB/s", "paged us", "TB/s", "speedup", "err vs paged", "err vs f32"]
    lines = []
    for r in records:
        c, p = r["impls"].get(CASCADE, {}), r["impls"].get(PAGED, {})
        nonfinite = c.get("finite") is False or p.get("finite") is False
        errs = [x for x in (c.get("max_abs_err_vs_f32"), p.get("max_abs_err_vs_f32")) if x is not None]
        lines.append([r["name"], _time_cell(r, CASCADE), _f(c.get("tbps"), "%.2f"),
                      _time_cell(r, PAGED), _f(p.get("tbps"), "%.2f"), _f(r.get("speedup"), "%.1fx"),
                      "NaN!" if nonfinite else _f(c.get("max_abs_err_vs_paged"), "%.1e"),
                      "%.1e" % max(errs) if errs else "-"])
    out = _aligned(head, lines)
    notes = sorted({"%s %s: %s" % (r["name"], k, i["error"]) for r in records
                    for k, i in r["impls"].items() if i.get("error")})
    notes += ["%s: %s" % (r["name"], r["skipped"]) for r in records if r.get("skipped")]
    notes += ["%s: %s" % (r["name"], r["error"]) for r in records if r.get("error")]
    for n in notes[:6]:
        out.append("n/a: " + (n if len(n) <= 240 else n[:237] + "..."))
    out.append("cascade = BatchDecodeWithSharedPrefixPagedKVCacheWrapper.forward; paged = "
               "flash_attn_with_kvcache over the prefix duplicated into every request's pages; "
               "speedup = paged time / cascade time; TB/s = bytes each must read / median time; "
               "err = max |out - other| (paged: the same attention; f32: 4 sampled requests)")
    return "\n".join(out)


def summarize(records):
    s = {"accept_speedup": ACCEPT_SPEEDUP, "accept_at": list(ACCEPT_AT)}
    at = [r for r in records if (r["prefix"], r["batch"]) == ACCEPT_AT]
    s["speedup_at"] = at[0].get("speedup") if at else None
    if not at:
        s["status"] = "NOT RUN"
    elif s["speedup_at"] is None:
        s["status"] = "NO FIGURE"
    else:
        s["status"] = "PASS" if s["speedup_at"] >= ACCEPT_SPEEDUP else "FAIL"
    sp = [(r["speedup"], r["name"]) for r in records if r.get("speedup")]
    if sp:
        s["min_speedup"], s["min_at"] = min(sp)
        s["max_speedup"], s["max_at"] = max(sp)
    spreads = [i["spread"] for r in records for i in r["impls"].values() if "spread" in i]
    s["timing_spread"] = {"median": statistics.median(spreads), "max": max(spreads)} if spreads else None
    errs = [r["impls"].get(CASCADE, {}).get("max_abs_err_vs_f32") for r in records]
    errs = [e for e in errs if e is not None]
    s["max_err_cascade_vs_f32"] = max(errs) if errs else None
    s["bad"] = bad_records(records)
    return s


def summary_lines(s, gpu, date, command):
    lines = ["### GPU cascade summary: %s, %s" % (gpu, date), "`%s`" % command]
    lines.append("- acceptance: cascade >= %.0fx faster than plain paged decode at prefix %d, batch "
                 "%d: %s -> %s" % (ACCEPT_SPEEDUP, ACCEPT_AT[0], ACCEPT_AT[1],
                                   _f(s.get("speedup_at"), "%.1fx"), s["status"]))
    if s.get("min_speedup") is not None:
        lines.append("- speedup over all rows: min %.1fx (%s), max %.1fx (%s)"
                     % (s["min_speedup"], s["min_at"], s["max_speedup"], s["max_at"]))
    lines.append("- max |cascade - float32 reference| (sampled requests): %s"
                 % _f(s.get("max_err_cascade_vs_f32"), "%.1e"))
    if timing_noise_line(s.get("timing_spread")):
        lines.append(timing_noise_line(s.get("timing_spread")))
    if s["bad"]:
        lines.append("- FAILED rows: %s" % "; ".join(s["bad"][:6]))
    return lines


def bad_records(records):
    """Rows where an implementation failed (not for lack of memory), wrote non-finite output or
    disagrees with the float32 reference by more than MAX_ERR."""
    bad = []
    for r in records:
        if r.get("error"):
            bad.append("%s (%s)" % (r["name"], r["error"]))
        for key, info in r["impls"].items():
            if info.get("failed"):
                bad.append("%s %s (%s)" % (r["name"], key, info.get("error")))
            elif info.get("finite") is False:
                bad.append("%s %s (non-finite output)" % (r["name"], key))
            elif (info.get("max_abs_err_vs_f32") or 0.0) > MAX_ERR:
                bad.append("%s %s (max error %.2g vs float32)" % (r["name"], key, info["max_abs_err_vs_f32"]))
    return bad
