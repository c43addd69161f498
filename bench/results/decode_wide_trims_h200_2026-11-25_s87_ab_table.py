"""Session 87: the old / new table from run_c.sh's q_len_peers.py JSONs (q_<n>_<build>_seed<s>.json in DIR).

For every row: ours at N rows and ours at N = 1 (timed beside it), µs per process in run order, and new / old
(the mean of new's two processes over the mean of old's, per seed). A row is flagged "slower" when, in a seed,
both of new's processes are more than 1% above both of old's.

    python ab_table.py DIR
"""
import json
import os
import re
import sys
from collections import defaultdict


def main(d):
    runs = defaultdict(lambda: defaultdict(list))  # (seed, key) -> build -> [µs]
    order = []
    for f in sorted(os.listdir(d), key=lambda x: int(re.match(r"q_(\d+)", x).group(1)) if x.startswith("q_") else 0):
        m = re.match(r"q_(\d+)_(old|new)_seed(\d)\.json$", f)
        if not m:
            continue
        seed = int(m.group(3))
        for r in json.load(open(os.path.join(d, f))).get("rows", []):
            if "us" not in r:
                continue
            for var, key in (("ours", r["row"]), ("ours N=1", r["row"] + ", its N=1")):
                if var in r["us"]:
                    runs[(seed, key)][m.group(2)].append(r["us"][var])
                    if key not in order:
                        order.append(key)
    print("| row | seed | old µs | new µs | new / old | flag |")
    print("|---|---|---|---|---|---|")
    for key in order:
        for seed in sorted({s for s, k in runs if k == key}):
            o, n = runs[(seed, key)]["old"], runs[(seed, key)]["new"]
            if not o or not n:
                continue
            ratio = (sum(n) / len(n)) / (sum(o) / len(o))
            flag = "slower" if min(n) > 1.01 * max(o) else ("faster" if max(n) < 0.99 * min(o) else "")
            print("| %s | %d | %s | %s | %.3f | %s |" % (key, seed, " ".join("%.1f" % x for x in o),
                                                        " ".join("%.1f" % x for x in n), ratio, flag))


if __name__ == "__main__":
    main(sys.argv[1])
