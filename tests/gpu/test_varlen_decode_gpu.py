"""GPU varlen decode: flash_attn_varlen_func (block table) and fastattn._C.varlen_attention_forward
(CSR page lists) with one query per sequence over a paged cache, which run the split-KV decode
kernels (src/cuda/decode/varlen_decode_host.cpp) instead of the prefill kernel, against a float64
reference computed on the GPU (tests/gpu/gpu_reference.py varlen_ref over the gathered pages).

The route is taken when the keys are paged, max_seqlen_q == 1, total_q == batch and no attn_probs
are asked for (ALiBi slopes per head, or (B, Hq) with batch stride 0); everything else stays on the
prefill kernel, and tests here check both sides of that line. varlen_workspace_bytes() > 0 shows
that a call was routed (only decode-shaped calls use a workspace); FASTATTN_VARLEN_DECODE=0 forces
the prefill kernel for the comparison test.

The rule (DESIGN.md, FlashAttention's rule for KV-cache tests): max|out - ref| <= 3 *
max|naive_in_dtype - ref| + 1e-5; LSE within 1e-3 + 1e-3 * |ref|, -inf exactly where no key is
visible (the output exactly 0 there). Every call is made twice into NaN-poisoned out= buffers (and
NaN-poisoned LSE where the call goes through fastattn._C): both must be fully written and bitwise
equal. Inputs are fresh each run (seed printed on failure, FASTATTN_TEST_SEED=<seed> replays).
Sizes are small but for one 131072-key sequence; the module runs in well under a minute on an H200.
"""

import pytest

torch = pytest.importorskip("torch")

from fastattn import _C  # noqa: E402
from fastattn import flash_attn_varlen_func  # noqa: E402

import gpu_reference as R  # noqa: E402
from gpu_helpers import (RANDOM_SCENARIOS, capture_or_xfail, cumsum0, i32, nan_full, randn,  # noqa: E402
                         run_random_scenarios, stream_ptr, strided_sinks)
import test_prefill as P  # noqa: E402  (its helpers; importing it runs no test)
import test_kvcache_gpu as KV  # noqa: E402  (its form grids; importing it runs no test)

DEV = "cuda"
DTYPES, DTYPE_IDS = P.DTYPES, P.DTYPE_IDS
PAGE_SIZES = [1, 16, 64, 256]
FACTOR = 3.0  # the KV-cache rule
LENS = [0, 1, 17, 113, 799, 2000]  # tokens per sequence (shuffled per test)



# ---- a decode problem ----------------------------------------------------------------------------


