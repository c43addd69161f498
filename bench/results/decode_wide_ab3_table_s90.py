"""Session 90: the A/B table of ab_rows.py's JSONs from several builds (q_<n>_<build>_seed<s>.json in DIR).

Per row and seed: µs of each build (its processes' mean) and each build over `old`. A row is flagged where,
in both seeds, every process of a build is more than 1% above every process of old.

    python ab3_table.py DIR
"""
import json
import os
import re
import sys
from collections import defaultdict


def main(d):
    runs = defaultdict(lambda: defaultdict(list))  # (seed, row) -> build -> [µs]
    builds, order = [], []
    for f in sorted(os.listdir(d)):
        m = re.match(r"q_(\d+)_(\w+?)_seed(\d)\.json$", f)
        if not m:
            continue
        b, seed = m.group(2), int(m.group(3))
        if b not in builds:
            builds.append(b)
        for r in json.load(open(os.path.join(d, f))).get("rows", []):
            if "us" not in r:
                continue
            for var, key in (("ours", r["row"]), ("ours N=1", r["row"] + " (its N=1)")):
                if var in r["us"]:
                    runs[(seed, key)][b].append(r["us"][var])
                    if key not in order:
                        order.append(key)
    others = [b for b in builds if b != "old"]
    print("| row | seed | " + " | ".join("%s µs" % b for b in builds) + " | " +
          " | ".join("%s / old" % b for b in others) + " |")
    print("|---|---|" + "---|" * (len(builds) + len(others)))
    flags = defaultdict(lambda: defaultdict(list))
    for key in order:
        for seed in (0, 1):
            v = runs.get((seed, key))
            if not v or "old" not in v:
                continue
            mean = {b: sum(x) / len(x) for b, x in v.items()}
            cells = ["%.1f" % mean[b] if b in mean else "-" for b in builds]
            rat = []
            for b in others:
                if b in mean:
                    rat.append("%.3f" % (mean[b] / mean["old"]))
                    flags[key][b].append(min(v[b]) > 1.01 * max(v["old"]))
                else:
                    rat.append("-")
            print("| %s | %d | %s | %s |" % (key, seed, " | ".join(cells), " | ".join(rat)))
    for key, fb in flags.items():
        for b, f in fb.items():
            if len(f) == 2 and all(f):
                print("SLOWER in both seeds: %s, %s" % (key, b))


if __name__ == "__main__":
    main(sys.argv[1])
