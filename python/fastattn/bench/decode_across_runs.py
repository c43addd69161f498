"""The decode suite's rows across several runs: ``python -m fastattn.bench.decode_across_runs FILE...``.

One run of ``python -m fastattn.bench --device cuda --suite decode`` is one machine at one time.
The H200s of the device pool read memory up to ~3% faster or slower than one another, and where
fastattn and SDPA cuDNN both read at the memory roofline their time ratio moves by ~0.5% between
runs, so one run says little about a row near 1.00x. This reads the JSON files such runs wrote
(``bench/results/bench_cuda_*.json`` with a ``decode`` list) and prints, per shape:

- the median over the runs of each run's median time: fastattn contiguous, fastattn paged16 and
  SDPA cuDNN (µs);
- the range over the runs of cuDNN time / fastattn time (> 1: fastattn faster), contiguous and
  paged16, and in how many runs that ratio was <= 1.00 (the suite's check (2) failed there);
- the range of paged16 time / contiguous time (check (3) asks <= 1.05);

then one line per run: its file, date, GPU (the UUID's last 8 hex digits), copy bandwidth and how
many of its figures were faster than cuDNN. Shapes a run skipped or could not time are left out of
that run's figures; a shape's line says over how many runs it is taken.

Where runs were made with ``--flashinfer``, a second table gives per shape and FlashInfer peer the
median of its times, the range over the runs of its time / fastattn paged16's on the same page pool
(> 1: fastattn faster), in how many runs that was <= 1.00, and cuDNN's time / the fastest FlashInfer
peer's (does any paged peer get ahead of cuDNN's dense read where paged16 does not?).
"""
import argparse
import json
import os
import statistics
import sys

from .gpu_decode import ACCEPT_PAGED_TIME_RATIO, ACCEPT_VS_CUDNN, CONTIG, FLASHINFER_PEERS, PAGED
from .gpu_prefill import _ratio, _s

CUDNN = "sdpa-cudnn"
RATIOS = (("contiguous", CONTIG), ("paged16", PAGED))


def load_runs(paths):
    """[(path, run dict)] for the given JSON files, in order. A file that is not a decode suite's
    output (no ``decode`` list) raises ValueError naming it."""
    runs = []
    for path in paths:
        with open(path) as f:
            try:
                run = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError("%s: not JSON (%s)" % (path, e)) from None
        if not isinstance(run, dict) or not isinstance(run.get("decode"), list):
            raise ValueError("%s: expected the JSON of a decode suite run (a 'decode' list of rows), "
                             "found %s" % (path, "keys " + ", ".join(sorted(run)) if isinstance(run, dict)
                                           else type(run).__name__))
        runs.append((path, run))
    return runs


def _shape_key(rec):
    return (rec["dtype"], rec["head_dim"], rec["heads_q"], rec["heads_kv"], rec["batch"], rec["cache_len"])


def across_runs(runs):
    """Per shape, in the order the runs first list them: {"name", "runs" (how many runs timed all
    three implementations), "us": {impl: median of the runs' medians}, "vs_cudnn": {variant: (min,
    max)}, "behind": {variant: runs with cuDNN time / fastattn time <= 1.00}, "paged_over_contig":
    (min, max)}."""
    shapes = {}
    for _, run in runs:
        for rec in run["decode"]:
            if rec.get("skipped"):
                continue
            times = {k: _s(rec, k) for k in (CONTIG, PAGED, CUDNN)}
            if any(t is None for t in times.values()):
                continue
            row = shapes.setdefault(_shape_key(rec), {"name": rec["name"], "times": []})
            row["times"].append(times)
    out = []
    for row in shapes.values():
        times = row["times"]
        ratios = {var: [_ratio(t[key], t[CUDNN]) for t in times] for var, key in RATIOS}
        paged_over = [t[PAGED] / t[CONTIG] for t in times]
        out.append({
            "name": row["name"],
            "runs": len(times),
            "us": {k: 1e6 * statistics.median(t[k] for t in times) for k in (CONTIG, PAGED, CUDNN)},
            "vs_cudnn": {var: (min(r), max(r)) for var, r in ratios.items()},
            "behind": {var: sum(1 for x in r if x <= ACCEPT_VS_CUDNN) for var, r in ratios.items()},
            "paged_over_contig": (min(paged_over), max(paged_over)),
        })
    return out


def flashinfer_across_runs(runs):
    """Per shape with a FlashInfer figure in some run, in the order the runs first list them:
    {"name", "runs" (runs with paged16 and at least one FlashInfer peer timed), "us": {peer: median
    of its medians}, "over_paged": {peer: (min, max) of its time / paged16's}, "not_slower": {peer:
    runs where that was <= 1.00}, "peer_runs": {peer: runs that timed it}, "cudnn_over_best": (min,
    max) of cuDNN's time / the fastest peer's, or None}. A peer not timed in a run (failed, wrong)
    is left out of that run's figures."""
    shapes = {}
    for _, run in runs:
        for rec in run["decode"]:
            paged = _s(rec, PAGED)
            peers = {p: _s(rec, p) for p in FLASHINFER_PEERS if _s(rec, p)}
            if rec.get("skipped") or not paged or not peers:
                continue
            row = shapes.setdefault(_shape_key(rec), {"name": rec["name"], "runs": []})
            row["runs"].append((paged, peers, _s(rec, CUDNN)))
    out = []
    for row in shapes.values():
        rr = row["runs"]
        timed = [p for p in FLASHINFER_PEERS if any(p in peers for _, peers, _ in rr)]
        over = {p: [peers[p] / paged for paged, peers, _ in rr if p in peers] for p in timed}
        best = [cudnn / min(peers.values()) for _, peers, cudnn in rr if cudnn]
        out.append({
            "name": row["name"], "runs": len(rr),
            "us": {p: 1e6 * statistics.median(peers[p] for _, peers, _ in rr if p in peers)
                   for p in timed},
            "over_paged": {p: (min(v), max(v)) for p, v in over.items()},
            "not_slower": {p: sum(1 for x in v if x <= 1.0) for p, v in over.items()},
            "peer_runs": {p: len(v) for p, v in over.items()},
            "cudnn_over_best": (min(best), max(best)) if best else None,
        })
    return out


