"""GPU cascade (shared-prefix) attention: fastattn.shared_prefix_attention and FlashInfer's two
wrapper classes on torch CUDA tensors, against a reference computed here on the GPU in float64
by torch: for each request, attention (tests/gpu/gpu_reference.py attention_ref, which shares
nothing with the library) over the concatenation of the shared prefix and the request's suffix
keys gathered from its pages, queries aligned bottom-right against prefix + suffix. That is the
definition of the op (include/fastattn/ops.h SharedPrefixAttentionArgs), computed without any
cascade.

The rule (DESIGN.md, FlashAttention's rule with the KV-cache factor): max|out - ref| <= 3 *
max|naive_in_dtype - ref| + 1e-5, where the naive computation is the same attention over the
concatenated keys done in the input dtype (the result here is merged from partial states rounded
to the input dtype, as a KV-cache call merges its splits); LSE within 1e-3 + 1e-3 * |ref|, -inf
exactly where a row sees no key (its output exactly 0). Every call is made twice into
NaN-poisoned out= buffers: both must be fully written and bitwise equal. Inputs are fresh each run
(seed printed on failure, FASTATTN_TEST_SEED=<seed> replays).

Covered: decode (one query per request) and prefill (qo_indptr, causal and not), fp16 / bf16,
prefix lengths 0, 1, 17, 799, 2000, 32768, ragged suffixes 0..1024, page sizes 1 / 16 / 256,
GQA 1 / 4 / 8, head_dim 64 / 128 / 256, every option (window, sliding window, ALiBi (Hq) and
(B, Hq), softcap, scale), queries that start inside the prefix (the per-request prefix pass),
explicit prefix splits (1 .. more than key tiles), rows past qo_indptr[B], empty prefix / suffix /
batch, strided views, the wrappers (begin_forward / forward / forward_return_lse / end_forward,
with and without a usable workspace_buffer), CUDA-graph capture of wrapper.forward replayed with
new q, and the CUDA-only errors.
"""

import functools

import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402
from fastattn import _C  # noqa: E402
from fastattn.cascade import (BatchDecodeWithSharedPrefixPagedKVCacheWrapper,  # noqa: E402
                              BatchPrefillWithSharedPrefixPagedKVCacheWrapper)

import gpu_reference as R  # noqa: E402
import gpu_helpers  # noqa: E402
from gpu_helpers import capture_or_xfail, cumsum0, i32, nan_full, randn  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
FACTOR = 3.0  # FlashAttention's KV-cache factor (see the module notes)


# ---- helpers ---------------------------------------------------------------------------------------


# Longer left windows than the prefill tests' (the prefix and suffix are long), right windows of
# up to 3 keys (a query may stop inside the prefix), smaller ALiBi slopes.
make_options = functools.partial(gpu_helpers.make_options, window_left=300, wright=3, alibi=(0.1, 0.01))


ALL = "causal+window+alibi_bh+softcap+scale"


