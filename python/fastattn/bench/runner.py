"""Command line, timing, table, JSON and plot of ``python -m fastattn.bench``."""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

import fastattn

from . import gpu_cascade, gpu_decode, gpu_merge, gpu_prefill

SUITES = ("prefill", "decode", "merge", "cascade")


# ---- timing -------------------------------------------------------------------------------------


def time_host(fn, warmup, min_repeats, max_repeats, budget_s):
    """Median wall time of fn() (CPU work is synchronous) after `warmup` calls; repeats until
    max_repeats or, once min_repeats are done, until budget_s has passed. Returns (s, n, output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats
                                        or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times), out


def time_cuda(torch, fn, warmup, min_repeats, max_repeats, budget_s):
    """Median of CUDA-event timings, one event pair per call, after warm-up."""
    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    # Size the repeat count from one timed call, then time all calls in one stream of work.
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(min(max_repeats, max(min_repeats, budget_s / one)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        out = fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    return statistics.median(times), n, out


# ---- machine description ----------------------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device, torch):
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "numpy": np.__version__,
        "fastattn": fastattn.__version__,
        "torch": getattr(torch, "__version__", None) if torch else None,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_cuda"] = torch.version.cuda
        info["gpu_capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
        # Which physical GPU ran the figures: instances of one model differ by up to a few percent
        # on the bandwidth-bound rows (bench/NOTES.md, session 35), so results name their GPU.
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = getattr(props, "multi_processor_count", None)
        uuid = getattr(props, "uuid", None)
        info["gpu_uuid"] = str(uuid) if uuid is not None else None
    elif torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def pick_device(requested):
    torch = None
    try:
        import torch  # noqa: F811
    except Exception:
        torch = None
    cuda_ok = torch is not None and torch.cuda.is_available()
    if requested == "auto":
        device = "cuda" if cuda_ok and fastattn.backend_available("cuda") else "cpu"
    else:
        device = requested
    if device == "cuda" and not cuda_ok:
        raise SystemExit("--device cuda: torch with a visible CUDA GPU is needed for the GPU benchmark")
    return device, torch


# ---- running the cases ------------------------------------------------------------------------


def _short_error(e):
    msg = str(e).splitlines()[0] if str(e) else ""
    return "%s: %s" % (type(e).__name__, msg[:140])


def run_case(case, device, torch, quick):
    row = {"suite": case.suite, "name": case.name, "shape": case.shape, "flops": case.flops,
           "bytes": case.bytes, "metric": case.metric, "note": case.note, "peers": {}}
    if device == "cuda":
        timer = lambda fn: time_cuda(torch, fn, 3, 5, 50 if quick else 200, 0.2 if quick else 1.0)
    else:
        timer = lambda fn: time_host(fn, 2, 3, 30 if quick else 100, 0.3 if quick else 1.5)

    out = None
    try:
        t, n, out = timer(case.fastattn)
        row.update(fastattn_s=t, fastattn_runs=n)
    except Exception as e:  # e.g. NotSupportedError before the CUDA kernels exist
        row.update(fastattn_s=None, fastattn_error=_short_error(e))

    if case.naive is not None:
        # Same shape, fewer repeats: float64 numpy is slow, but nothing is extrapolated.
        t, n, ref = time_host(case.naive, 0, 1, 3, 1.0)
        row.update(naive_s=t, naive_runs=n)
        if out is not None and case.check is not None:
            row["max_abs_err"] = case.check(out, ref)

    for name, fn in case.peers.items():
        try:
            t, n, peer_out = timer(fn)
            row["peers"][name] = {"s": t, "runs": n}
            if name == case.check_against and out is not None and case.check is not None:
                row["max_abs_err"] = case.check(out, peer_out)
                row["err_vs"] = name
        except Exception as e:
            row["peers"][name] = {"s": None, "error": _short_error(e)}
    return row


def _rate(row, seconds):
    if not seconds:
        return None
    if row["metric"] == "flops":
        return row["flops"] / seconds / 1e9  # GFLOP/s
    return row["bytes"] / seconds / 1e9  # GB/s


def _fmt_ms(s):
    return "-" if s is None else ("%.3f" % (s * 1e3) if s < 0.1 else "%.1f" % (s * 1e3))


def _fmt_ratio(ref_s, s):
    return "-" if (ref_s is None or s is None) else "%.2fx" % (ref_s / s)


def format_table(rows, device):
    peer_names = []
    for r in rows:
        for p in r["peers"]:
            if p not in peer_names:
                peer_names.append(p)
    head = ["case", "fastattn ms", "rate"]
    if any("naive_s" in r for r in rows):
        head += ["naive ms", "vs naive"]
    for p in peer_names:
        head += [p + " ms"] + (["rate"] if device == "cuda" else []) + ["vs " + p]
    head += ["max err"]
    lines = []
    for r in rows:
        t = r.get("fastattn_s")
        rate = _rate(r, t)
        unit = "GFLOP/s" if r["metric"] == "flops" else "GB/s"
        if device == "cuda" and r["metric"] == "flops" and rate is not None:
            rate, unit = rate / 1e3, "TFLOP/s"
        cells = [r["name"], _fmt_ms(t) if t is not None else "n/a",
                 "-" if rate is None else "%.1f %s" % (rate, unit)]
        if "naive ms" in head:
            cells += [_fmt_ms(r.get("naive_s")), _fmt_ratio(r.get("naive_s"), t)]
        for p in peer_names:
            ps = r["peers"].get(p, {}).get("s")
            cells += [_fmt_ms(ps)]
            if device == "cuda":
                pr = _rate(r, ps)
                if pr is not None and r["metric"] == "flops":
                    pr /= 1e3
                cells += ["-" if pr is None else "%.1f" % pr]
            cells += [_fmt_ratio(ps, t)]
        err = r.get("max_abs_err")
        cells += ["-" if err is None else "%.1e" % err]
        lines.append(cells)
    out = gpu_prefill._aligned(head, lines)
    notes = sorted({r["fastattn_error"] for r in rows if r.get("fastattn_error")})
    for n in notes:
        out.append("n/a: " + n)
    out.append("ratios: reference time / fastattn time (>1 means fastattn is faster); "
               "rate: FLOPs or minimal bytes over the median time; max err: vs the naive float64 "
               "reference (CPU) or vs SDPA flash (GPU)")
    return "\n".join(out)


def save_plot(rows, device, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return "no plot (matplotlib unavailable: %s)" % type(e).__name__
    series = ["fastattn"] + (["naive"] if any("naive_s" in r for r in rows) else [])
    for r in rows:
        for p in r["peers"]:
            if p not in series:
                series.append(p)
    groups = [("flops", "GFLOP/s" if device == "cpu" else "TFLOP/s", 1e9 if device == "cpu" else 1e12),
              ("bytes", "GB/s", 1e9)]
    groups = [g for g in groups if any(r["metric"] == g[0] for r in rows)]
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 0.5 * len(rows) + 2.5),
                             squeeze=False)
    for ax, (metric, unit, scale) in zip(axes[0], groups):
        sub = [r for r in rows if r["metric"] == metric]
        ys = np.arange(len(sub))
        hgt = 0.8 / len(series)
        for j, sname in enumerate(series):
            vals = []
            for r in sub:
                s = (r.get("fastattn_s") if sname == "fastattn" else
                     r.get("naive_s") if sname == "naive" else r["peers"].get(sname, {}).get("s"))
                vals.append(0 if not s else (r[metric] / s) / scale)
            ax.barh(ys + (j - (len(series) - 1) / 2) * hgt, vals, height=hgt, label=sname)
        ax.set_yticks(ys)
        ax.set_yticklabels([r["name"] for r in sub], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit + (" (useful FLOPs)" if metric == "flops" else " (minimal bytes)"))
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("fastattn benchmark on %s (%s)" % (device, datetime.date.today().isoformat()))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_out_dir():
    here = os.path.join(os.getcwd(), "bench", "results")
    return here if os.path.isdir(os.path.dirname(here)) else os.path.join(os.getcwd(), "fastattn-bench-results")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastattn.bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a few small shapes (smoke run)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto: the GPU when torch sees one and fastattn has kernels for it, else CPU")
    ap.add_argument("--out", default=None, help="directory for the JSON and PNG (default bench/results)")
    ap.add_argument("--suite", default=",".join(SUITES),
                    help="comma-separated subset of: " + ", ".join(SUITES))
    ap.add_argument("--table-file", default=None, help="also write the printed table here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true",
                    help="the full shape lists even when --quick is also given (so that "
                         "BENCH_ARGS='--full --suite prefill' scripts/gpu_check.sh runs the full GPU "
                         "prefill suite)")
    g = ap.add_argument_group("GPU prefill suite (issue 3's table; defaults: the issue's shapes)")
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]
    names = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    g.add_argument("--seqlens", type=ints, default=None, help="e.g. 2048,4096 (default 512..16384)")
    g.add_argument("--head-dims", type=ints, default=None, help="e.g. 128 (default 64,128,256)")
    g.add_argument("--dtypes", type=names, default=None, help="fp16,bf16 (default both)")
    g.add_argument("--variants", type=names, default=None,
                   help="of dense, varlen, pagedN (page size N) (default %s)"
                        % ",".join(gpu_prefill.VARIANTS))
    g.add_argument("--tokens", type=int, default=None,
                   help="tokens per call, batch = tokens / seqlen (default %d)" % gpu_prefill.TOKENS)
    g.add_argument("--hidden", type=int, default=None,
                   help="heads * head_dim (default %d)" % gpu_prefill.HIDDEN)
    g.add_argument("--time-limit", type=float, default=None,
                   help="seconds for each GPU suite (prefill, decode, merge); per-shape timing "
                        "budgets shrink to keep to it (default: prefill 330, decode 150, merge 60; "
                        "25, 20 and 20 with --quick)")
    g = ap.add_argument_group("GPU decode suite (the decode issue's table; defaults: its shapes; "
                              "--dtypes, --head-dims and --time-limit apply too)")
    g.add_argument("--batches", type=ints, default=None,
                   help="e.g. 1,32 (default %s)" % ",".join(map(str, gpu_decode.BATCHES)))
    g.add_argument("--cache-lens", type=ints, default=None,
                   help="e.g. 8192 (default %s)" % ",".join(map(str, gpu_decode.CACHE_LENS)))
    g.add_argument("--kv-heads", type=ints, default=None,
                   help="KV heads under %d query heads, e.g. 8 (default %s)"
                        % (gpu_decode.HEADS_Q, ",".join(map(str, gpu_decode.HEADS_KV))))
    g.add_argument("--flashinfer", action="store_true",
                   help="also time FlashInfer's paged decode (its decode wrapper with and without "
                        "tensor cores, and XQA) on fastattn's page pool, for information; needs "
                        "flashinfer importable (not a dependency)")
    g = ap.add_argument_group("GPU cascade suite (the cascade issue's table; defaults: its shapes)")
    g.add_argument("--prefixes", type=ints, default=None,
                   help="shared prefix lengths, multiples of 16 (default %s)"
                        % ",".join(map(str, gpu_cascade.PREFIXES)))
    g.add_argument("--cascade-batches", type=ints, default=None,
                   help="decode requests per step (default %s)" % ",".join(map(str, gpu_cascade.BATCHES)))
    args = ap.parse_args(argv)
    if args.full:
        args.quick = False
    if args.variants and not all(gpu_prefill.valid_variant(v) for v in args.variants):
        ap.error("--variants: choose from dense, varlen, pagedN (N = page size >= 1)")
    if args.dtypes and [v for v in args.dtypes if v not in gpu_prefill.DTYPES]:
        ap.error("--dtypes: choose from %s" % ",".join(gpu_prefill.DTYPES))
    if args.kv_heads and [h for h in args.kv_heads if h < 1 or gpu_decode.HEADS_Q % h]:
        ap.error("--kv-heads: each must divide %d" % gpu_decode.HEADS_Q)

    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        ap.error("unknown suite(s) %s; choose from %s" % (", ".join(bad), ", ".join(SUITES)))
    device, torch = pick_device(args.device)
    from . import cases as casemod

    t_start = time.perf_counter()
    print("fastattn %s benchmark on %s (%s), suites: %s%s" % (
        fastattn.__version__, device,
        torch.cuda.get_device_name(0) if device == "cuda" else _cpu_model(),
        ",".join(suites), ", quick" if args.quick else ""), flush=True)
    if device == "cpu" and torch is None:
        print("(torch not importable: no PyTorch column)", flush=True)
    prefill_records, prefill_meta, prefill_summary, prefill_lines = None, None, None, []
    command = " ".join([os.path.basename(sys.executable), "-m", "fastattn.bench"] + list(
        argv if argv is not None else sys.argv[1:]))
    if device == "cuda" and "prefill" in suites:
        settings = gpu_prefill.Settings.for_mode(
            args.quick, seqlens=args.seqlens, head_dims=args.head_dims, dtypes=args.dtypes,
            variants=args.variants, tokens=args.tokens, hidden=args.hidden,
            time_limit_s=args.time_limit, seed=args.seed)
        n = len(gpu_prefill.plan(settings))
        print("GPU prefill: %d shapes x (%s + SDPA flash, cuDNN), time limit %.0f s" % (
            n, ", ".join(settings.variants), settings.time_limit_s), flush=True)
        prefill_records, prefill_meta = gpu_prefill.run_suite(torch, settings)
        prefill_summary = gpu_prefill.summarize(prefill_records, settings.variants, settings.budget_s)
        prefill_lines = gpu_prefill.summary_lines(
            prefill_summary, torch.cuda.get_device_name(0),
            datetime.date.today().isoformat(), command)
    decode_records, decode_meta, decode_summary, decode_lines = None, None, None, []
    if device == "cuda" and "decode" in suites:
        dsettings = gpu_decode.Settings.for_mode(
            args.quick, dtypes=args.dtypes, head_dims=args.head_dims, batches=args.batches,
            cache_lens=args.cache_lens, heads_kv=args.kv_heads, time_limit_s=args.time_limit,
            seed=args.seed, flashinfer=args.flashinfer)
        shapes = gpu_decode.plan(dsettings)
        n_skip = sum(1 for s in shapes if s.skip_reason(dsettings))
        print("GPU decode: %d shapes (%d skipped: cache > %.0f GiB) x (fastattn %s + SDPA flash, "
              "cuDNN%s) + copy bandwidth, time limit %.0f s" % (
                  len(shapes), n_skip, dsettings.max_cache_bytes / 2**30,
                  ", ".join(gpu_decode.VARIANTS), " + FlashInfer" if args.flashinfer else "",
                  dsettings.time_limit_s), flush=True)
        decode_records, decode_meta = gpu_decode.run_suite(torch, dsettings)
        decode_summary = gpu_decode.summarize(decode_records, decode_meta["copy"]["tbps"],
                                              dsettings.budget_s)
        decode_lines = gpu_decode.summary_lines(
            decode_summary, torch.cuda.get_device_name(0),
            datetime.date.today().isoformat(), command)
    merge_suite_records, merge_suite_meta, merge_suite_summary, merge_suite_lines = None, None, None, []
    # The merge rows come with the cascade suite too (the cascade issue's table includes them).
    if device == "cuda" and ("merge" in suites or "cascade" in suites):
        msettings = gpu_merge.Settings.for_mode(args.quick, time_limit_s=args.time_limit, seed=args.seed)
        print("GPU merge: %d shapes (merge_state, merge_states N=2 and 8) + copy bandwidth, time "
              "limit %.0f s" % (len(gpu_merge.plan(msettings)), msettings.time_limit_s), flush=True)
        merge_suite_records, merge_suite_meta = gpu_merge.run_suite(torch, msettings)
        merge_suite_summary = gpu_merge.summarize(merge_suite_records, merge_suite_meta["copy"]["tbps"],
                                                  msettings.budget_s)
        merge_suite_lines = gpu_merge.summary_lines(
            merge_suite_summary, torch.cuda.get_device_name(0),
            datetime.date.today().isoformat(), command)
    elif suites == ["merge"]:
        print("the merge suite needs a GPU (it times the CUDA merge kernels); nothing to run on %s"
              % device, flush=True)
    cascade_records, cascade_meta, cascade_summary, cascade_lines = None, None, None, []
    if device == "cuda" and "cascade" in suites:
        csettings = gpu_cascade.Settings.for_mode(args.quick, prefixes=args.prefixes,
                                                  batches=args.cascade_batches, seed=args.seed)
        shapes = gpu_cascade.plan(csettings)
        print("GPU cascade: %d shapes x (cascade decode wrapper, plain paged decode with the prefix "
              "duplicated)" % len(shapes), flush=True)
        cascade_records, cascade_meta = gpu_cascade.run_suite(torch, csettings)
        cascade_summary = gpu_cascade.summarize(cascade_records)
        cascade_lines = gpu_cascade.summary_lines(
            cascade_summary, torch.cuda.get_device_name(0),
            datetime.date.today().isoformat(), command)
    # On the GPU, prefill, decode and cascade are the suites above; gpu_cases has what is left.
    case_list = (casemod.gpu_cases([x for x in suites if x not in ("prefill", "decode", "cascade", "merge")],
                                   args.quick)
                 if device == "cuda"
                 else casemod.cpu_cases(suites, args.quick, args.seed))
    rows = []
    for case in case_list:
        try:
            row = run_case(case, device, torch, args.quick)
        except Exception as e:
            traceback.print_exc()
            row = {"suite": case.suite, "name": case.name, "shape": case.shape, "metric": case.metric,
                   "flops": case.flops, "bytes": case.bytes, "peers": {},
                   "fastattn_s": None, "fastattn_error": _short_error(e)}
        rows.append(row)
        print("  %-34s %s" % (case.name, case.shape), flush=True)
        if device == "cuda":  # free this case's tensors before the next one
            del case
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_start

    parts = []
    if prefill_records is not None:
        parts.append(gpu_prefill.format_table(prefill_records, settings.variants))
    if decode_records is not None:
        parts.append(gpu_decode.format_table(decode_records, decode_meta["copy"]["tbps"]))
    if merge_suite_records is not None:
        parts.append(gpu_merge.format_table(merge_suite_records, merge_suite_meta["copy"]["tbps"]))
    if cascade_records is not None:
        parts.append(gpu_cascade.format_table(cascade_records))
    if rows:
        parts.append(format_table(rows, device))
    if prefill_lines:
        parts.append("\n".join(prefill_lines))
    if decode_lines:
        parts.append("\n".join(decode_lines))
    if merge_suite_lines:
        parts.append("\n".join(merge_suite_lines))
    if cascade_lines:
        parts.append("\n".join(cascade_lines))
    table = "\n\n".join(parts)
    out_dir = args.out or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(out_dir, "bench_%s_%s%s" % (device, stamp, "_quick" if args.quick else ""))
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "device": device,
        "quick": args.quick,
        "suites": suites,
        "elapsed_s": elapsed,
        "machine": machine_info(device, torch),
        "rows": rows,
    }
    if prefill_records is not None:
        record.update(prefill=prefill_records, prefill_meta=prefill_meta,
                      prefill_summary=prefill_summary, prefill_summary_text=prefill_lines)
    if decode_records is not None:
        record.update(decode=decode_records, decode_meta=decode_meta,
                      decode_summary=decode_summary, decode_summary_text=decode_lines)
    if merge_suite_records is not None:
        record.update(merge=merge_suite_records, merge_meta=merge_suite_meta,
                      merge_summary=merge_suite_summary, merge_summary_text=merge_suite_lines)
    if cascade_records is not None:
        record.update(cascade=cascade_records, cascade_meta=cascade_meta,
                      cascade_summary=cascade_summary, cascade_summary_text=cascade_lines)
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=1)
    plots = []
    if prefill_records:
        plots.append(gpu_prefill.save_plot(
            prefill_records, base + "_prefill.png",
            "fastattn GPU prefill on %s, %s\n%d tokens per call, hidden %d; TFLOP/s = 4BHS\u00b2D "
            "(halved if causal) / median time" % (record["machine"].get("gpu"), record["date"][:10],
                                                  settings.tokens, settings.hidden)))
    if decode_records:
        plots.append(gpu_decode.save_plot(
            decode_records, base + "_decode.png",
            "fastattn GPU decode on %s, %s\nseqlen_q 1, full caches; TB/s = (K+V read + q + out) "
            "bytes / median time; copy bandwidth %.2f TB/s" % (
                record["machine"].get("gpu"), record["date"][:10], decode_meta["copy"]["tbps"]),
            decode_meta["copy"]["tbps"]))
    if rows:
        plots.append(save_plot(rows, device, base + ".png"))

    print()
    print(table)
    print("saved %s.json and %s (%.0f s)" % (base, ", ".join(plots), elapsed))
    if args.table_file:
        with open(args.table_file, "w") as f:
            f.write(table + "\n")
    failed = [r for r in rows if r.get("fastattn_s") is None and device == "cpu"]
    bad = (gpu_prefill.bad_records(prefill_records or []) + gpu_decode.bad_records(decode_records or [])
           + gpu_cascade.bad_records(cascade_records or [])
           + gpu_merge.bad_records(merge_suite_records or []))
    for b in bad[:10]:
        print("FAILED: " + b)
    return 1 if (failed or bad) else 0
