"""Session 90: one decode-wrapper call at a shape, for ncu (profiling from cudaProfilerStart only).

GQA 32/8, head_dim 128, pages of 16 (q_len_peers' pool), N query rows per request. Five warm calls,
then one call between torch.cuda.profiler.start() / stop(). Env switches (FASTATTN_DECODE_ROW_PAIR=1)
pass through the environment.

    python wide_ncu.py --batch 128 --len 8192 --rows 8
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s85"))
import q_len_peers as Q  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--len", type=int, required=True)
    ap.add_argument("--rows", type=int, required=True)
    args = ap.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    pool = Q.Pool(rng, [args.len] * args.batch, Q.HQ, 8)
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device="cuda")
    w, desc = Q.plan_ours(pool, ws, args.rows)
    fn, out = Q.call_ours(w, pool, pool.q(args.rows).clone())
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("b%d L%d N%d: %s" % (args.batch, args.len, args.rows, desc), flush=True)


if __name__ == "__main__":
    main()
