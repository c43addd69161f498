"""GPU merge suite of ``python -m fastattn.bench`` (``--suite merge``): the CUDA merge kernels
against the copy bandwidth measured in the same run.

Shapes: 32 heads, head_dim 128, S = 4096 and 65536 rows, float16 and float32 values, for
``merge_state`` (two states: v_a, v_b (S, H, D), s_a, s_b (S, H)) and ``merge_states`` over N = 2
and N = 8 states (v (S, N, H, D), s (S, N, H)), all contiguous, every LSE finite (no empty state).
Each call goes through ``fastattn._C`` into preallocated outputs on torch's current stream (the
wrappers' own output allocation is not timed). ``merge_state_in_place`` runs the same kernel as
``merge_state`` with the output on an input and is not timed separately.

Bytes (merge_bytes): every read and write once, (N + 1) * S * H * (D * elem + 4): N value tensors
and N LSE tensors read, one value and one LSE tensor written (N = 2 for merge_state). A rate is
these bytes over the median time (TB/s = 1e12 B/s). The ceiling is the copy bandwidth measured in
the same run: ``dst.copy_(src)`` on a 2 GiB buffer, (read + write bytes) / median time, before and
after the shapes (the higher of the two; ~4.3 TB/s on an H200), as gpu_decode.measure_copy.

Timing (.library/device/METHOD.md, as gpu_decode): CUDA events around every call; after a probe
call, a correctness call, two warm-up calls and two sizing calls, calls are timed in interleaved
rounds (3 rounds of up to 30 calls each), the figure is the median over all calls and the spread of
the per-round medians is the noise estimate. Each round is queued behind a GPU sleep long enough
for the host to enqueue all of its calls (gpu_decode.make_sleeper; the small shapes take ~20 us,
about the host cost of a call), so the events time the GPU work back to back. Shapes under twice
the L2 size rotate among several input sets so that no call finds its inputs in L2. A deadline
(``--time-limit``, 60 s; 20 s with --quick) shrinks the calls per shape when the run is behind.

Correctness: one call into NaN-poisoned outputs, compared with a float32 torch merge of the same
inputs (max |error| of the values and the LSE recorded); a failure or a non-finite output makes the
benchmark exit with status 1 (bad_records).

Acceptance (summarize / summary_lines): fastattn >= 80% of the copy bandwidth on every row that
moves >= 64 MiB.

``run(torch, ...)`` runs the suite and returns (records, lines): one record per shape and the
summary lines (table and acceptance); ``run_suite`` / ``summarize`` / ``summary_lines`` /
``format_table`` are the pieces, for the bench runner's JSON.
"""
import math
import statistics
import time
from dataclasses import dataclass
from typing import List

from .gpu_decode import _n_sets, _us, add_copy_fractions, make_sleeper, measure_copy, time_interleaved
from .gpu_prefill import (Deadline, _aligned, _cycle, _f, _l2_bytes, _short_error, _torch_dtype, apply_overrides,
                          timing_noise_line, warm_gpu)
from .gpu_prefill import bad_records  # noqa: F401  (the same check for merge records)

GiB = 1 << 30
MiB = 1 << 20
OPS = (("merge_state", 2), ("merge_states", 2), ("merge_states", 8))
DTYPES = ("fp16", "fp32")
SEQLENS = (4096, 65536)
HEADS = 32
HEAD_DIM = 128
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
MAX_SET_BYTES = 24 * GiB      # inputs + outputs of one input set; larger shapes are skipped
COPY_BYTES = 2 * GiB          # source buffer of the copy-bandwidth ceiling (dst as large)
ACCEPT_BW_FRACTION = 0.80     # fastattn >= 80% of the copy bandwidth ...
ACCEPT_MIN_BYTES = 64 * MiB   # ... on rows moving at least 64 MiB
KEY = "fastattn"