def format_flashinfer_across_runs(rows):
    """The markdown table of flashinfer_across_runs, or "" when no run had FlashInfer figures."""
    if not rows:
        return ""
    peers = [p for p in FLASHINFER_PEERS if any(p in r["us"] for r in rows)]
    head = "| shape | runs | " + " | ".join("%s µs | %s / paged16 | not slower" % (p, p)
                                           for p in peers) + " | cuDNN / fastest FlashInfer |"
    lines = [head, "|" + "---|" * (3 + 3 * len(peers))]
    for r in rows:
        cells = [r["name"], str(r["runs"])]
        for p in peers:
            if p in r["us"]:
                lo, hi = r["over_paged"][p]
                cells += ["%.1f" % r["us"][p], "%.3f-%.3fx" % (lo, hi),
                          "%d of %d" % (r["not_slower"][p], r["peer_runs"][p])]
            else:
                cells += ["-", "-", "-"]
        cb = r["cudnn_over_best"]
        cells.append("%.3f-%.3fx" % cb if cb else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "FlashInfer's paged decode on fastattn paged16's own page pool (`--flashinfer`): µs, "
              "the median of its per-run medians; x / paged16: the range over the runs of its time "
              "/ paged16's (> 1: fastattn faster); not slower: runs where that was <= 1.00, of "
              "the runs that timed that peer (one that failed or was wrong in a run is left "
              "out); cuDNN / "
              "fastest FlashInfer: SDPA cuDNN's dense time over the fastest FlashInfer peer's in "
              "each run (> 1: that peer ahead of cuDNN)."]
    return "\n".join(lines)


def run_line(path, run):
    """One run's file, date, GPU, copy bandwidth and its check (2) count."""
    s = run.get("decode_summary") or {}
    c = s.get("vs_cudnn") or {}
    ahead = ("%d of %d figures faster than cuDNN" % (c["n"] - len(c["failing"]), c["n"])
             if "n" in c and "failing" in c else "no check (2) in its summary")
    copy = s.get("copy_tbps")
    uuid = (run.get("machine") or {}).get("gpu_uuid") or ""
    return "- %s: %s, GPU %s, copy %s, %s" % (
        os.path.basename(path), run.get("date", "?"), uuid.replace("-", "")[-8:] or "?",
        "%.2f TB/s" % copy if copy else "?", ahead)


def format_across_runs(rows, runs):
    """The markdown table and the per-run lines."""
    n = len(runs)
    lines = ["| shape | runs | contiguous µs | paged16 µs | cuDNN µs | cuDNN / contiguous | behind | "
             "cuDNN / paged16 | behind | paged16 / contiguous |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rc, rp, po = r["vs_cudnn"]["contiguous"], r["vs_cudnn"]["paged16"], r["paged_over_contig"]
        lines.append("| %s | %d | %.1f | %.1f | %.1f | %.3f-%.3fx | %d | %.3f-%.3fx | %d | %.3f-%.3fx |" % (
            r["name"], r["runs"], r["us"][CONTIG], r["us"][PAGED], r["us"][CUDNN], rc[0], rc[1],
            r["behind"]["contiguous"], rp[0], rp[1], r["behind"]["paged16"], po[0], po[1]))
    behind_any = sum(1 for r in rows for v in ("contiguous", "paged16") if r["behind"][v])
    behind_all = [(r["name"], v) for r in rows for v in ("contiguous", "paged16")
                  if r["runs"] == n and r["behind"][v] == n]
    over = [r["name"] for r in rows if r["paged_over_contig"][1] > ACCEPT_PAGED_TIME_RATIO]
    lines += ["",
              "µs: the median over the runs of each run's median time. cuDNN / x: the range over the "
              "runs of SDPA cuDNN's time / fastattn's (> 1: fastattn faster); behind: runs where it "
              "was <= %.2f." % ACCEPT_VS_CUDNN,
              "%d runs; %d of %d figures behind in at least one run; behind in every run: %s; paged16 / "
              "contiguous above %.2fx in some run: %s." % (
                  n, behind_any, 2 * len(rows),
                  ", ".join("%s %s" % (v, name) for name, v in behind_all) or "none",
                  ACCEPT_PAGED_TIME_RATIO, ", ".join(over) or "none"),
              ""]
    lines += [run_line(p, run) for p, run in runs]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastattn.bench.decode_across_runs",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="JSON files written by the decode suite")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    try:
        runs = load_runs(args.files)
    except (OSError, ValueError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    text = format_across_runs(across_runs(runs), runs)
    fi = format_flashinfer_across_runs(flashinfer_across_runs(runs))
    if fi:
        text += "\n\n" + fi
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
