"""Session 96: per row and public variant, each process's median paired difference from `ws`; per build the
median over its processes; adjacent old/new pairs (processes 1-2, 3-4, 5-6, 7-8 in run order)."""
import re
import statistics
import sys
from collections import defaultdict

vals = defaultdict(list)  # (row, variant) -> [(proc_index, label, value)]
raw = defaultdict(list)
proc = -1
seen_rows = set()
for line in open(sys.argv[1]):
    m = re.match(r"\[(old|new)\] (.+?) \(workspace \d+ bytes\) \| (.*)", line)
    if not m:
        continue
    label, row, rest = m.groups()
    if row in seen_rows or proc < 0:
        if row.startswith("single GQA 32/8 L1k"):
            proc += 1
            seen_rows = set()
    seen_rows.add(row)
    for part in rest.split(" | "):
        mm = re.match(r"(.+?) ([\d.]+)(?: \(- ws (-?[\d.]+),.*\))?$", part)
        name, med, d = mm.groups()
        raw[(row, name)].append((proc, label, float(med)))
        if d is not None:
            vals[(row, name)].append((proc, label, float(d)))
for key, xs in vals.items():
    old = [v for _, l, v in xs if l == "old"]
    new = [v for _, l, v in xs if l == "new"]
    byp = {p: v for p, _, v in xs}
    labs = {p: l for p, l, _ in xs}
    pairs = []
    for a in range(0, len(byp), 2):
        o, n = (a, a + 1) if labs[a] == "old" else (a + 1, a)
        pairs.append(byp[n] - byp[o])
    dm = statistics.median(new) - statistics.median(old)
    print(f"{key[0]:24s} {key[1]:26s} old {statistics.median(old):6.2f} new {statistics.median(new):6.2f} "
          f"new-old {dm:6.2f} | pairs new-old " + " ".join(f"{p:6.2f}" for p in pairs) +
          f" | {sum(p < 0 for p in pairs)}/{len(pairs)}")