@dataclass
class Settings:
    """What to run and how long to spend. Full mode: 12 shapes (3 ops x 2 dtypes x 2 lengths),
    about 20 s on an H200 (input set-up dominates); --quick: float16 only."""
    ops: tuple = OPS
    dtypes: tuple = DTYPES
    seqlens: tuple = SEQLENS
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    max_set_bytes: int = MAX_SET_BYTES
    copy_bytes: int = COPY_BYTES
    rounds: int = 3             # interleaved timing rounds per shape
    budget_s: float = 0.3       # timed wall time per shape (upper bound)
    min_budget_s: float = 0.005  # lower bound when the deadline squeezes
    min_calls: int = 9          # timed calls per shape, at least (over all rounds)
    max_calls: int = 90         # ... and at most (30 per round)
    warmup: int = 2
    queue_ahead: bool = True    # queue each round behind a GPU sleep (see the module notes)
    time_limit_s: float = 60.0
    seed: int = 0

    @classmethod
    def for_mode(cls, quick, **overrides):
        s = cls()
        if quick:
            s = cls(dtypes=("fp16",), rounds=2, budget_s=0.1, min_calls=6, max_calls=40,
                    time_limit_s=20.0)
        return apply_overrides(s, overrides)


def merge_bytes(num_states, seqlen, heads, head_dim, elem_bytes):
    """Device-memory bytes of one merge: num_states value tensors (S, H, D) and LSE tensors (S, H)
    float32 read, one of each written: (N + 1) * S * H * (D * elem + 4)."""
    return float((num_states + 1) * seqlen * heads * (head_dim * elem_bytes + 4))


@dataclass
class Shape:
    op: str
    num_states: int
    dtype: str
    seqlen: int
    heads: int
    head_dim: int

    @property
    def name(self):
        op = self.op if self.op == "merge_state" else "%s N%d" % (self.op, self.num_states)
        return "%s %s S%d" % (op, self.dtype, self.seqlen)

    @property
    def elem_bytes(self):
        return ELEM_BYTES[self.dtype]

    @property
    def bytes(self):
        return merge_bytes(self.num_states, self.seqlen, self.heads, self.head_dim, self.elem_bytes)

    def skip_reason(self, settings):
        if self.bytes > settings.max_set_bytes:
            return "inputs + outputs %.4g GiB > %.4g GiB limit" % (self.bytes / GiB,
                                                                 settings.max_set_bytes / GiB)
        return None


def plan(settings: Settings) -> List[Shape]:
    """The shapes, shortest sequences first: a ~30 us row timed right after the multi-GB float32
    rows ran 8% slower than the same row timed after another short one, in the same process
    (29.3 -> 31.9 us, merge_states N2 fp16 S4096; bench/NOTES.md), so no short row follows a long
    one."""
    return [Shape(op, n, dt, s, settings.heads, settings.head_dim)
            for s in settings.seqlens for op, n in settings.ops for dt in settings.dtypes]


class InputSet:
    """One set of inputs and outputs for a shape: merge_state's two states or merge_states'
    stacked ones (LSEs ~ 5 +- 2: weights of all sizes, none empty), outputs preallocated."""

    def __init__(self, torch, shape: Shape):
        dev = torch.device("cuda")
        dt = _torch_dtype(torch, shape.dtype)
        S, N, H, D = shape.seqlen, shape.num_states, shape.heads, shape.head_dim
        self.shape = shape
        if shape.op == "merge_state":
            self.v = [torch.randn(S, H, D, device=dev, dtype=dt) for _ in range(2)]
            self.s = [torch.randn(S, H, device=dev, dtype=torch.float32) * 2 + 5 for _ in range(2)]
        else:
            self.v = torch.randn(S, N, H, D, device=dev, dtype=dt)
            self.s = torch.randn(S, N, H, device=dev, dtype=torch.float32) * 2 + 5
        self.v_out = torch.empty(S, H, D, device=dev, dtype=dt)
        self.s_out = torch.empty(S, H, device=dev, dtype=torch.float32)

    def call(self, torch):
        from fastattn import _C
        stream = int(torch.cuda.current_stream().cuda_stream)
        if self.shape.op == "merge_state":
            (va, vb), (sa, sb) = self.v, self.s
            return lambda: _C.merge_state(va, sa, vb, sb, self.v_out, self.s_out, cuda_stream=stream)
        return lambda: _C.merge_states(self.v, self.s, self.v_out, self.s_out, cuda_stream=stream)

    def stacked(self, torch):
        """(v (S, N, H, D), s (S, N, H)) views of the inputs (stacked copies for merge_state)."""
        if self.shape.op == "merge_state":
            return torch.stack(self.v, 1), torch.stack(self.s, 1)
        return self.v, self.s


