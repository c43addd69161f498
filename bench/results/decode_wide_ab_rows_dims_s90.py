"""Session 90: ab_rows.py at another head_dim, or the row pair's rows alone.

    python ab_rows_dims.py --seed S --json PATH --head-dim {64,128,256} [--pair-only | --mha]

--head-dim sets q_len_peers' D (and its scale) for every row: GQA 32/8 at N = 4 and 8, batch 1, 8 and 32 at 1k
and 8k. --pair-only: head_dim 128, N = 8 at 8k, batch 1, 8, 32 and 128 (the row pair's rows). --mha: MHA 32/32
at N = 4 (and N = 1 beside), batch 1, 8, 32 and 128 at 1k and 8k.
"""
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s85"))
import q_len_peers as Q  # noqa: E402


def main():
    argv = sys.argv[1:]
    d = 128
    if "--head-dim" in argv:
        i = argv.index("--head-dim")
        d = int(argv[i + 1])
        del argv[i:i + 2]
    pair_only = "--pair-only" in argv
    if "--mha" in argv:
        argv.remove("--mha")
        rows = [("MHA 32/32 b%d L%dk" % (b, n // 1024), Q.HQ, 32, [n] * b, (4,))
                for b in (1, 8, 32, 128) for n in (1024, 8192)]
    elif pair_only:
        argv.remove("--pair-only")
        rows = [("GQA 32/8 b%d L8k" % b, Q.HQ, 8, [8192] * b, (8,)) for b in (1, 8, 32, 128)]
    else:
        rows = [("GQA 32/8 d%d b%d L%dk" % (d, b, n // 1024), Q.HQ, 8, [n] * b, (4, 8))
                for b in (1, 8, 32) for n in (1024, 8192)]
    Q.D = d
    Q.SCALE = 1.0 / math.sqrt(d)
    Q.shapes = lambda rng, quick: rows
    sys.argv = [sys.argv[0], "--no-flashinfer", "--time-limit", "400"] + argv
    Q.main()


if __name__ == "__main__":
    main()
