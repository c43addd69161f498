"""Session 85: several query rows per request in the decode wrapper (speculative decoding), timed.

fastattn's BatchDecodeWithPagedKVCacheWrapper.plan(..., q_len_per_req=N) (window_right 0: causal within
a request's N rows) against what FlashInfer 0.5.3's users run for it on Hopper, its paged prefill
wrapper BatchPrefillWithPagedKVCacheWrapper with qo_indptr = N x arange(B + 1) and causal=True, backends
"fa2" and "fa3", and against our own wrapper with N = 1 on the same pools (the memory-speed baseline: the
cost of N rows over one). All on the same page pools.

Inputs (one input set): a pool of pages (num_pages, 2, 16, Hkv, 128) bf16 NHD with each request's pages
at random places in it, CSR lists (indptr, indices, last_page_len) int32 on the GPU; q (B x N, Hq, 128)
bf16, request b's rows b*N .. b*N+N-1, row i at key position L - N + i (its draft tokens already in the
cache). Ours N = 1 reads q's first B rows (a copy). Every implementation reads its own copies of q and
of the CSR lists (FlashInfer reads the lists in every run(); ours builds its own arrays in plan()) and
writes into its own output, made beforehand.

Correctness first: on the first input set of each row, every variant's output (into a NaN-poisoned
buffer) against a float32 reference (each request's keys gathered from its pages, the bottom-right
causal mask over its N rows, softmax in float32); max abs error <= 2e-2. Ours failing raises; a peer
failing (plan, run or check) is recorded and not timed.

Timing: the decode suite's interleaved per-call event timing (gpu_decode.time_interleaved, each round
queued behind a GPU sleep), run() only (plan() once per input set, outside the timed region), the input
sets rotated call by call (gpu_decode._n_sets, at most 3 where a set is over 1 GiB) so that K/V come
from HBM. FlashInfer's fa3 run() includes its page-to-token index conversion kernel
(block_sparse_indices_to_vector_sparse_offsets), as every call of its users does.

KV bytes = sum of lengths x Hkv x 128 x 2 (K and V) x 2 bytes; TB/s = KV bytes / median time.

    python q_len_peers.py [--seed S] [--json PATH] [--quick] [--no-flashinfer] [--time-limit S]
"""
import argparse
import gc
import json
import math
import os
import random
import signal
import sys
import time
import traceback

import torch

import fastattn
from fastattn.bench import gpu_decode as G
from fastattn.bench import gpu_decode_layouts as L

PS = 16
D = 128
HQ = 32
SCALE = 1.0 / math.sqrt(D)
DEV = "cuda"
TOL = 2e-2                   # bf16 output against the float32 reference (max abs)
OURS_WORKSPACE = 256 << 20
FI_WORKSPACE = 512 << 20     # split-KV partials of fa2 (fa3 does not split); calls run one at a time
BACKENDS = ("fa2", "fa3")
BIG_SET = 1 << 30            # a set larger than this: at most 3 sets in rotation
FREE_MARGIN = 8 << 30        # GPU memory kept free of input sets (references, wrappers, workspaces)