def reference_f32(torch, v, s, rows_per_chunk=4096):
    """float32 torch merge of v (S, N, H, D), s (S, N, H) (all finite): (out float32, lse)."""
    outs, lses = [], []
    for i in range(0, v.shape[0], rows_per_chunk):
        vc, sc = v[i:i + rows_per_chunk].float(), s[i:i + rows_per_chunk].float()
        lse = torch.logsumexp(sc, dim=1)
        w = torch.exp(sc - lse[:, None])
        outs.append((vc * w[..., None]).sum(1))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def base_record(shape: Shape):
    return {"name": shape.name, "op": shape.op, "num_states": shape.num_states,
            "dtype": shape.dtype, "seqlen": shape.seqlen, "heads": shape.heads,
            "head_dim": shape.head_dim, "bytes": shape.bytes, "impls": {}}


def measure_shape(torch, shape: Shape, settings: Settings, budget_s, l2_bytes, sleeper=None):
    """Builds the inputs of one shape, checks the result and times the calls. Returns its record
    and the seconds spent in timed rounds."""
    rec = base_record(shape)
    n_sets = _n_sets(shape.bytes, l2_bytes)
    rec["input_sets"] = n_sets
    sets = [InputSet(torch, shape) for _ in range(n_sets)]
    s0 = sets[0]
    info = rec["impls"].setdefault(KEY, {"bytes": shape.bytes})
    fn = None
    try:
        s0.call(torch)()  # probe (first launch)
        torch.cuda.synchronize()
        fn = _cycle([st.call(torch) for st in sets])
    except NotImplementedError as e:
        info.update(s=None, error=_short_error(e), not_implemented=True)
    except Exception as e:
        info.update(s=None, error=_short_error(e), failed=True)
    if fn is not None:
        # Correctness: into NaN-poisoned outputs, against a float32 torch merge.
        s0.v_out.fill_(float("nan"))
        s0.s_out.fill_(float("nan"))
        try:
            s0.call(torch)()
            torch.cuda.synchronize()
            v, s = s0.stacked(torch)
            ref_v, ref_s = reference_f32(torch, v, s)
            info["finite"] = bool(torch.isfinite(s0.v_out).all()) and bool(torch.isfinite(s0.s_out).all())
            info["max_abs_err"] = float((s0.v_out.float() - ref_v).abs().max())
            info["max_lse_err"] = float((s0.s_out - ref_s).abs().max())
            del v, s, ref_v, ref_s
        except Exception as e:
            info["check_error"] = _short_error(e)
    t0 = time.perf_counter()
    stats = time_interleaved(torch, {KEY: fn}, settings, budget_s, sleeper) if fn else {}
    timed = time.perf_counter() - t0
    for key, st in stats.items():
        rec["impls"][key].update(st)
        rec["impls"][key]["tbps"] = shape.bytes / st["s"] / 1e12
    del sets, s0, fn
    return rec, timed


def skipped_record(shape: Shape, reason):
    rec = base_record(shape)
    rec["skipped"] = reason
    return rec