class Case:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def build_case(rng, dtype, *, P, suffix, qo=None, page=16, Hq=16, Hkv=4, D=128, opt="none",
               pad_rows=0, strided=False, spare_pages=3):
    """Random inputs. suffix: suffix keys per request; qo: query rows per request (None: decode,
    one row each, no qo_indptr); pad_rows: extra q rows past qo_indptr[B] (owned by no request).
    Pages: the suffixes' pages in a random permutation of a (num_pages, 2, page, Hkv, D) NHD
    buffer (FlashInfer's unique_kv_data), plus spare pages never referenced."""
    B = len(suffix)
    need = [-(-n // page) for n in suffix]
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages).tolist()
    lists, pos = [], 0
    for n in need:
        lists.append(perm[pos:pos + n])
        pos += n
    last = [n - (k - 1) * page if k > 0 else 0 for n, k in zip(suffix, need)]
    kv_data = randn(num_pages, 2, page, Hkv, D, dtype=dtype)
    if strided:  # prefix k / v interleaved in one tensor, q every other head of a wider tensor
        kvs = randn(P, 2, Hkv, D, dtype=dtype)
        k_shared, v_shared = kvs[:, 0], kvs[:, 1]
    else:
        k_shared, v_shared = randn(P, Hkv, D, dtype=dtype), randn(P, Hkv, D, dtype=dtype)
    decode = qo is None
    qo_lens = [1] * B if decode else list(qo)
    total_q = sum(qo_lens) + pad_rows
    if strided:
        q = randn(total_q, 2 * Hq, D, dtype=dtype)[:, 1::2]
        make_out = lambda: nan_full((total_q, Hq, D + 8), dtype)[..., :D]  # noqa: E731
    else:
        q = randn(total_q, Hq, D, dtype=dtype)
        make_out = lambda: nan_full((total_q, Hq, D), dtype)  # noqa: E731
    return Case(dtype=dtype, B=B, P=P, suffix=list(suffix), qo_lens=qo_lens, decode=decode,
                page=page, Hq=Hq, Hkv=Hkv, D=D, q=q, k_shared=k_shared, v_shared=v_shared,
                kv_data=kv_data, k_pages=kv_data[:, 0], v_pages=kv_data[:, 1],
                indptr=i32(cumsum0(need)), indices=i32([p for l in lists for p in l] or []),
                last=i32(last), lists=lists, qo_indptr=None if decode else i32(cumsum0(qo_lens)),
                total_q=total_q, kw=make_options(rng, opt, B, Hq), make_out=make_out)


def reference(case, q=None):
    """(out, lse, out_naive): float64 reference out (total_q, Hq, D) and lse (Hq, total_q), and the
    naive computation in the input dtype. Rows past qo_indptr[B] stay 0 / -inf."""
    q = case.q if q is None else q
    out = torch.zeros(case.total_q, case.Hq, case.D, dtype=R.REF_DTYPE, device=DEV)
    lse = torch.full((case.Hq, case.total_q), float("-inf"), dtype=R.REF_DTYPE, device=DEV)
    naive = torch.zeros(case.total_q, case.Hq, case.D, dtype=case.dtype, device=DEV)
    starts = cumsum0(case.qo_lens)
    kw = dict(case.kw)
    slopes = kw.pop("alibi_slopes", None)
    for b in range(case.B):
        r0, sq = starts[b], case.qo_lens[b]
        if sq == 0:
            continue
        ks = R.gather_pages(case.k_pages, case.lists[b], case.suffix[b])
        vs = R.gather_pages(case.v_pages, case.lists[b], case.suffix[b])
        keys = torch.cat([case.k_shared, ks])[None]
        vals = torch.cat([case.v_shared, vs])[None]
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        o, l, _ = R.attention_ref(q[r0:r0 + sq][None], keys, vals, alibi_slopes=sl, **kw)
        on, _, _ = R.attention_ref(q[r0:r0 + sq][None], keys, vals, alibi_slopes=sl, naive=True, **kw)
        out[r0:r0 + sq], lse[:, r0:r0 + sq], naive[r0:r0 + sq] = o[0], l[0], on[0]
    return out, lse, naive


def cascade_call(case, out, q=None, **extra):
    return fastattn.shared_prefix_attention(
        case.q if q is None else q, case.k_shared, case.v_shared, case.k_pages, case.v_pages,
        case.indptr, case.indices, case.last, qo_indptr=case.qo_indptr, return_lse=True, out=out,
        **case.kw, **extra)


def run_twice(call, make_out):
    """call(out_buffer) -> (out, lse). Twice, each into a fresh NaN-poisoned buffer: out= honoured,
    both runs bitwise equal. Returns the first run's results."""
    results = []
    for _ in range(2):
        buf = make_out()
        res = call(buf)
        res = res if isinstance(res, tuple) else (res,)
        assert res[0].data_ptr() == buf.data_ptr(), "out= was not used for the output"
        results.append(res)
    torch.cuda.synchronize()
    for name, a, b in zip(("out", "lse"), results[0], results[1]):
        R.assert_bitwise_equal(name, a, b)
    return results[0]


def check(name, out, lse, ref):
    ref_out, ref_lse, naive = ref
    R.assert_out_close(name, out, ref_out, naive, factor=FACTOR)
    R.assert_empty_rows_zero(name, out, ref_lse)
    if lse is not None:
        assert tuple(lse.shape) == (out.shape[0], out.shape[1]), lse.shape  # (total_q, Hq)
        R.assert_lse_close(name + " lse", lse.t(), ref_lse)


def run_case(case, **extra):
    out, lse = run_twice(lambda o: cascade_call(case, o, **extra), case.make_out)
    check("out", out, lse, reference(case))
    return out, lse


# ---- decode: prefix lengths x page sizes x GQA ------------------------------------------------------

PREFIXES = [0, 1, 17, 799, 32768]
PAGES = [1, 16, 256]
GQAS = [(16, 16), (16, 4), (16, 2)]  # GQA 1, 4, 8
DECODE_SUFFIX = [0, 1, 17, 113, 799, 1024]
GRID = [(p, pg, GQAS[(i + j) % 3]) for i, p in enumerate(PREFIXES) for j, pg in enumerate(PAGES)]
GRID_IDS = ["P%d-page%d-gqa%d" % (p, pg, hq // hkv) for p, pg, (hq, hkv) in GRID]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("P,page,heads", GRID, ids=GRID_IDS)
def test_decode(seed, dtype, P, page, heads):
    suffix = list(DECODE_SUFFIX)
    seed.shuffle(suffix)
    if P == 32768:
        suffix = suffix[:4]  # the float64 reference over 33k keys per request is the cost here
    case = build_case(seed, dtype, P=P, suffix=suffix, page=page, Hq=heads[0], Hkv=heads[1])
    run_case(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,Hq,Hkv,opt,P", [(37, 32, 4, "none", 799), (9, 16, 1, "softcap+scale", 2000),
                                           (16, 16, 2, "causal", 4097), (3, 16, 4, "wright", 300)])
def test_decode_gqa_packed_prefix_rows(seed, dtype, B, Hq, Hkv, opt, P):
    """The stacked decode prefix pass packs a KV head's G query heads into its rows (G x B rows a KV
    head): several 128-row blocks with a part-filled last one (37 x 8 = 296), more than one block
    of MQA (9 x 16 = 144), exactly one (16 x 8), and few rows (3 x 4); every suffix length kind, LSE
    checked."""
    suffix = [seed.choice([0, 1, 17, 113, 799, 1024]) for _ in range(B)]
    case = build_case(seed, dtype, P=P, suffix=suffix, page=16, Hq=Hq, Hkv=Hkv, opt=opt)
    run_case(case)


@pytest.mark.parametrize("Hq,Hkv", [(32, 32), (32, 8)], ids=["mha", "gqa8"])
@pytest.mark.parametrize("hint", ["none", "zero", "exact"])
def test_decode_suffix_pass_forms(seed, Hq, Hkv, hint):
    """Batch 32 with ~1k suffixes, where the decode planner takes its multi-head forms and split
    counts for the suffix pass (planned as varlen decode plans it, from max_suffix_len: read from
    the index arrays, unknown, or given), writing into the natural (MHA) or head-major (GQA packed)
    partial states."""
    suffix = [seed.randrange(900, 1100) for _ in range(32)]
    case = build_case(seed, torch.bfloat16, P=1000, suffix=suffix, page=16, Hq=Hq, Hkv=Hkv)
    extra = {"none": {}, "zero": dict(max_suffix_len=0), "exact": dict(max_suffix_len=max(suffix))}[hint]
    run_case(case, **extra)


# ---- prefill (qo_indptr): causal and not ------------------------------------------------------------

PREFILL_QO = [1, 17, 0, 64, 5, 130]
PREFILL_SUFFIX = [1, 40, 3, 1024, 5, 799]  # each >= its query rows: queries end the suffix


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("P,page,heads", GRID, ids=GRID_IDS)
def test_prefill_causal(seed, dtype, P, page, heads):
    qo, suffix = list(PREFILL_QO), list(PREFILL_SUFFIX)
    if P == 32768:
        qo, suffix = qo[:4], suffix[:4]
    case = build_case(seed, dtype, P=P, suffix=suffix, qo=qo, page=page, Hq=heads[0], Hkv=heads[1],
                      opt="causal")
    run_case(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("P", [17, 2000])
def test_prefill_noncausal(seed, dtype, P):
    case = build_case(seed, dtype, P=P, suffix=[0, 33, 300, 7], qo=[3, 0, 140, 9], page=16)
    run_case(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt", ["causal", "causal+alibi", "wright"])
def test_prefill_queries_inside_prefix(seed, dtype, opt):
    """More query rows than suffix keys: under causal / a right window the first rows stop inside
    the prefix, so the prefix pass cannot stack the requests (decided on the device)."""
    case = build_case(seed, dtype, P=300, suffix=[3, 0, 50, 20], qo=[17, 5, 40, 130], page=16,
                      opt=opt)
    run_case(case)


# ---- options ------------------------------------------------------------------------------------------

OPTS = ["window", "wleft", "wright", "alibi", "alibi_bh", "softcap+scale", "causal+wleft", ALL]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opt", OPTS)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_options(seed, dtype, opt, kind):
    if kind == "decode":
        case = build_case(seed, dtype, P=2000, suffix=[0, 1, 17, 400, 113], page=16, opt=opt)
    else:
        case = build_case(seed, dtype, P=2000, suffix=[5, 1, 300, 200, 130], qo=[5, 0, 40, 200, 66],
                          page=16, opt=opt)
    run_case(case)


@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_head_dims(seed, D, kind):
    qo = None if kind == "decode" else [7, 64, 1]
    case = build_case(seed, torch.bfloat16, P=799, suffix=[17, 300, 1], qo=qo, page=16, Hq=8, Hkv=2,
                      D=D, opt="causal" if qo else "none")
    run_case(case)


# ---- prefix splits, hints, workspace ------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [1, 3, 64, 1000])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_num_splits(seed, num_splits, kind):
    """Fixed prefix splits: 1 (none), a few, more than the prefix has key tiles (empty splits
    merge exactly), and many requests' worth."""
    qo = None if kind == "decode" else [3, 20, 1, 0]
    case = build_case(seed, torch.float16, P=1500, suffix=[10, 100, 1, 0], qo=qo, page=16,
                      opt="causal" if qo else "none")
    run_case(case, num_splits=num_splits)


def test_num_splits_per_request_pass(seed):
    """Splits of the per-request prefix pass (ALiBi): grid z = requests x splits."""
    case = build_case(seed, torch.bfloat16, P=3000, suffix=[10, 100, 1], qo=[3, 20, 1], page=16,
                      opt="causal+alibi_bh")
    run_case(case, num_splits=7)


@pytest.mark.parametrize("suffix_num_splits", [1, 3, 64, 1000])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_suffix_num_splits(seed, suffix_num_splits, kind):
    """Fixed suffix splits of the decode suffix pass (more than a suffix has key tiles included:
    empty splits merge exactly) on ragged suffixes with a long one; prefill calls ignore them."""
    qo = None if kind == "decode" else [3, 20, 1, 0]
    case = build_case(seed, torch.bfloat16, P=700, suffix=[10, 5000, 0, 300], qo=qo, page=16,
                      opt="causal" if qo else "none")
    run_case(case, suffix_num_splits=suffix_num_splits)


def test_decode_wrapper_splits_a_long_suffix(seed):
    """begin_forward picks the suffix pass's split count from the suffix lengths: a long suffix
    among short ones gets several (fastattn.decode_num_splits_for_lengths), near-uniform suffixes
    keep the heuristic (0)."""
    suffix = [64] * 40
    suffix[seed.randrange(40)] = 20000
    case = build_case(seed, torch.float16, P=500, suffix=suffix, page=16, Hq=16, Hkv=8)
    w = decode_wrapper(case)
    assert w._plan["suffix_num_splits"] > 1, w._plan["suffix_num_splits"]
    out, lse = w.forward_return_lse(case.q, case.k_shared, case.v_shared, case.kv_data)
    out2 = w.forward(case.q, case.k_shared, case.v_shared, case.kv_data)
    check("ragged suffixes", out, lse, reference(case))
    R.assert_bitwise_equal("forward vs forward_return_lse", out, out2)
    case = build_case(seed, torch.float16, P=500, suffix=[1000 + seed.randrange(50) for _ in range(8)],
                      page=16, Hq=16, Hkv=8)
    w = decode_wrapper(case)
    assert w._plan["suffix_num_splits"] == 0
    check("near-uniform suffixes", w.forward(case.q, case.k_shared, case.v_shared, case.kv_data),
          None, reference(case))


@pytest.mark.parametrize("hints", ["none", "zero", "exact"])
def test_planning_hints(seed, hints):
    """max_seqlen_q / max_suffix_len: read from the index arrays (None), unknown (0) or given."""
    case = build_case(seed, torch.float16, P=640, suffix=[3, 70, 500, 0], qo=[3, 60, 9, 0],
                      page=16, opt="causal")
    extra = {"none": {}, "zero": dict(max_seqlen_q=0, max_suffix_len=0),
             "exact": dict(max_seqlen_q=60, max_suffix_len=500)}[hints]
    run_case(case, **extra)


def test_caller_workspace(seed):
    """A large enough uint8 workspace is used as given (nothing else allocated for scratch); a
    too small one is replaced through the allocator; through _C without the allocator a too
    small workspace is an error naming the size."""
    case = build_case(seed, torch.float16, P=500, suffix=[3, 70], page=16)
    ws = torch.zeros(64 << 20, dtype=torch.uint8, device=DEV)
    out, lse = run_case(case, workspace=ws)
    assert bool((ws != 0).any()), "the workspace given was not used"
    run_case(case, workspace=torch.empty(16, dtype=torch.uint8, device=DEV))
    small = torch.empty(16, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="workspace"):
        _C.shared_prefix_attention_forward(
            q=case.q, k_shared=case.k_shared, v_shared=case.v_shared, k_pages=case.k_pages,
            v_pages=case.v_pages, page_indptr=case.indptr, page_indices=case.indices,
            last_page_len=case.last, out=torch.empty_like(case.q), workspace=small,
            cuda_stream=int(torch.cuda.current_stream().cuda_stream))


# ---- empty things ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_empty_prefix_and_suffixes(seed, kind):
    """No prefix and no suffix key: every row is empty (output 0, LSE -inf)."""
    qo = None if kind == "decode" else [2, 0, 3]
    case = build_case(seed, torch.float16, P=0, suffix=[0, 0, 0], qo=qo, page=16)
    out, lse = run_case(case)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_empty_prefix_is_exact(seed):
    """P = 0: the suffix pass alone writes the result (no merge, no extra rounding): bitwise what
    flash_attn_with_kvcache gives over the suffix pages. Suffixes under 256 keys, so both take one
    split (the decode heuristic gives a split at least 128 keys)."""
    case = build_case(seed, torch.float16, P=0, suffix=[5, 200, 17], page=16)
    out, lse = run_case(case)
    table = torch.zeros(case.B, max(len(l) for l in case.lists), dtype=torch.int32, device=DEV)
    for b, l in enumerate(case.lists):
        table[b, :len(l)] = i32(l)
    o2, l2 = fastattn.flash_attn_with_kvcache(case.q[:, None], case.k_pages, case.v_pages,
                                              cache_seqlens=i32(case.suffix), block_table=table,
                                              num_splits=1, return_softmax_lse=True)
    R.assert_bitwise_equal("out vs kvcache", out, o2[:, 0])
    R.assert_bitwise_equal("lse vs kvcache", lse, l2[:, :, 0])


def test_rows_past_qo_indptr(seed):
    """q rows past qo_indptr[B] belong to no request: output 0, LSE -inf, with and without a
    prefix split over several slots."""
    case = build_case(seed, torch.bfloat16, P=900, suffix=[30, 2], qo=[4, 2], page=16, pad_rows=5,
                      opt="causal")
    out, lse = run_case(case, num_splits=3)
    assert bool((out[6:] == 0).all()) and bool(torch.isneginf(lse[6:]).all())


def test_no_request(seed):
    """qo_indptr of one entry (B = 0): every q row is padding."""
    case = build_case(seed, torch.float16, P=100, suffix=[], qo=[], page=16, pad_rows=3)
    out, lse = run_case(case)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_no_query(seed):
    case = build_case(seed, torch.float16, P=100, suffix=[], page=16)
    out = fastattn.shared_prefix_attention(case.q, case.k_shared, case.v_shared, case.k_pages,
                                           case.v_pages, case.indptr, case.indices, case.last)
    assert tuple(out.shape) == (0, case.Hq, case.D)


def test_strided_views(seed):
    """q every other head of a wider tensor, out with a padded head dim, prefix k / v interleaved,
    suffix pages the halves of FlashInfer's NHD buffer."""
    case = build_case(seed, torch.float16, P=777, suffix=[17, 0, 260], qo=[4, 1, 33], page=16,
                      strided=True, opt="causal+softcap")
    run_case(case)


# ---- errors ------------------------------------------------------------------------------------------------


def test_float32_not_supported(seed):
    case = build_case(seed, torch.float16, P=10, suffix=[3], page=16)
    f = lambda x: x.float()  # noqa: E731
    with pytest.raises(NotImplementedError, match="float16 or bfloat16"):
        fastattn.shared_prefix_attention(f(case.q), f(case.k_shared), f(case.v_shared),
                                         f(case.k_pages), f(case.v_pages), case.indptr, case.indices,
                                         case.last)


def test_block_table_suffix_rejected(seed):
    case = build_case(seed, torch.float16, P=10, suffix=[3], page=16)
    with pytest.raises(ValueError, match="block_table"):
        _C.shared_prefix_attention_forward(
            q=case.q, k_shared=case.k_shared, v_shared=case.v_shared, k_pages=case.k_pages,
            v_pages=case.v_pages, block_table=i32([0]).view(1, 1), last_page_len=case.last,
            out=torch.empty_like(case.q))


# ---- the wrappers ------------------------------------------------------------------------------------------


def decode_wrapper(case, workspace_bytes=128 << 20, layout="NHD"):
    w = BatchDecodeWithSharedPrefixPagedKVCacheWrapper(
        torch.empty(workspace_bytes, dtype=torch.uint8, device=DEV), layout)
    w.begin_forward(case.indptr, case.indices, case.last, case.Hq, case.Hkv, case.D, case.page,
                    case.dtype)
    return w


def prefill_wrapper(case, workspace_bytes=128 << 20, layout="NHD"):
    w = BatchPrefillWithSharedPrefixPagedKVCacheWrapper(
        torch.empty(workspace_bytes, dtype=torch.uint8, device=DEV), layout)
    w.begin_forward(case.qo_indptr, case.indptr, case.indices, case.last, case.Hq, case.Hkv, case.D)
    return w


def hnd_inputs(case):
    """The case's prefix and pages in FlashInfer's HND layout, contiguous copies: k_shared /
    v_shared (Hkv, P, D) and unique_kv_data (num_pages, 2, Hkv, page, D)."""
    return (case.k_shared.transpose(0, 1).contiguous(), case.v_shared.transpose(0, 1).contiguous(),
            case.kv_data.transpose(2, 3).contiguous())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("workspace_bytes", [128 << 20, 64], ids=["buffer", "tiny-buffer"])
def test_decode_wrapper(seed, dtype, workspace_bytes):
    case = build_case(seed, dtype, P=1200, suffix=[0, 1, 17, 113, 799], page=16)
    w = decode_wrapper(case, workspace_bytes)
    ref = reference(case)
    out = w.forward(case.q, case.k_shared, case.v_shared, case.kv_data)
    check("forward", out, None, ref)
    out2, lse = w.forward_return_lse(case.q, case.k_shared, case.v_shared,
                                     (case.k_pages, case.v_pages))
    check("forward_return_lse", out2, lse, ref)
    R.assert_bitwise_equal("forward vs forward_return_lse", out, out2)
    w.end_forward()
    with pytest.raises(RuntimeError, match="begin_forward"):
        w.forward(case.q, case.k_shared, case.v_shared, case.kv_data)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_wrapper(seed, dtype, causal):
    case = build_case(seed, dtype, P=1200, suffix=[40, 1, 300, 64], qo=[40, 1, 0, 64], page=16,
                      opt="causal" if causal else "none")
    w = prefill_wrapper(case)
    ref = reference(case)
    out = w.forward(case.q, case.k_shared, case.v_shared, case.kv_data, causal=causal)
    check("forward", out, None, ref)
    out2, lse = w.forward_return_lse(case.q, case.k_shared, case.v_shared, case.kv_data,
                                     causal=causal)
    check("forward_return_lse", out2, lse, ref)
    w.end_forward()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("page,Hkv,D", [(16, 4, 128), (1, 2, 64), (64, 8, 256)])
def test_wrappers_hnd_layout(seed, dtype, kind, page, Hkv, D):
    """kv_layout "HND": the shared prefix (Hkv, P, D) and the pages (num_pages, 2, Hkv, page, D),
    read in place as strided views, packed and as a (k, v) tuple; the inputs unchanged."""
    if kind == "decode":
        case = build_case(seed, dtype, P=700, suffix=[0, 1, 17, 113, 799, 2000], page=page,
                          Hq=2 * Hkv, Hkv=Hkv, D=D)
        w = decode_wrapper(case, layout="HND")
        extra = {}
    else:
        case = build_case(seed, dtype, P=700, suffix=[40, 1, 300, 64], qo=[40, 1, 0, 64], page=page,
                          Hq=2 * Hkv, Hkv=Hkv, D=D, opt="causal")
        w = prefill_wrapper(case, layout="HND")
        extra = dict(causal=True)
    ks, vs, kv = hnd_inputs(case)
    before = [x.clone() for x in (ks, vs, kv)]
    ref = reference(case)
    out, lse = w.forward_return_lse(case.q, ks, vs, kv, **extra)
    check("HND packed", out, lse, ref)
    out2 = w.forward(case.q, ks, vs, (kv[:, 0], kv[:, 1]), **extra)
    R.assert_bitwise_equal("HND tuple vs packed", out, out2)
    for x, y in zip((ks, vs, kv), before):
        assert torch.equal(x, y), "forward() wrote into its inputs"


# ---- CUDA graphs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_cuda_graph_wrapper_forward(seed, kind):
    """wrapper.forward_return_lse captured into a CUDA graph after begin_forward, replayed with new
    q written into the captured q: each replay matches the reference for that q."""
    if kind == "decode":
        case = build_case(seed, torch.float16, P=4000, suffix=[0, 17, 113, 799, 256], page=16)
        w = decode_wrapper(case)
        run = lambda: w.forward_return_lse(case.q, case.k_shared, case.v_shared, case.kv_data)  # noqa: E731
    else:
        case = build_case(seed, torch.bfloat16, P=4000, suffix=[20, 1, 300, 64], qo=[20, 1, 0, 64],
                          page=16, opt="causal")
        w = prefill_wrapper(case)
        run = lambda: w.forward_return_lse(case.q, case.k_shared, case.v_shared, case.kv_data,  # noqa: E731
                                           causal=True)
    holder = {}

    def fn():
        holder["res"] = run()

    graph = capture_or_xfail(fn)
    for _ in range(3):
        case.q.copy_(torch.randn_like(case.q))
        holder["res"][0].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        out, lse = holder["res"]
        check("graph replay", out, lse, reference(case))


# ---- a long shared prompt, many requests --------------------------------------------------------------------------


def test_long_prefix_many_requests(seed):
    """32k shared prefix, 64 decode requests with ragged suffixes (the benchmark's shape class),
    checked on a sample of requests (the reference is per request)."""
    B = 64
    suffix = [seed.randint(0, 1024) for _ in range(B)]
    case = build_case(seed, torch.float16, P=32768, suffix=suffix, page=16, Hq=32, Hkv=8)
    out, lse = run_twice(lambda o: cascade_call(case, o), case.make_out)
    sample = sorted(seed.sample(range(B), 6))
    sub = Case(**dict(case.__dict__))
    sub.B, sub.suffix, sub.lists = len(sample), [case.suffix[b] for b in sample], [case.lists[b] for b in sample]
    sub.qo_lens, sub.total_q = [1] * len(sample), len(sample)
    rows = torch.tensor(sample, device=DEV)
    check("sampled requests", out[rows], lse[rows], reference(sub, q=case.q[rows]))
