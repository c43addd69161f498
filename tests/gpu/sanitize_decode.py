"""A small representative set of CUDA KV-cache (decode) calls for compute-sanitizer
(scripts/gpu_sanitize.sh): flash_attn_with_kvcache over contiguous and paged caches (page sizes 1,
16, 256), appends with rotary (interleaved and GPT-NeoX, full and partial rotary_dim), leftpad,
cache_batch_idx, GQA 8, num_splits 1 and 7 (and the heuristic over a long cache, and heuristic splits
merged inside a thread-block cluster on sm_90, in pairs and threes), out-of-range page
ids in the block table, empty caches, decode through flash_attn_varlen_func with a block table,
split plans (a count per sequence, one padded with -1 items, and one with entries out of range), CSR
page lists (with the max_cache_seqlen hint), csr_to_block_table over lists in and out of range, and
three calls each through the sm_90 head-group kernel and the sm_90 kernel's head-pair form (at
head_dim 128 and 64) and head-quad form, the row pair (more than 16 packed rows a KV head: clusters,
fixed splits, a team with no rows, head_dim 64) and the 16-row CTAs it replaces, and attention sinks on
each place that folds them.
Each call runs twice into NaN-poisoned buffers and, unless --no-check, is compared with the float64
reference and the caches are checked (as tests/gpu/test_kvcache_gpu.py does). No guard memory
around the caches here, so that memcheck sees each cache's own allocation bounds.

Not collected by pytest (no test_ prefix). Usage:
    python tests/gpu/sanitize_decode.py [--no-check] [--only SUBSTRING] [--seed N]
Exit status 0 when every case ran (and matched the reference).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import test_kvcache_gpu as T  # noqa: E402  (its helpers; importing it runs no test)
from sanitize_runner import run_cases  # noqa: E402

F16, B16 = torch.float16, torch.bfloat16
T.GUARD = 0  # caches in their own allocations (PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck)


def kvcache(rng, check, dtype, cfg):
    T.run_case(T.build_case(rng, dtype, cfg), check)


def sinks(rng, check, dtype, cfg):
    T.run_sinks_case(T.build_case(rng, dtype, cfg), check)


def bad_page_ids(rng, check, where, heads_kv=2, head_dim=128, heads_q=None):
    T.out_of_range_page_ids(rng, where, check, heads_kv=heads_kv, head_dim=head_dim, heads_q=heads_q)


def csr_lists(rng, check):
    """CSR page lists with max_cache_seqlen at the most pages (bitwise the block-table call) and at
    1 (close to it). Not against the float64 reference: its bf16 GEMM at these shapes (cuBLAS
    nvjet_sm90_tst_64x8_64x16) stops racecheck with "failed to handle a hardware exception" with
    no fastattn kernel run (bench/NOTES.md, session 68); the reference check is pytest's."""
    case = T.build_case(rng, B16, dict(B=4, Hq=32, Hkv=8, cache_len=2048, Snew=0, page=16))
    table, (at_most, at_one), _ = T.csr_hint_calls(case, [lambda most: most * 16, 1])
    if check:
        assert torch.equal(at_most[0], table[0]) and torch.equal(at_most[1], table[1])
        torch.testing.assert_close(at_one[0].float(), table[0].float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(at_one[1], table[1], atol=1e-3, rtol=0)  # -inf where empty


def csr_table(rng, check):
    import test_decode_wrapper_gpu as W
    W.test_csr_to_block_table_on_the_gpu(rng)


def with_switches(switches):
    """A case function running fn's case with the environment `switches` set (then removed)."""
    def run(rng, check, fn, *args):
        os.environ.update(switches)
        try:
            fn(rng, check, *args)
        finally:
            for name in switches:
                del os.environ[name]
    return run


head_group = with_switches(T.KERNEL_SWITCHES["head_group"])  # the sm_90 head-group kernel
head_group_wide = with_switches(T.KERNEL_SWITCHES["head_group_wide"])  # its wide form (8 heads)
head_group_wide_d64 = with_switches(T.KERNEL_SWITCHES["head_group_wide_d64"])  # ... at head_dim 64
head_group_rows = with_switches(T.KERNEL_SWITCHES["head_group_rows"])  # its token-row form (32 heads)
head_pair = with_switches(T.KERNEL_SWITCHES["head_pair"])    # the sm_90 kernel's head-pair form
head_pair_d64 = with_switches(T.KERNEL_SWITCHES["head_pair_d64"])  # ... at head_dim 64
head_quad = with_switches(T.KERNEL_SWITCHES["head_quad"])    # its head-quad form (head_dim 64)
unclustered = with_switches({"FASTATTN_DECODE_CLUSTER": "0"})  # splits merged by the combine kernel
row_pair = with_switches(T.ROW_PAIR_SWITCHES["row_pair"])  # the row pair wherever it fits
row_block_ctas = with_switches(T.ROW_PAIR_SWITCHES["row_block_ctas"])  # no row pair: 16 rows a CTA


def varlen_decode(rng, check, dtype, page_size):
    if check:
        T.test_varlen_decode_block_table(rng, dtype, page_size, "seqused_k", "causal+alibi_bh+softcap")
        return
    lens = [0, 1, 17, 113, 799]
    table, num_pages = T.make_block_table(rng, lens, page_size)
    kp = T.randn(num_pages, page_size, 2, 128, dtype=dtype)
    vp = T.randn(num_pages, page_size, 2, 128, dtype=dtype)
    q = T.randn(len(lens), 16, 128, dtype=dtype)
    bt = torch.tensor(table, dtype=torch.int32, device=T.DEV)
    T.run_twice(lambda o: T.flash_attn_varlen_func(q, kp, vp, T.i32(range(len(lens) + 1)), None, 1,
                                                   max(lens), block_table=bt, seqused_k=T.i32(lens),
                                                   causal=True, return_softmax_lse=True, out=o),
                lambda: T.nan_full(q.shape, dtype))


def split_plan_bad_entries(rng, check):
    T.split_plan_bad_entries(rng, check)


def cases():
    """(name, function, arguments after (rng, check))."""
    yield "contiguous fp16 d128 decode gqa4", kvcache, (F16, dict())
    yield "contiguous bf16 gqa8 chunk16 causal d256", kvcache, (B16, dict(Hq=16, Hkv=2, D=256, Sq=16, Snew=16, opt="causal"))
    yield "contiguous fp16 leftpad batch_idx rotary interleaved", kvcache, (F16, dict(
        leftpad=True, batch_idx=True, rotary="interleaved", Sq=3, Snew=3, opt="causal"))
    yield "paged 1 bf16 d64 batch_idx", kvcache, (B16, dict(page=1, D=64, cache_len=300, batch_idx=True))
    yield "paged 16 fp16 rotary neox half leftpad window", kvcache, (F16, dict(
        page=16, rotary="neox", rotary_frac=0.5, leftpad=True, Sq=4, Snew=4, opt="window+alibi_bh"))
    yield "paged 256 bf16 gqa8 rotary interleaved", kvcache, (B16, dict(page=256, Hq=16, Hkv=2, rotary="interleaved"))
    # sm_90 producer lanes in groups per tile: 16 boxes a tile (2-tile chunks), 32 (1-tile chunks)
    yield "paged 8 bf16 d96 splits 3", kvcache, (B16, dict(page=8, D=96, cache_len=1500, splits=3))
    yield "paged 8 fp16 d192 leftpad", kvcache, (F16, dict(page=8, D=192, Hq=4, Hkv=2, cache_len=1500, leftpad=True))
    yield "num_splits 1 contiguous", kvcache, (F16, dict(splits=1, cache_len=3000))
    yield "num_splits 7 paged 16 causal softcap", kvcache, (B16, dict(page=16, splits=7, cache_len=3000, Sq=2, Snew=2, opt="causal+softcap"))
    yield "num_splits heuristic long cache", kvcache, (F16, dict(B=2, lens=[7999, 3000], cache_len=8000, Hq=16, Hkv=2))
    yield "cluster merge: batch 1, 8 heuristic splits", kvcache, (B16, dict(B=1, Hq=32, Hkv=8, cache_len=1024, lens=[1023]))
    yield "cluster merge: ragged paged 16, 7 heuristic splits", kvcache, (B16, dict(
        B=3, Hq=8, Hkv=2, cache_len=1000, page=16, Sq=2, Snew=2, opt="causal"))
    yield "cluster merge through the workspace: d256, 8 heuristic splits", kvcache, (B16, dict(
        B=1, Hq=8, Hkv=2, D=256, cache_len=1024, lens=[1023]))
    yield "cluster merge in pairs: batch 8, 2 heuristic splits on 128 CTAs, paged 16", kvcache, (B16, dict(
        B=8, Hq=32, Hkv=8, cache_len=2048, lens="ragged", page=16))
    yield "cluster merge in threes: MHA batch 1, 3 heuristic splits on 96 CTAs, paged 16", kvcache, (B16, dict(
        B=1, Hq=32, Hkv=32, cache_len=1024, lens=[1000], page=16, Snew=0))
    yield "cluster merge in pairs through the workspace: d256, batch 8, 2 heuristic splits on 128 CTAs", kvcache, (
        B16, dict(B=8, Hq=32, Hkv=8, D=256, cache_len=2048, lens="ragged", page=16))
    yield "everything paged 16", kvcache, (B16, dict(page=16, rotary="interleaved", rotary_frac=0.5, batch_idx=True,
                                                     leftpad=True, opt=T.ALL, splits=3, Sq=5, Snew=5))
    yield "out-of-range page ids (reads)", bad_page_ids, ("read_pages",)
    yield "out-of-range page ids (append)", bad_page_ids, ("append_page",)
    yield "empty cache", kvcache, (F16, dict(lens="zeros", Snew=0))
    yield "empty paged cache, first tokens appended", kvcache, (B16, dict(lens="zeros", page=16, Sq=2, Snew=2, rotary="neox", opt="causal"))
    yield "varlen decode block table page 16", varlen_decode, (B16, 16)
    yield "split plan paged16 everything", kvcache, (B16, T.CONFIGS["plan_everything_paged16"])
    yield "split plan contiguous d256 causal", kvcache, (F16, dict(T.CONFIGS["plan_paged64_d256_causal"], page=None))
    yield "split plan padded (a CUDA graph's fixed size) paged16", kvcache, (B16, T.CONFIGS["plan_padded_paged16"])
    yield "split plan entries out of range", split_plan_bad_entries, ()
    yield "CSR page lists, max_cache_seqlen at the most pages and at 1", csr_lists, ()
    yield "csr_to_block_table, lists in and out of range", csr_table, ()
    # the sm_90 head-group kernel (4 KV heads per CTA), its wide form (8; head_dim 128 and 64), its
    # token-row form (32)
    # and the sm_90 kernel's head-pair (2, head_dim 128 and 64) and head-quad (4, head_dim 64) forms
    for form, run, hkv, d in (("head-group kernel", head_group, 4, 128),
                              ("head-group wide form", head_group_wide, 8, 128),
                              ("head-group wide form d64", head_group_wide_d64, 8, 64),
                              ("head-group token-row form", head_group_rows, 32, 128),
                              ("head-pair form", head_pair, 2, 128), ("head-pair form d64", head_pair_d64, 2, 64),
                              ("head-quad form", head_quad, 4, 64)):
        yield f"{form}: everything paged 16, 3 splits", run, (kvcache, B16, dict(
            Hq=max(8, hkv), Hkv=hkv, D=d, page=16, rotary="interleaved", rotary_frac=0.5, batch_idx=True,
            leftpad=True, opt=T.ALL, splits=3, Sq=2, Snew=2))
        yield f"{form}: contiguous, ragged long", run, (kvcache, F16, dict(
            B=2, Hq=32, Hkv=max(8, hkv), D=d, lens=[7999, 3000], cache_len=8000))
        yield f"{form}: out-of-range page ids (reads)", run, (bad_page_ids, "read_pages", hkv, d)
    # the sm_90 kernel's row pair (FASTATTN_DECODE_ROW_PAIR=1: wherever it fits, more than 16 packed rows a
    # KV head at head_dim <= 128)
    rp = T.ROW_PAIR_CONFIGS
    yield "row pair: cluster merge, batch 1, 32 rows, paged 16", row_pair, (kvcache, B16, rp["heuristic_batch1_paged16"])
    yield "row pair: 40 rows (a team with none), paged 8", row_pair, (kvcache, F16, rp["rows40_causal_paged8"])
    yield "row pair: d64, 64 rows, 3 splits, paged 16", row_pair, (kvcache, B16, rp["d64_rows64_splits3_paged16"])
    yield "row pair: everything paged 16, 3 splits", row_pair, (kvcache, B16, rp["everything_paged16"])
    yield "row pair: out-of-range page ids (reads), 24 rows", row_pair, (bad_page_ids, "read_pages", 2, 128, 48)
    yield "row pair: sinks, cluster merge", row_pair, (sinks, B16, rp["heuristic_batch1_paged16"])
    yield "per-head row blocks (no row pair): 32 rows, paged 16", row_block_ctas, (
        kvcache, B16, rp["rows32_causal_paged16"])
    # attention sinks, folded where a row is finished: one split, the cluster merge, the combine
    # kernel, a split plan, and each head-group form's per-column fold
    yield "sinks: one split, paged 16", sinks, (B16, dict(page=16, lens="ragged", Snew=0))
    yield "sinks: cluster merge, batch 1, 8 heuristic splits", sinks, (B16, dict(
        B=1, Hq=32, Hkv=8, cache_len=1024, lens=[1023]))
    yield "sinks: combine kernel, 7 splits", unclustered, (sinks, F16, dict(page=16, splits=7, cache_len=3000))
    yield "sinks: split plan paged16 everything", sinks, (B16, T.CONFIGS["plan_everything_paged16"])
    yield "sinks: head-group wide form d64, 3 splits", head_group_wide_d64, (sinks, B16, dict(
        Hq=64, Hkv=8, D=64, page=16, splits=3))
    yield "sinks: head-group token-row form", head_group_rows, (sinks, B16, dict(Hq=32, Hkv=32, page=16))
    yield "sinks: head-group kernel, empty", head_group, (sinks, B16, dict(
        Hq=16, Hkv=4, lens="zeros", Snew=0, page=16, empty=True))
    # the wide form at head_dim 64 over heads_kv 32 (four CTAs a sequence; the heuristic's at MHA batch 32)
    yield "head-group wide form d64: MHA, ragged, paged 16", head_group_wide_d64, (kvcache, B16, dict(
        B=3, Hq=32, Hkv=32, D=64, page=16, cache_len=600, lens="ragged", Sq=2, Snew=2, opt="causal"))


if __name__ == "__main__":
    sys.exit(run_cases("sanitize_decode", __doc__, cases()))