def run_suite(torch, settings: Settings, log=print):
    """Runs every shape of the plan. Returns (records, meta): one record per shape with
    impls["fastattn"] = {s, tbps, bytes, copy_fraction, runs, host_s, ..., max_abs_err,
    max_lse_err, finite, error}; meta has the copy bandwidth (meta["copy"]["tbps"])."""
    shapes = plan(settings)
    n_active = sum(1 for s in shapes if not s.skip_reason(settings))
    deadline = Deadline(settings, max(1, n_active), 1,
                        first_overhead_s=1.0 if settings.budget_s > 0.2 else 0.3)
    l2 = _l2_bytes(torch)
    warm_gpu(torch)
    sleeper = make_sleeper(torch) if settings.queue_ahead else None
    copy_start = measure_copy(torch, settings, sleeper)
    log("  copy bandwidth (dst.copy_(src), %.1f GiB): %.2f TB/s" % (
        copy_start["buffer_bytes"] / GiB, copy_start["tbps"]), flush=True)
    records = []
    for i, shape in enumerate(shapes):
        reason = shape.skip_reason(settings)
        if reason is None:
            free = torch.cuda.mem_get_info()[0]
            need = 2 * shape.bytes + GiB  # a set, plus the stacked copies and the reference
            if need > free:
                reason = "needs ~%.0f GiB of GPU memory, %.0f GiB free" % (need / GiB, free / GiB)
        if reason:
            records.append(skipped_record(shape, reason))
            log("  [%2d/%d] %-28s skipped: %s" % (i + 1, len(shapes), shape.name, reason), flush=True)
            continue
        torch.manual_seed(settings.seed * 1000003 + i)
        budget = deadline.impl_budget()
        t0 = time.perf_counter()
        try:
            rec, timed = measure_shape(torch, shape, settings, budget, l2, sleeper)
        except Exception as e:  # e.g. out of memory: keep the row, keep going
            rec = base_record(shape)
            rec["error"] = _short_error(e)
            timed = 0.0
        rec["budget_s"] = budget
        rec["wall_s"] = time.perf_counter() - t0
        deadline.timed_s += timed
        deadline.done += 1
        records.append(rec)
        torch.cuda.empty_cache()
        tb = rec["impls"].get(KEY, {}).get("tbps")
        log("  [%2d/%d] %-28s %s TB/s  (%.1f s)" % (i + 1, len(shapes), shape.name,
                                                    "n/a" if tb is None else "%.2f" % tb,
                                                    rec["wall_s"]), flush=True)
    copy_end = measure_copy(torch, settings, sleeper)
    copy_tbps = max(copy_start["tbps"], copy_end["tbps"])
    add_copy_fractions(records, copy_tbps)
    meta = {"elapsed_s": time.perf_counter() - deadline.start, "l2_bytes": l2,
            "copy": {"tbps": copy_tbps, "start": copy_start, "end": copy_end,
                     "method": "dst.copy_(src) of a bf16 buffer; bytes = 2 x buffer (read + "
                               "write); ceiling = the higher of the measurements before and "
                               "after the shapes"},
            "queue_ahead": sleeper is not None,
            "sleep_cycles_per_s": getattr(sleeper, "cycles_per_s", None),
            "settings": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in settings.__dict__.items()},
            "bytes_convention": "(N + 1) x S x H x (D x elem + 4): N value and LSE tensors read, "
                                "one of each written; contiguous tensors, fastattn._C into "
                                "preallocated outputs"}
    return records, meta


# ---- report ---------------------------------------------------------------------------------------