class Case:
    """One decode step: q (total_q, Hq, D), pages (num_pages, page_size, Hkv, D), per-sequence
    page lists and key lengths; index tensors on the GPU."""

    def __init__(self, rng, dtype, lens, page_size, hq, hkv, d, addressing, lengths_from,
                 lq=None, extra_q_rows=0, opt="none", strided=False, sinks=False):
        self.dtype, self.lens, self.ps, self.hq, self.d = dtype, list(lens), page_size, hq, d
        self.addressing, self.lengths_from = addressing, lengths_from
        b = len(lens)
        self.lq = [1] * b if lq is None else list(lq)
        self.cu_q = cumsum0(self.lq)
        total_q = self.cu_q[-1] + extra_q_rows
        if addressing == "block_table":
            self.lists, num_pages = P.make_block_table(rng, lens, page_size)
            self.bt = torch.tensor(self.lists, dtype=torch.int32, device=DEV)
            last = None
        else:
            self.lists, indptr, indices, last, num_pages = P.make_csr(
                rng, lens, page_size, spare=(lengths_from != "last_page_len"))
            self.indptr, self.indices = i32(indptr), i32(indices)
        if strided:  # FlashInfer's (num_pages, 2, page_size, Hkv, D); q every other head
            kv = randn(num_pages, 2, page_size, hkv, d, dtype=dtype)
            self.kp, self.vp = kv[:, 0], kv[:, 1]
            self.q = randn(total_q, 2 * hq, d, dtype=dtype)[:, 1::2]
        else:
            self.kp = randn(num_pages, page_size, hkv, d, dtype=dtype)
            self.vp = randn(num_pages, page_size, hkv, d, dtype=dtype)
            self.q = randn(total_q, hq, d, dtype=dtype)
        self.strided = strided
        self.cq = i32(self.cu_q)
        self.lengths = {"seqused_k": dict(seqused_k=i32(lens)),
                        "cu_seqlens_k": dict(cu_seqlens_k=i32(cumsum0(lens))),
                        "last_page_len": dict(last_page_len=i32(last or []))}[lengths_from]
        self.kw = P.make_options(rng, opt, b, hq)
        self.max_seqlen_q = max(self.lq + [0])
        self.max_seqlen_k = max(lens + [0])
        # Attention sinks (Hq) float32 near the scores' scale, a stride-2 view; None: no sinks.
        self.sinks = strided_sinks(hq) if sinks else None

    def make_out(self):
        if self.strided:  # head stride D + 8
            return torch.full((self.q.shape[0], self.hq, self.d + 8), float("nan"), device=DEV,
                              dtype=self.dtype)[..., :self.d]
        return nan_full(self.q.shape, self.dtype)

    def c_args(self, out, lse=None, probs=None):
        """Keyword arguments of fastattn._C.varlen_attention_forward / varlen_workspace_bytes."""
        kw = self.kw
        left, right = kw.get("window_size", (-1, -1))
        keys = dict(block_table=self.bt) if self.addressing == "block_table" else \
            dict(page_indptr=self.indptr, page_indices=self.indices)
        return dict(q=self.q, cu_seqlens_q=self.cq, max_seqlen_q=self.max_seqlen_q, k_pages=self.kp,
                    v_pages=self.vp, max_seqlen_k=self.max_seqlen_k, out=out, lse=lse, probs=probs,
                    softmax_scale=kw.get("softmax_scale"), causal=kw.get("causal", False),
                    window_left=left, window_right=right, softcap=kw.get("softcap", 0.0),
                    alibi_slopes=kw.get("alibi_slopes"), sinks=self.sinks, cuda_stream=stream_ptr(),
                    **keys, **self.lengths)

    def call(self, out, workspace="alloc"):
        """The op on `out`: the public flash_attn_varlen_func for a block table with lengths from
        seqused_k / cu_seqlens_k, else fastattn._C with a NaN-poisoned LSE. workspace: "alloc"
        (the Python layer's allocator callback), None (no workspace: one split) or a tensor."""
        if (self.addressing == "block_table" and self.lengths_from != "last_page_len"
                and isinstance(workspace, str)):
            return flash_attn_varlen_func(
                self.q, self.kp, self.vp, self.cq, self.lengths.get("cu_seqlens_k"),
                self.max_seqlen_q, self.max_seqlen_k, block_table=self.bt,
                seqused_k=self.lengths.get("seqused_k"), return_softmax_lse=True, out=out,
                sinks=self.sinks, **self.kw)
        lse = nan_full((self.hq, self.q.shape[0]), torch.float32)
        alloc = None
        if isinstance(workspace, str):
            alloc, workspace = (lambda n: torch.empty(n, dtype=torch.uint8, device=DEV)), None
        _C.varlen_attention_forward(workspace=workspace, workspace_alloc=alloc, **self.c_args(out, lse))
        return out, lse

    def workspace_bytes(self):
        return _C.varlen_workspace_bytes(**self.c_args(self.make_out()))

    def kv(self):
        return [(R.gather_pages(self.kp, pages, n), R.gather_pages(self.vp, pages, n))
                for pages, n in zip(self.lists, self.lens)]

    def check(self, res, factor=FACTOR):
        out, lse = res[0], res[1]
        kv = self.kv()
        ref_o, ref_lse, _ = R.varlen_ref(self.q, self.cu_q, kv, sinks=self.sinks, **self.kw)
        naive_o, _, _ = R.varlen_ref(self.q, self.cu_q, kv, naive=True, sinks=self.sinks, **self.kw)
        R.assert_out_close("out", out, ref_o, naive_o, factor=factor)
        R.assert_empty_rows_zero("out", out, ref_lse)
        R.assert_lse_close("softmax_lse", lse, ref_lse)
        if self.sinks is not None:
            R.assert_sink_rows("out", out, lse, ref_o, self.sinks)

    def run(self, workspace="alloc"):
        res = P.run_twice(lambda o: self.call(o, workspace), self.make_out)
        self.check(res)
        return res


