"""Session 88: session 87's wide split rule (decode_wide_split_rule) against the narrow math's
(FASTATTN_DECODE_WIDE_SPLITS=0) where the narrow rule's clustered CTAs stream 9-15 64-key tiles, the range
session 87 left unmeasured: batch 1 at 4.5k-7.5k keys (8 clustered splits), GQA 32/8 at N = 4 (16 rows) and
N = 8 (the row pair), GQA 32/2 at N = 1 (16 rows); batch 2 at 2.5k-3.5k, N = 4. Session 87's wide_splits_ab.py
with these rows; each row also prints the split count each rule takes for the contiguous call (read off the
workspace it asks for).

    python wide_tiles_ab.py [--seed S]
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "s87"))
sys.path.insert(0, os.path.join(HERE, "..", "s85"))
import wide_splits_ab as W  # noqa: E402
import fastattn  # noqa: E402
from fastattn import _C  # noqa: E402

KS = (4608, 5120, 5632, 6144, 6656, 7168, 7680)


def rows():
    if os.environ.get("S88_SMALL_CLUSTERS"):
        return small_cluster_rows()
    if os.environ.get("S88_PAGED_DOUBLING"):
        return paged_doubling_rows()
    out = []
    for n, hkv in ((4, 8), (8, 8), (1, 2)):
        out += [("GQA 32/%d b1 L%d N=%d" % (hkv, k, n), hkv, 1, k, n) for k in KS]
    out += [("GQA 32/8 b2 L%d N=4" % k, 8, 2, k, 4) for k in (2560, 3072, 3584)]
    return out


def small_cluster_rows():
    """Run 2 (S88_SMALL_CLUSTERS=1): where the narrow rule clusters fewer splits (batch 2 and 4)."""
    out = [("GQA 32/8 b2 L%d N=4" % k, 8, 2, k, 4) for k in (2048, 2304, 2560, 2816, 3072)]
    out += [("GQA 32/8 b4 L%d N=4" % k, 8, 4, k, 4) for k in (1024, 1152, 1280, 1408, 1536, 2048)]
    out += [("GQA 32/2 b%d L%d N=1" % (b, k), 2, b, k, 1) for b, ks in ((2, (2560, 3072)), (4, (1280, 1536)))
            for k in ks]
    return out


def paged_doubling_rows():
    """Run 3 (S88_PAGED_DOUBLING=1): batch 4-8 at 1.5k-4k, 16 rows, where run 2 found the wide rule 10% slower
    paged (batch 4 / 2k) and 8% faster contiguous."""
    out = [("GQA 32/8 b4 L%d N=4" % k, 8, 4, k, 4) for k in (1792, 2048, 2560, 3072, 4096)]
    out += [("GQA 32/8 b8 L%d N=4" % k, 8, 8, k, 4) for k in (1024, 1536, 2048)]
    out += [("GQA 32/2 b%d L%d N=1" % (b, k), 2, b, k, 1) for b, k in ((8, 2048), (16, 1024))]
    return out


def split_counts():
    """Each row's split count under both rules, contiguous cache (0 workspace bytes: 1 split)."""
    for name, hkv, b, length, n in rows():
        q = torch.randn(b, n, 32, 128, dtype=torch.bfloat16, device="cuda")
        kc = torch.randn(b, length, hkv, 128, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        pages = -(-length // 16)
        table = torch.arange(b * (pages + 1), dtype=torch.int32, device="cuda").view(b, pages + 1)
        pool = torch.randn(b * (pages + 1), 16, hkv, 128, dtype=torch.bfloat16, device="cuda")
        got = []
        for env, paged in (({}, False), (W.OLD, False), ({}, True), (W.OLD, True)):
            saved = {k: os.environ.get(k) for k in W.OLD}
            os.environ.update(env)
            try:
                if paged:
                    nbytes = _C.kvcache_workspace_bytes(q=q, k_cache=pool, v_cache=pool, cache_seqlen=length,
                                                        block_table=table, num_splits=0, out=out, causal=True)
                else:
                    nbytes = _C.kvcache_workspace_bytes(q=q, k_cache=kc, v_cache=kc, cache_seqlen=length,
                                                        num_splits=0, out=out, causal=True)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            rows_ = b * 32 * n
            splits = 1 if nbytes == 0 else next(
                (s for s in range(2, 257) if nbytes == W_bytes(s, rows_)), "?%d" % nbytes)
            got.append(splits)
        tiles = -(-length // 64)
        print("%s: splits contiguous wide %s, narrow %s; paged 16 (a table with a spare column) wide %s, narrow %s"
              " (%d tiles a KV head)" % (name, got[0], got[1], got[2], got[3], tiles), flush=True)


def _a256(x):
    return (x + 255) // 256 * 256


def W_bytes(splits, rows_):
    states = splits * rows_
    return _a256(states * 4) + _a256(states * 128 * 4)


if __name__ == "__main__":
    split_counts()
    W.rows = rows
    W.main()