def format_table(records, copy_tbps=None):
    head = ["shape", "MiB", "time us", "TB/s", "%copy", "max err", "lse err", "noise"]
    lines = []
    for r in records:
        info = r["impls"].get(KEY, {})
        if r.get("skipped") or r.get("error") or info.get("s") is None:
            why = "skip" if r.get("skipped") else ("error" if r.get("error") else "n/a")
            lines.append([r["name"], "%.0f" % (r["bytes"] / MiB), why, "-", "-", "-", "-", "-"])
            continue
        frac = info.get("copy_fraction")
        err = info.get("max_abs_err")
        lines.append([r["name"], "%.0f" % (r["bytes"] / MiB), _us(info["s"]), "%.2f" % info["tbps"],
                      "-" if frac is None else "%.0f%%" % (100 * frac),
                      "NaN!" if info.get("finite") is False else _f(err, "%.1e"),
                      _f(info.get("max_lse_err"), "%.1e"),
                      "%.1f%%" % (100 * info.get("spread", 0.0))])
    out = _aligned(head, lines)
    notes = sorted({info.get("error") or info.get("check_error")
                    for r in records for info in r["impls"].values()
                    if info.get("error") or info.get("check_error")})
    notes += sorted("%s (%s)" % (r["name"], r["skipped"]) for r in records if r.get("skipped"))
    notes += sorted("%s: %s" % (r["name"], r["error"]) for r in records if r.get("error"))
    for n in notes[:5]:
        out.append("n/a: " + (n if len(n) <= 240 else n[:237] + "..."))
    out.append("TB/s = (N + 1) x S x H x (D x elem + 4) bytes / median time%s; %%copy = TB/s / copy "
               "bandwidth; max err = max |fastattn - float32 torch merge|; 32 heads, head_dim 128"
               % (" (copy bandwidth %.2f TB/s)" % copy_tbps if copy_tbps else ""))
    return "\n".join(out)


def summarize(records, copy_tbps, budget_s=None):
    """The acceptance figures as a dict (summary_lines makes the lines)."""
    rows = [r for r in records if not r.get("skipped")]

    def frac(r):
        t = r["impls"].get(KEY, {}).get("tbps")
        return None if (t is None or not copy_tbps) else t / copy_tbps

    big = [(r["name"], frac(r)) for r in rows if r["bytes"] >= ACCEPT_MIN_BYTES]
    have = [(v, n) for n, v in big if v is not None]
    s = {"copy_tbps": copy_tbps,
         "bandwidth": {"n": len(have), "of": len(big),
                       "missing": [n for n, v in big if v is None],
                       "failing": [[n, v] for v, n in sorted(have) if v < ACCEPT_BW_FRACTION]}}
    b = s["bandwidth"]
    if have:
        lo, hi = min(have), max(have)
        b.update(min=lo[0], min_at=lo[1], max=hi[0], max_at=hi[1],
                 median=statistics.median(v for v, _ in have))
    b["status"] = ("NO ROWS" if not big else "FAIL" if b["failing"]
                   else "INCOMPLETE" if b["missing"] else "PASS")
    per_op = {}
    for r in rows:
        f = frac(r)
        if f is not None:
            key = r["op"] if r["op"] == "merge_state" else "%s N%d" % (r["op"], r["num_states"])
            per_op.setdefault(key, []).append(f)
    s["per_op_min_fraction"] = {k: min(v) for k, v in per_op.items()}
    s["skipped"] = [[r["name"], r["skipped"]] for r in records if r.get("skipped")]
    s["fastattn_na"] = {"n": sum(1 for r in rows if r["impls"].get(KEY, {}).get("s") is None),
                        "of": len(rows)}
    errs = [r["impls"].get(KEY, {}).get("max_abs_err") for r in rows]
    s["max_err"] = max((e for e in errs if e is not None and math.isfinite(e)), default=None)
    lerrs = [r["impls"].get(KEY, {}).get("max_lse_err") for r in rows]
    s["max_lse_err"] = max((e for e in lerrs if e is not None and math.isfinite(e)), default=None)
    s["nonfinite"] = [r["name"] for r in rows if r["impls"].get(KEY, {}).get("finite") is False]
    spreads = [r["impls"][KEY]["spread"] for r in rows if "spread" in r["impls"].get(KEY, {})]
    s["timing_spread"] = ({"median": statistics.median(spreads), "max": max(spreads)}
                          if spreads else None)
    s["host_bound"] = [r["name"] for r in rows if r["impls"].get(KEY, {}).get("host_bound_rounds")]
    if budget_s is not None:
        s["budget_squeezed"] = sum(1 for r in rows if r.get("budget_s", budget_s) < 0.999 * budget_s)
    return s