def shuffled(rng, lens):
    lens = list(lens)
    rng.shuffle(lens)
    return lens


# ---- page sizes, addressing and length sources ---------------------------------------------------


# (addressing, key lengths from): the block table through flash_attn_varlen_func, CSR through
# fastattn._C (last_page_len with a block table: test_block_table_last_page_len).
SOURCES = [("block_table", "seqused_k"), ("block_table", "cu_seqlens_k"), ("csr", "seqused_k"),
           ("csr", "cu_seqlens_k"), ("csr", "last_page_len")]


@pytest.mark.parametrize("addressing,lengths_from", SOURCES, ids=["-".join(s) for s in SOURCES])
@pytest.mark.parametrize("page_size", PAGE_SIZES, ids=lambda p: f"page{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pages(seed, dtype, page_size, addressing, lengths_from):
    """Ragged key lengths (0 among them), GQA 4, d128; every page size, both page addressings,
    lengths from seqused_k, cu_seqlens_k or (CSR) last_page_len. The call is routed (split-KV:
    6 sequences x 2 kv heads do not fill the GPU)."""
    case = Case(seed, dtype, shuffled(seed, LENS), page_size, 8, 2, 128, addressing, lengths_from)
    assert case.workspace_bytes() > 0, "a decode-shaped call was not routed to the split-KV kernels"
    case.run()


def test_block_table_last_page_len(seed):
    """last_page_len with a block table: every column is a page, len = (columns - 1) * page_size +
    last_page_len[b] (FlashInfer's convention, as the prefill kernel and the CPU backend read it)."""
    ps, cols, hq, hkv, d = 16, 5, 8, 2, 128
    last = [1, 16, 7, 3]
    lens = [(cols - 1) * ps + x for x in last]
    case = Case(seed, torch.bfloat16, [cols * ps] * len(last), ps, hq, hkv, d, "block_table", "seqused_k")
    case.bt = case.bt[:, :cols].contiguous()
    case.lists = [row[:cols] for row in case.lists]
    case.lens, case.max_seqlen_k = lens, max(lens)
    case.lengths = dict(last_page_len=i32(last))
    case.lengths_from = "last_page_len"
    case.run()


# ---- heads, head dims ----------------------------------------------------------------------------


@pytest.mark.parametrize("d", [64, 128, 256], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_heads_and_dims(seed, dtype, group, d):
    hkv = 2
    case = Case(seed, dtype, shuffled(seed, LENS), 16, hkv * group, hkv, d, "block_table", "seqused_k")
    case.run()
    case = Case(seed, dtype, shuffled(seed, LENS), 64, hkv * group, hkv, d, "csr", "last_page_len")
    case.run()


# ---- options ---------------------------------------------------------------------------------------


OPTIONS = ["causal", "window", "wleft", "alibi", "softcap", "scale", "causal+wleft+alibi+softcap+scale",
           "alibi_bh"]


@pytest.mark.parametrize("addressing", ["block_table", "csr"])
@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_options(seed, dtype, opt, addressing):
    """Options apply bottom-right (the one query sits at the last key): causal changes nothing, a
    left window keeps the last left + 1 keys. ALiBi slopes (B, Hq) stay on the prefill kernel
    (the decode kernel indexes slopes by query row), with the same results."""
    lengths_from = "seqused_k" if addressing == "block_table" else "last_page_len"
    case = Case(seed, dtype, shuffled(seed, LENS), 16, 16, 2, 128, addressing, lengths_from, opt=opt)
    routed = case.workspace_bytes() > 0
    assert routed == (opt != "alibi_bh"), (opt, routed)
    case.run()


# ---- long and empty sequences, strides -------------------------------------------------------------


def test_long_sequence(seed):
    """One 131072-key sequence beside short ones (0 and 1 among them), page 256, GQA 8."""
    lens = shuffled(seed, [131072, 0, 1, 1000])
    case = Case(seed, torch.bfloat16, lens, 256, 16, 2, 128, "block_table", "seqused_k", opt="softcap")
    assert case.workspace_bytes() > 0
    case.run()
    case = Case(seed, torch.float16, lens, 16, 8, 1, 64, "csr", "last_page_len", opt="wleft")
    case.run()


@pytest.mark.parametrize("addressing", ["block_table", "csr"])
def test_all_sequences_empty(seed, addressing):
    """No sequence has a key: every row is 0 with LSE -inf (also through the split combine)."""
    lengths_from = "seqused_k" if addressing == "block_table" else "cu_seqlens_k"
    # Pages for 2000 keys each and max_seqlen_k = 2000, so the heuristic splits; lengths 0.
    case = Case(seed, torch.float16, [2000] * 3, 16, 8, 2, 128, addressing, lengths_from)
    case.lens = [0, 0, 0]
    case.lengths = {lengths_from: i32([0, 0, 0]) if lengths_from == "seqused_k" else i32([0, 0, 0, 0])}
    assert case.workspace_bytes() > 0
    out, lse = case.run()
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


@pytest.mark.parametrize("lq", [[0, 1, 1, 0, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]],
                         ids=["interior", "trailing", "last-only"])
@pytest.mark.parametrize("addressing", ["block_table", "csr"])
def test_sequences_without_query(seed, addressing, lq):
    """max_seqlen_q == 1 and total_q == B, but some sequences have no query: the rows past
    cu_seqlens_q[B] are padding (output 0, LSE -inf) and row r belongs to the sequence s with
    cu_seqlens_q[s] == r, not to sequence r. The call is routed (decided on shapes); the owner of
    each row is found on the device."""
    b = len(lq)
    lens = shuffled(seed, [5, 300, 17, 2000, 64])
    lengths_from = "seqused_k" if addressing == "block_table" else "last_page_len"
    case = Case(seed, torch.bfloat16, lens, 16, 8, 2, 128, addressing, lengths_from, lq=lq,
                extra_q_rows=b - sum(lq), opt="causal+alibi")
    assert case.q.shape[0] == b
    assert case.workspace_bytes() > 0
    out, lse = case.run()
    pad = case.cu_q[-1]
    assert bool((out[pad:] == 0).all()) and bool(torch.isneginf(lse[:, pad:]).all())


@pytest.mark.parametrize("workspace", ["alloc", None], ids=["splits", "one-split"])
@pytest.mark.parametrize("lq", [None, [0, 1, 1, 0, 1, 1]], ids=["one-each", "padding-rows"])
@pytest.mark.parametrize("heads", [(8, 2, 128), (64, 8, 64), (8, 8, 256)], ids=["h8-2-d128", "h64-8-d64", "h8-8-d256"])
@pytest.mark.parametrize("addressing", ["block_table", "csr"])
def test_sinks(seed, addressing, heads, lq, workspace):
    """sinks= on the decode route: the decode kernels fold them into each finished row, the
    combine kernel into the merged splits (with a workspace) and rows that see no key (an empty
    sequence, padding rows past cu_seqlens_q[B]) get out 0 and LSE sinks[h], as on the prefill
    kernel."""
    hq, hkv, d = heads
    lens = shuffled(seed, [0, 5, 300, 2000, 17, 6000])
    lengths_from = "seqused_k" if addressing == "block_table" else "last_page_len"
    extra = 0 if lq is None else len(lens) - sum(lq)
    case = Case(seed, torch.bfloat16, lens, 16, hq, hkv, d, addressing, lengths_from, lq=lq,
                extra_q_rows=extra, opt="causal+softcap", sinks=True)
    assert case.workspace_bytes() > 0  # routed to the decode kernels
    out, lse = case.run(workspace)
    pad = case.cu_q[-1]
    assert torch.equal(lse[:, pad:], case.sinks[:, None].expand(hq, len(lens) - pad))


@pytest.mark.parametrize("addressing", ["block_table", "csr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided(seed, dtype, addressing):
    """k / v pages as strided views of one (num_pages, 2, page_size, Hkv, D) tensor, q every other
    head of a wider tensor, out with head stride D + 8."""
    lengths_from = "cu_seqlens_k" if addressing == "block_table" else "last_page_len"
    case = Case(seed, dtype, shuffled(seed, LENS), 16, 8, 2, 64, addressing, lengths_from,
                opt="causal+alibi", strided=True)
    assert case.workspace_bytes() > 0
    case.run()


# ---- the workspace -----------------------------------------------------------------------------------


def test_workspace(seed):
    """Without a workspace (as a C++ caller that passes none) the call runs with one split; with a
    NaN-poisoned one of exactly varlen_workspace_bytes() the split result; both are right. Too
    small a workspace is a ValueError."""
    case = Case(seed, torch.bfloat16, shuffled(seed, LENS), 16, 16, 2, 128, "csr", "seqused_k",
                opt="softcap")
    nbytes = case.workspace_bytes()
    assert nbytes > 0
    one_split = case.run(workspace=None)
    ws = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEV)  # float32 NaN bytes
    split = case.run(workspace=ws)
    assert torch.isfinite(split[0]).all()
    # Different reductions, both within the rule (checked above); the same values to rounding.
    assert float((one_split[0].float() - split[0].float()).abs().max()) < 0.05
    with pytest.raises(ValueError, match="workspace"):
        case.call(case.make_out(), workspace=ws[:nbytes - 1])


# ---- routing: the prefill path where it must stay, and the comparison with it ----------------------


@pytest.mark.parametrize("addressing", ["block_table", "csr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_prefill_path(monkeypatch, seed, dtype, addressing):
    """The same decode call on the split-KV decode kernels and, with FASTATTN_VARLEN_DECODE=0, on
    the prefill kernel: both within the rule, and within the rule's tolerance of each other."""
    lengths_from = "seqused_k" if addressing == "block_table" else "last_page_len"
    case = Case(seed, dtype, shuffled(seed, LENS), 16, 16, 2, 128, addressing, lengths_from,
                opt="causal+wleft+alibi+softcap")
    assert case.workspace_bytes() > 0
    decode = case.run()
    monkeypatch.setenv("FASTATTN_VARLEN_DECODE", "0")
    assert case.workspace_bytes() == 0  # not routed: the prefill kernel needs no workspace
    prefill = case.run()
    monkeypatch.delenv("FASTATTN_VARLEN_DECODE")
    kv = case.kv()
    ref_o, _, _ = R.varlen_ref(case.q, case.cu_q, kv, **case.kw)
    naive_o, _, _ = R.varlen_ref(case.q, case.cu_q, kv, naive=True, **case.kw)
    tol = FACTOR * float((naive_o.to(R.REF_DTYPE) - ref_o).abs().max()) + 1e-5
    diff = float((decode[0].float() - prefill[0].float()).abs().max())
    assert diff <= 2 * tol, f"decode and prefill paths differ by {diff:.4g} (> {2 * tol:.4g})"
    fin = torch.isfinite(decode[1])
    assert torch.equal(fin, torch.isfinite(prefill[1]))
    a, b = decode[1][fin].double(), prefill[1][fin].double()
    assert bool(((a - b).abs() <= 2 * (1e-3 + 1e-3 * b.abs())).all()), "LSE of the two paths differ"


@pytest.mark.parametrize("shape", ["sq3", "extra_rows", "probs", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_not_routed_still_correct(seed, dtype, shape):
    """Calls that are not decode-shaped keep the prefill kernel and stay correct: a sequence with 3
    query rows (max_seqlen_q = 3), one query per sequence with padding rows after them (total_q > B),
    attn_probs asked for, and packed keys."""
    lens = shuffled(seed, LENS)
    b = len(lens)
    if shape == "packed":
        cu_k = cumsum0(lens)
        q = randn(b, 8, 128, dtype=dtype)
        k, v = randn(cu_k[-1], 2, 128, dtype=dtype), randn(cu_k[-1], 2, 128, dtype=dtype)
        cq, ck = i32(range(b + 1)), i32(cu_k)
        args = dict(q=q, cu_seqlens_q=cq, max_seqlen_q=1, k=k, v=v, cu_seqlens_k=ck,
                    max_seqlen_k=max(lens), out=nan_full(q.shape, dtype))
        assert _C.varlen_workspace_bytes(**args) == 0
        res = P.run_twice(lambda o: flash_attn_varlen_func(q, k, v, cq, ck, 1, max(lens),
                                                           return_softmax_lse=True, out=o, causal=True),
                          lambda: nan_full(q.shape, dtype))
        P.check_varlen(res, q, list(range(b + 1)), P.packed_kv(k, v, cu_k, lens), {"causal": True})
        return
    lq = {"sq3": [1, 3, 1, 1, 0, 2], "extra_rows": None, "probs": None}[shape]
    extra = 3 if shape == "extra_rows" else 0
    case = Case(seed, dtype, lens, 16, 8, 2, 128, "block_table", "seqused_k", lq=lq,
                extra_q_rows=extra, opt="causal+alibi")
    if shape == "probs":
        msq, msk = 1, case.max_seqlen_k
        probs_shape = (b, case.hq, msq, msk)
        assert case.workspace_bytes() > 0  # without probs the same call is routed
        args = case.c_args(case.make_out(), probs=nan_full(probs_shape, torch.float32))
        assert _C.varlen_workspace_bytes(**args) == 0

        def call(o):
            lse = nan_full((case.hq, b), torch.float32)
            probs = nan_full(probs_shape, torch.float32)
            _C.varlen_attention_forward(workspace_alloc=lambda n: torch.empty(n, dtype=torch.uint8, device=DEV),
                                        **case.c_args(o, lse, probs))
            return o, lse, probs

        res = P.run_twice(call, case.make_out)
        P.check_varlen(res, case.q, case.cu_q, case.kv(), case.kw, max_seqlen_q=msq, max_seqlen_k=msk,
                       probs_atol=P.PROBS_ATOL)
        return
    assert case.workspace_bytes() == 0
    res = case.run()
    if extra:
        pad = case.cu_q[-1]
        assert bool((res[0][pad:] == 0).all()) and bool(torch.isneginf(res[1][:, pad:]).all())


# ---- CUDA graphs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("addressing", ["block_table", "csr"])
def test_cuda_graph(seed, addressing):
    """One decode step captured into a CUDA graph; replays after new key lengths (0 and the
    capacity among them), new queries and new page lists are written into the static index
    tensors follow them. Block table: the public flash_attn_varlen_func (its workspace comes from
    torch's allocator inside the capture), lengths from seqused_k. CSR: fastattn._C with a workspace
    allocated before the capture, lengths from page_indptr / last_page_len (the page counts change
    between replays). The split count is fixed at capture (shapes only): split-KV is on."""
    dtype, b, hq, hkv, d, ps, cap = torch.bfloat16, 4, 16, 2, 128, 16, 1024
    per_seq = cap // ps
    num_pages = b * per_seq + 5
    q = randn(b, hq, d, dtype=dtype)
    kp = randn(num_pages, ps, hkv, d, dtype=dtype)
    vp = randn(num_pages, ps, hkv, d, dtype=dtype)
    cq = i32(range(b + 1))
    out = nan_full(q.shape, dtype)
    lse = nan_full((hq, b), torch.float32)
    kw = {"causal": True}
    if addressing == "block_table":
        bt = torch.zeros(b, per_seq, dtype=torch.int32, device=DEV)
        seqused = i32([cap] * b)
        holder = {}

        def call():
            holder["lse"] = flash_attn_varlen_func(q, kp, vp, cq, None, 1, cap, block_table=bt,
                                                   seqused_k=seqused, return_softmax_lse=True,
                                                   out=out, **kw)[1]
        ws_args = dict(q=q, cu_seqlens_q=cq, max_seqlen_q=1, k_pages=kp, v_pages=vp, block_table=bt,
                       seqused_k=seqused, max_seqlen_k=cap, out=out, causal=True)
    else:
        indptr = i32([per_seq * i for i in range(b + 1)])
        indices = torch.zeros(b * per_seq, dtype=torch.int32, device=DEV)
        last = i32([ps] * b)
        c_args = dict(q=q, cu_seqlens_q=cq, max_seqlen_q=1, k_pages=kp, v_pages=vp,
                      page_indptr=indptr, page_indices=indices, last_page_len=last,
                      max_seqlen_k=cap, out=out, lse=lse, causal=True, cuda_stream=stream_ptr())
        ws_args = dict(c_args)
        ws = torch.empty(_C.varlen_workspace_bytes(**ws_args), dtype=torch.uint8, device=DEV)
        holder = {"lse": lse}

        def call():
            _C.varlen_attention_forward(workspace=ws, **dict(c_args, cuda_stream=stream_ptr()))
    ws_args.pop("cuda_stream", None)
    assert _C.varlen_workspace_bytes(**ws_args) > 0, "the captured call should use split-KV"

    graph = capture_or_xfail(call)

    for _ in range(3):
        lens = [0, cap] + [seed.randint(1, cap - 1) for _ in range(b - 2)]
        seed.shuffle(lens)
        perm = torch.randperm(num_pages, device=DEV)[:b * per_seq].to(torch.int32)
        if addressing == "block_table":
            bt.copy_(perm.view(b, per_seq))
            seqused.copy_(i32(lens))
            lists = bt.tolist()
        else:
            counts = [(n + ps - 1) // ps for n in lens]
            starts = cumsum0(counts)
            indptr.copy_(i32(starts))
            indices.copy_(perm)
            last.copy_(i32([n - (m - 1) * ps if m > 0 else seed.randint(0, ps) for n, m in zip(lens, counts)]))
            flat = perm.tolist()
            lists = [flat[starts[i]:starts[i + 1]] for i in range(b)]
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        holder["lse"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        kv = [(R.gather_pages(kp, p, n), R.gather_pages(vp, p, n)) for p, n in zip(lists, lens)]
        ref_o, ref_lse, _ = R.varlen_ref(q, list(range(b + 1)), kv, **kw)
        naive_o, _, _ = R.varlen_ref(q, list(range(b + 1)), kv, naive=True, **kw)
        R.assert_out_close("out", out, ref_o, naive_o, factor=FACTOR)
        R.assert_empty_rows_zero("out", out, ref_lse)
        R.assert_lse_close("softmax_lse", holder["lse"], ref_lse)


# ---- random scenarios ------------------------------------------------------------------------------


def draw_scenario(rng, sms):
    """Knobs of one decode-shaped varlen call, drawn from the whole option space: about a third on
    grids that the sm_90 forms serve (test_kvcache_gpu.draw_form_grid: one sequence at the grid's
    length, which max_seqlen_k carries to the heuristic, the rest mostly short so the float64
    reference stays cheap), the rest small shapes of any head_dim (a multiple of 8 up to 256), GQA
    ratio, page size, addressing, length source and option mix; some with sequences that have no
    query (padding rows after them), strided views, or no / a garbage-filled workspace."""
    cfg = {}
    form_grid = rng.random() < 0.3
    if form_grid:
        g = KV.draw_form_grid(rng, sms)
        cap = g["cache_len"]
        cfg.update(hq=g["Hq"], hkv=g["Hkv"], d=g["D"], page=rng.choice([16, 16, 64, 1]),
                   lens=KV.draw_form_lens(rng, cap, g["B"]))
        rng.shuffle(cfg["lens"])
        cfg["lq"] = None
    else:
        hkv = rng.choice([1, 2, 4, 8])
        b = rng.randint(1, 9)
        cfg.update(hkv=hkv, hq=hkv * rng.choice([r for r in (1, 2, 4, 8, 16) if hkv * r <= 64]),
                   d=rng.choice([8, 40, 64, 96, 128, 136, 192, 256]),
                   page=rng.choice([1, 8, 16, 16, 64, 256]),
                   lens=[rng.choice([0, 1, rng.randint(1, 64), rng.randint(1, 2000), rng.randint(1, 20000)])
                         for _ in range(b)])
        # Sequences without a query: rows past cu_seqlens_q[B] are padding (test_sequences_without_query).
        if rng.random() < 0.15:
            lq = [int(rng.random() < 0.7) for _ in range(b)]
            lq[rng.randrange(b)] = 1  # at least one query: max_seqlen_q == 1
            cfg["lq"] = lq
        else:
            cfg["lq"] = None
    cfg["addressing"], cfg["lengths_from"] = rng.choice(SOURCES)
    cfg["strided"] = rng.random() < 0.15
    # (B, Hq) slopes stay on the prefill kernel: a third of the ALiBi draws.
    cfg["opt"] = KV.draw_options(rng, alibi=("alibi", "alibi", "alibi_bh"))
    cfg["workspace"] = rng.choice(["alloc"] * 8 + [None, "garbage"])
    cfg["sinks"] = rng.random() < 0.25
    return rng.choice(DTYPES), cfg


def poison_free_slots(case):
    """NaN into every pool slot that holds no key of a sequence (past a sequence's length in its
    last page, pages no list needs): an engine's pool holds stale bytes there, and whole-tile
    loads bring them into shared memory, where the kernels must mask them out."""
    keyed = torch.zeros(case.kp.shape[:2], dtype=torch.bool)
    for pages, n in zip(case.lists, case.lens):
        used = -(-n // case.ps)
        if used:
            idx = torch.tensor(pages[:used])
            keyed[idx[:-1]] = True
            keyed[idx[-1], :n - (used - 1) * case.ps] = True
    free = (~keyed).to(DEV)
    case.kp[free] = float("nan")
    case.vp[free] = float("nan")


def run_scenario(rng, dtype, cfg):
    """One drawn call through Case.run (3x rule, LSE, two NaN-poisoned out= buffers bitwise equal)
    with NaN in every pool slot that holds no key; the page pools' bytes unchanged; a call with
    (B, Hq) ALiBi slopes not routed (no workspace)."""
    lq = cfg["lq"]
    extra = 0 if lq is None else len(lq) - sum(lq)
    case = Case(rng, dtype, cfg["lens"], cfg["page"], cfg["hq"], cfg["hkv"], cfg["d"], cfg["addressing"],
                cfg["lengths_from"], lq=lq, extra_q_rows=extra, opt=cfg["opt"], strided=cfg["strided"],
                sinks=cfg["sinks"])
    nbytes = case.workspace_bytes()
    if "alibi_bh" in cfg["opt"]:
        assert nbytes == 0, "a call with (B, Hq) ALiBi slopes was routed to the decode kernels"
    workspace = cfg["workspace"]
    if workspace == "garbage":  # exactly the bytes asked for, full of float NaN bytes
        workspace = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEV) if nbytes else None
    poison_free_slots(case)
    k_before, v_before = case.kp.clone(), case.vp.clone()
    out, lse = case.run(workspace=workspace)
    same = [torch.equal(a.view(torch.int16), b.view(torch.int16))  # bytes: NaN != NaN as values
            for a, b in ((case.kp, k_before), (case.vp, v_before))]
    assert all(same), "the call wrote the page pool"
    if extra:  # padding rows see no key: LSE -inf, or sinks[h] with sinks
        pad = case.cu_q[-1]
        empty_lse = torch.full_like(lse[:, pad:], float("-inf")) if case.sinks is None else \
            case.sinks[:, None].expand_as(lse[:, pad:])
        assert bool((out[pad:] == 0).all()) and torch.equal(lse[:, pad:], empty_lse)


def test_varlen_decode_random_scenarios(seed):
    """RANDOM_SCENARIOS decode-shaped varlen calls drawn fresh (draw_scenario), each through
    run_scenario. A failure names the scenario's knobs; FASTATTN_TEST_SEED replays the whole draw."""
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    run_random_scenarios(seed, RANDOM_SCENARIOS, lambda rng: draw_scenario(rng, sms),
                         lambda dtype, cfg: run_scenario(seed, dtype, cfg))
