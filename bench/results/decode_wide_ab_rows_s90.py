"""Session 90: q_len_peers.py (session 85) on the multi-row rows only, ours alone (N rows and N = 1 beside).

GQA 32/8, head_dim 128, pages of 16, through the decode wrapper: N = 4 (16 packed rows, the per-head
kernel's wide math) and N = 8 (32 rows: the row pair at >= 4096 slots, else two 16-row CTAs a head) at
batch 1 / 1k and 8k, 8 / 1k and 8k, 32 / 1k and 8k, 128 / 1k and 8k. Each row is checked against the
float32 reference first (max abs error <= 2e-2).

    python ab_rows.py --seed S --json PATH
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s85"))
import q_len_peers as Q  # noqa: E402

ROWS = [("GQA 32/8 b%d L%dk" % (b, n // 1024), Q.HQ, 8, [n] * b, (4, 8))
        for b in (1, 8, 32, 128) for n in (1024, 8192)]
Q.shapes = lambda rng, quick: ROWS

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--no-flashinfer", "--time-limit", "400"] + sys.argv[1:]
    Q.main()