def summary_lines(s, gpu, date, command):
    copy = s.get("copy_tbps")
    lines = ["### GPU merge summary: %s, %s" % (gpu, date), "`%s`" % command,
             "- copy bandwidth measured in this run (dst.copy_(src), read + write): %s"
             % _f(copy, "%.2f TB/s")]
    b = s["bandwidth"]
    head = ("- fastattn merge kernels >= %.0f%% of the copy bandwidth on rows moving >= %d MiB: "
            % (100 * ACCEPT_BW_FRACTION, ACCEPT_MIN_BYTES // MiB))
    if b["n"]:
        failing = ", ".join("%s %.1f%%" % (n, 100 * v) for n, v in b["failing"][:6])
        missing = ("; %d without figures (%s)" % (len(b["missing"]), ", ".join(b["missing"][:4]))
                   if b["missing"] else "")
        lines.append(head + "min %.1f%% (%s), median %.1f%%, max %.1f%% over %d of %d rows; %d below%s%s -> %s"
                     % (100 * b["min"], b["min_at"], 100 * b["median"], 100 * b["max"], b["n"], b["of"],
                        len(b["failing"]), " (%s)" % failing if failing else "", missing, b["status"]))
    else:
        lines.append(head + "no figures -> %s" % b["status"])
    if s["per_op_min_fraction"]:
        lines.append("- lowest fraction of copy per op (all rows): " + ", ".join(
            "%s %.1f%%" % (k, 100 * v) for k, v in s["per_op_min_fraction"].items()))
    if s["skipped"]:
        lines.append("- skipped rows: %s" % ", ".join("%s (%s)" % (n, why) for n, why in s["skipped"]))
    na = s["fastattn_na"]
    lines.append("- fastattn n/a (no CUDA kernel or failed): %d of %d rows" % (na["n"], na["of"]))
    lines.append("- max |error| vs a float32 torch merge: values %s, LSE %s%s"
                 % (_f(s["max_err"], "%.1e"), _f(s["max_lse_err"], "%.1e"),
                    ("; NON-FINITE output in %s" % ", ".join(s["nonfinite"][:4])) if s["nonfinite"] else ""))
    if timing_noise_line(s["timing_spread"]):
        lines.append(timing_noise_line(s["timing_spread"]))
    if s.get("host_bound"):
        lines.append("- host-bound timings (the GPU queue ran dry in some round): %s"
                     % ", ".join(s["host_bound"][:6]))
    if s.get("budget_squeezed"):
        lines.append("- the time limit shortened the timing of %d shapes" % s["budget_squeezed"])
    return lines


def run(torch, settings: Settings = None, log=print, command="python -m fastattn.bench --suite merge",
        gpu=None, date=None):
    """Runs the merge suite (settings: Settings.for_mode(False) when None). Returns (records, lines):
    one record per shape (impls["fastattn"]: s, tbps, copy_fraction, max_abs_err, ...; every record
    also carries "copy_tbps", the ceiling of this run) and the lines to print: the table followed by
    the summary block with the acceptance line."""
    import datetime
    settings = settings or Settings.for_mode(False)
    records, meta = run_suite(torch, settings, log)
    copy = meta["copy"]["tbps"]
    for r in records:
        r["copy_tbps"] = copy
    summ = summarize(records, copy, settings.budget_s)
    gpu = gpu or torch.cuda.get_device_name(0)
    date = date or datetime.date.today().isoformat()
    lines = format_table(records, copy).split("\n") + [""] + summary_lines(summ, gpu, date, command)
    return records, lines