def shapes(rng, quick):
    """(name, heads_q, heads_kv, lengths, Ns): the pools of one shape serve a row for each N."""
    if quick:
        return [("GQA 32/8 b8 L1k", HQ, 8, [1024] * 8, (4,)),
                ("MHA 32/32 b1 L1k", HQ, 32, [1024], (4,)),
                ("GQA 32/8 b8 ragged 4-2k", HQ, 8, [rng.randint(4, 2048) for _ in range(8)], (4,))]
    out = []
    for tag, hkv, ns in (("GQA", 8, (2, 4, 8)), ("MHA", 32, (4,))):
        for b in (1, 8, 32, 128):
            for n in (1024, 8192, 32768):
                if b == 128 and n == 32768:
                    continue
                out.append(("%s %d/%d b%d L%dk" % (tag, HQ, hkv, b, n // 1024), HQ, hkv, [n] * b, ns))
    # Lengths below N are refused (the N rows' keys must be in the cache): drawn from N .. 8192.
    n_rows = 4
    out.append(("GQA %d/8 b32 ragged %d-8k" % (HQ, n_rows), HQ, 8,
                [rng.randint(n_rows, 8192) for _ in range(32)], (n_rows,)))
    return out


def _cumsum(xs):
    t = 0
    for x in xs:
        t += x
        yield t


class Pool:
    """One input set: a random pool of pages (num_pages, 2, PS, Hkv, D), CSR lists over it, and q for
    each N (made on first use)."""

    def __init__(self, rng, lens, hq, hkv):
        need = [-(-n // PS) for n in lens]
        num_pages = sum(need) + 3
        perm = list(range(num_pages))
        rng.shuffle(perm)
        self.lists, pos = [], 0
        for m in need:
            self.lists.append(perm[pos:pos + m])
            pos += m
        dev = DEV
        self.indptr = torch.tensor([0] + list(_cumsum(need)), dtype=torch.int32, device=dev)
        self.indices = torch.tensor([p for l in self.lists for p in l], dtype=torch.int32, device=dev)
        self.last = torch.tensor([n - (m - 1) * PS for n, m in zip(lens, need)], dtype=torch.int32,
                                 device=dev)
        self.kv = torch.randn(num_pages, 2, PS, hkv, D, dtype=torch.bfloat16, device=dev)
        self.lens, self.hq, self.hkv = lens, hq, hkv
        self.batch = len(lens)
        self._q = {}

    def q(self, n_rows):
        """(B x N, Hq, D) bf16, the same tensor for every call with this N (callers copy it)."""
        if n_rows not in self._q:
            self._q[n_rows] = torch.randn(self.batch * n_rows, self.hq, D, dtype=torch.bfloat16,
                                          device=DEV)
        return self._q[n_rows]

    def lists_copy(self):
        return self.indptr.clone(), self.indices.clone(), self.last.clone()


def reference(pool, q, n_rows):
    """float32 out (B x N, Hq, D): request b's row i attends to keys 0 .. L_b - N + i."""
    hq, hkv = pool.hq, pool.hkv
    g = hq // hkv
    out = torch.empty(pool.batch * n_rows, hq, D, dtype=torch.float32, device=DEV)
    rows = torch.arange(n_rows, device=DEV)
    for b, (pages, n) in enumerate(zip(pool.lists, pool.lens)):
        idx = torch.tensor(pages, dtype=torch.long, device=DEV)
        k = pool.kv[idx, 0].reshape(-1, hkv, D)[:n].float()  # (n, Hkv, D)
        v = pool.kv[idx, 1].reshape(-1, hkv, D)[:n].float()
        qb = q[b * n_rows:(b + 1) * n_rows].float().reshape(n_rows, hkv, g, D)
        s = torch.einsum("ihgd,jhd->hgij", qb, k) * SCALE  # (Hkv, g, N, n)
        keys = torch.arange(n, device=DEV)
        masked = keys[None, :] > (n - n_rows + rows)[:, None]  # (N, n): keys after row i's position
        s = s.masked_fill(masked, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[b * n_rows:(b + 1) * n_rows] = torch.einsum("hgij,jhd->ihgd", p, v).reshape(n_rows, hq, D)
    return out


def plan_ours(pool, ws, n_rows):
    """Our wrapper planned on the pool's lists for N = n_rows; (wrapper, plan description)."""
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(pool.indptr, pool.indices, pool.last, pool.hq, pool.hkv, D, PS, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16, sm_scale=SCALE, q_len_per_req=n_rows)
    counts = w.split_counts
    desc = ("num_splits %s" % w.num_splits if counts is None
            else "parts %d (max %d)" % (int(counts.sum()), int(counts.max())))
    return w, desc


def call_ours(w, pool, q):
    out = torch.empty_like(q)
    kv = pool.kv
    return (lambda: w.run(q, kv, out=out)), out


def _fi_desc(w, backend):
    """fa2's plan in a few words, read from its plan info (PrefillPlanInfo::ToVector); '' if unreadable."""
    try:
        info = [int(x) for x in w._plan_info]
        if backend == "fa2" and len(info) == 15:
            return "split_kv %d, cta_tile_q %d, padded_batch %d" % (info[14], info[3], info[0])
    except Exception:
        pass
    return ""


def make_fi(fi, backend, pool, ws, n_rows, q):
    """FlashInfer's paged prefill wrapper on the pool, qo_indptr = N x arange(B + 1), causal; (call,
    out, description). Its own copies of the lists: it reads them in every run()."""
    indptr, indices, last = pool.lists_copy()
    qo_indptr = torch.arange(pool.batch + 1, dtype=torch.int32, device=DEV) * n_rows
    w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    w.plan(qo_indptr=qo_indptr, paged_kv_indptr=indptr, paged_kv_indices=indices,
           paged_kv_last_page_len=last, num_qo_heads=pool.hq, num_kv_heads=pool.hkv, head_dim_qk=D,
           page_size=PS, causal=True, sm_scale=SCALE, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16)
    out = torch.empty_like(q)
    kv = pool.kv
    return (lambda: w.run(q, kv, out=out)), out, _fi_desc(w, backend)


def check(fn, out, ref):
    """Max abs error of fn()'s output (written into a NaN-poisoned out) against ref; inf if not finite."""
    out.fill_(float("nan"))
    fn()
    torch.cuda.synchronize()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out.float() - ref).abs().max())


def _err(e):
    msg = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, (msg[0] if msg else "")[:300])


def run_row(fi, name, pools, n_rows, ours_n1, ws_ours, ws_fi, settings, sleeper, kv_bytes, fi_state):
    """One row (a shape at one N): the four variants built on every pool, checked on the first, timed
    interleaved. ours_n1: [(wrapper, desc)] per pool, planned once per shape. fi_state: {"ok": backends
    that planned once, "off": {backend: why}}; a backend whose first plan() in the process fails (its
    JIT build, say) is not tried again. Returns its record."""
    p0 = pools[0]
    g = p0.hq // p0.hkv
    rec = {"row": "%s N=%d" % (name, n_rows), "shape": name, "heads_q": p0.hq, "heads_kv": p0.hkv,
           "group": g, "q_len": n_rows, "group_x_q_len": g * n_rows, "batch": p0.batch,
           "keys": sum(p0.lens), "lens": p0.lens if len(set(p0.lens)) > 1 else p0.lens[0],
           "kv_bytes": kv_bytes, "sets": len(pools), "us": {}, "tbps": {}, "ratios": {}, "errs": {},
           "errors": {}, "plans": {}, "stats": {}}
    made = {}
    # ours, N rows: failures raise.
    calls, descs = [], []
    for p in pools:
        w, desc = plan_ours(p, ws_ours, n_rows)
        calls.append(call_ours(w, p, p.q(n_rows).clone()))
        descs.append(desc)
    made["ours"] = calls
    rec["plans"]["ours"] = descs[0]
    # ours, N = 1 on the first B rows of the same q.
    made["ours N=1"] = [call_ours(w, p, p.q(n_rows)[:p.batch].clone()) for (w, _), p in zip(ours_n1, pools)]
    rec["plans"]["ours N=1"] = ours_n1[0][1]
    if fi is not None:
        for backend in BACKENDS:
            if backend in fi_state["off"]:
                rec["errors"][backend] = "not tried: its first plan() failed (%s)" % fi_state["off"][backend]
                continue
            try:
                built = [make_fi(fi, backend, p, ws_fi, n_rows, p.q(n_rows).clone()) for p in pools]
            except Exception as e:
                rec["errors"][backend] = "plan: " + _err(e)
                print("  %-8s n/a: %s" % (backend, rec["errors"][backend]), flush=True)
                if backend not in fi_state["ok"]:
                    fi_state["off"][backend] = rec["row"]
                continue
            fi_state["ok"].add(backend)
            made[backend] = [(fn, out) for fn, out, _ in built]
            rec["plans"][backend] = built[0][2]
    # Correctness on the first set.
    ref = reference(p0, p0.q(n_rows), n_rows)
    ref1 = reference(p0, p0.q(n_rows)[:p0.batch], 1)
    fns = {}
    for impl, pairs in made.items():
        fn0, out0 = pairs[0]
        r = ref1 if impl == "ours N=1" else ref
        if impl.startswith("ours"):
            err = check(fn0, out0, r)
            rec["errs"][impl] = err
            if not err <= TOL:
                raise AssertionError("%s, %s: max abs error %.3g > %.3g against the float32 reference"
                                     % (rec["row"], impl, err, TOL))
        else:
            try:
                err = check(fn0, out0, r)
            except Exception as e:
                rec["errors"][impl] = "run: " + _err(e)
                print("  %-8s n/a: %s" % (impl, rec["errors"][impl]), flush=True)
                continue
            rec["errs"][impl] = err
            if not err <= TOL:
                rec["errors"][impl] = "wrong output: max abs error %.3g > %.3g; not timed" % (err, TOL)
                print("  %-8s %s" % (impl, rec["errors"][impl]), flush=True)
                continue
        fns[impl] = L.rotating([fn for fn, _ in pairs])
    del ref, ref1
    G.rewarm_gpu(torch)
    st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
    for impl, s in st.items():
        rec["us"][impl] = s["s"] * 1e6
        rec["tbps"][impl] = kv_bytes / s["s"] / 1e12
        rec["stats"][impl] = {"runs": s["runs"], "spread": s["spread"], "p10_us": s["p10_s"] * 1e6,
                              "p90_us": s["p90_s"] * 1e6, "min_us": s["min_s"] * 1e6,
                              "round_medians_us": [x * 1e6 for x in s["round_medians_s"]],
                              "host_us": s["host_s"] * 1e6, "host_bound_rounds": s["host_bound_rounds"]}
    us = rec["us"]
    for b in BACKENDS:
        if b in us:
            rec["ratios"][b + "/ours"] = us[b] / us["ours"]
    rec["ratios"]["ours/ours N=1"] = us["ours"] / us["ours N=1"]
    return rec


def brief(rec):
    us, r = rec["us"], rec["ratios"]
    parts = ["%-30s gxN %2d" % (rec["row"], rec["group_x_q_len"]),
             "ours %8.1f us %5.2f TB/s" % (us["ours"], rec["tbps"]["ours"]),
             "N=1 %8.1f (x%.3f)" % (us["ours N=1"], r["ours/ours N=1"])]
    for b in BACKENDS:
        parts.append("%s %s" % (b, "%8.1f (%.3f)" % (us[b], r[b + "/ours"]) if b in us else "     n/a"))
    errs = " ".join("%s %.1e" % (k, v) for k, v in rec["errs"].items())
    return "  ".join(parts) + "  err " + errs


def _cell(x, fmt):
    return "-" if x is None else fmt % x


def table(records):
    head = ("| row | g x N | keys | sets | ours µs | ours TB/s | ours N=1 µs | N / N=1 | fa2 µs | fa2 / ours "
            "| fa3 µs | fa3 / ours | max err ours, fa2, fa3 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r.get("skipped"):
            lines.append("| " + " | ".join([r["row"], "skipped: " + r["skipped"]] + [""] * 11) + " |")
            continue
        us, ra, er = r["us"], r["ratios"], r["errs"]
        cells = [r["row"], str(r["group_x_q_len"]), str(r["keys"]), str(r["sets"]),
                 "%.1f" % us["ours"], "%.2f" % r["tbps"]["ours"], "%.1f" % us["ours N=1"],
                 "%.3f" % ra["ours/ours N=1"]]
        for b in BACKENDS:
            cells += [_cell(us.get(b), "%.1f") if b in us else "n/a", _cell(ra.get(b + "/ours"), "%.3f")]
        cells.append(", ".join(_cell(er.get(k), "%.1e") for k in ("ours", "fa2", "fa3")))
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({"%s: %s" % (k, v) for r in records for k, v in r.get("errors", {}).items()})
    if notes:
        lines.append("")
        lines += ["- n/a or not timed: " + n for n in notes[:12]]
        if len(notes) > 12:
            lines.append("- ... %d more in the JSON" % (len(notes) - 12))
    lines.append("")
    lines.append("µs: median per call (run() only); TB/s: K+V bytes / median; fa2 / ours, fa3 / ours: "
                 "their time over ours (> 1: ours faster); N / N=1: ours with N rows over ours with one; "
                 "g x N: query rows a KV head serves (Hq / Hkv x N)")
    return "\n".join(lines)


def write_json(path, meta, records):
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta, rows=records), f, indent=1)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write every figure here (rewritten after each row)")
    ap.add_argument("--quick", action="store_true", help="a 3-row smoke run (also FlashInfer's JIT warm-up)")
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--time-limit", type=float, default=170.0,
                    help="seconds; shapes not started by then are recorded as skipped")
    args = ap.parse_args()
    t_start = time.perf_counter()
    # timeout's SIGTERM as an exception: the rows done so far are printed (the JSON has them already).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in float32
    torch.set_float32_matmul_precision("highest")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    fi, fi_error = None, None
    if not args.no_flashinfer:
        try:
            import flashinfer as fi
        except Exception as e:
            fi_error = _err(e)
            print("flashinfer unavailable: %s" % fi_error, flush=True)
    settings = G.Settings.for_mode(True) if args.quick else G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copy = G.measure_copy(torch, settings, sleeper)
    ws_ours = torch.empty(OURS_WORKSPACE, dtype=torch.uint8, device=DEV)
    ws_fi = torch.zeros(FI_WORKSPACE, dtype=torch.uint8, device=DEV)
    meta = {"script": "q_len_peers.py", "argv": sys.argv[1:], "gpu": torch.cuda.get_device_name(0),
            "seed": args.seed, "quick": args.quick, "torch": torch.__version__,
            "fastattn": getattr(fastattn, "__version__", None), "fastattn_file": fastattn.__file__,
            "flashinfer": getattr(fi, "__version__", None), "flashinfer_error": fi_error,
            "l2_bytes": l2, "copy_tbps": copy["tbps"], "page_size": PS, "head_dim": D, "dtype": "bf16",
            "tolerance": TOL, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in settings.__dict__.items()}}
    print("%s, torch %s, flashinfer %s, copy %.2f TB/s, seed %d" % (
        meta["gpu"], torch.__version__, meta["flashinfer"], copy["tbps"], args.seed), flush=True)
    records = []
    fi_state = {"ok": set(), "off": {}}
    try:
        for name, hq, hkv, lens, ns in shapes(rng, args.quick):
            kv_bytes = 2 * sum(lens) * hkv * D * 2
            elapsed = time.perf_counter() - t_start
            if elapsed > args.time_limit:
                for n in ns:
                    records.append({"row": "%s N=%d" % (name, n), "skipped": "time limit (%.0f s)" % elapsed})
                print("  %s: skipped, %.0f s past the start" % (name, elapsed), flush=True)
                continue
            n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > BIG_SET else None)
            free = torch.cuda.mem_get_info()[0]
            n_sets = max(1, min(n_sets, int((free - FREE_MARGIN) // (kv_bytes * 1.01))))
            t0 = time.perf_counter()
            pools = [Pool(rng, lens, hq, hkv) for _ in range(n_sets)]
            ours_n1 = [plan_ours(p, ws_ours, 1) for p in pools]
            for n in ns:
                rec = run_row(fi, name, pools, n, ours_n1, ws_ours, ws_fi, settings, sleeper, kv_bytes,
                              fi_state)
                rec["wall_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                records.append(rec)
                print(brief(rec), flush=True)
                write_json(args.json, meta, records)
            del pools, ours_n1
            gc.collect()
            torch.cuda.empty_cache()
    except BaseException as e:
        meta["flashinfer_not_tried"] = fi_state["off"]
        meta["fatal"] = _err(e)
        meta["traceback"] = traceback.format_exc()
        meta["elapsed_s"] = time.perf_counter() - t_start
        write_json(args.json, meta, records)
        if records:
            print(table(records), flush=True)
        raise
    meta["flashinfer_not_tried"] = fi_state["off"]
    meta["elapsed_s"] = time.perf_counter() - t_start
    write_json(args.json, meta, records)
    print()
    print("### Query rows per request: ours vs FlashInfer %s paged prefill (fa2, fa3) and ours N=1; %s, "
          "seed %d, %.0f s" % (meta["flashinfer"], meta["gpu"], args.seed, meta["elapsed_s"]))
    print()
    print(table(records), flush=True)


if __name__ == "__main__":
    main()
