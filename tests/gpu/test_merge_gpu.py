"""GPU merge ops: fastattn.merge_state, merge_state_in_place (with bool / uint8 masks) and
merge_states on torch CUDA tensors (float16, bfloat16, float32 values; float32 natural-log LSE),
against a float64 reference written here from the definition (include/fastattn/ops.h):

    s = log(sum_k exp(s_k)),   v = sum_k exp(s_k - s) * v_k,

an empty state (s_k = -inf) having weight 0, and a row whose states are all empty giving v = 0,
s = -inf. The reference shares nothing with the library.

Tolerances are derived from the arithmetic, per dtype (value_tol / lse_tol below): the merged value
is a convex combination of the inputs, so |v| <= max|v_k| and rounding it to the dtype costs at most
half a unit in the last place at max|v_k|; the float32 weights cost a few float32 ulps per state
(exp of the exactly rounded LSE differences, one division, the running sum); when the inputs are
themselves rounded (partial attention outputs, a merged intermediate) their rounding is carried
through with weights that sum to 1. Nothing is loosened beyond that.

Checked: ragged S (0, 1, 17, 113, 799), heads 1..32, head_dim 64 / 128 / 256 / 40 (vectorised) and
1 / 7 / 36 / 100 / 520 and misaligned rows (the scalar fallback), strided and transposed inputs
and outputs (the LSE as the (H, S) transposes the attention ops return), -inf states on one side /
both sides / everywhere (exact, never NaN, whatever the values behind an empty state hold), masks
leaving masked rows byte-identical, outputs aliasing inputs, outputs poisoned with NaN before every
call (through fastattn._C) and two runs bitwise equal, associativity, merge_states of N = 1, 2, 7,
33 partitions of a key sequence against attention over the whole sequence (partition states from a
float64 softmax here and from fastattn.flash_attn_func on the GPU), > 2^31-element offsets, the
current stream and CUDA graph capture, zero-size shapes, and error messages naming the argument.
Inputs are fresh each run (seed printed on failure, FASTATTN_TEST_SEED=<seed> replays).
"""

import math

import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402
from fastattn import _C  # noqa: E402

import gpu_reference as R  # noqa: E402
from gpu_helpers import capture_or_xfail, stream_ptr  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]
SEQ_LENS = [0, 1, 17, 113, 799]
# (heads, head_dim): vectorised head dims (a multiple of 16 bytes), one of them not a power of two
HEADS_DIMS = [(1, 64), (32, 128), (5, 256), (8, 40)]
NEG_INF = float("-inf")
F32_EPS = 2.0 ** -23  # float32 spacing at 1.0
F32_U = 2.0 ** -24    # float32 unit roundoff


# ---- tolerances ----------------------------------------------------------------------------------


def ulp(dtype, x):
    """Spacing of `dtype` at magnitude x (x >= 0): eps * 2^floor(log2 x)."""
    fi = torch.finfo(dtype)
    x = max(float(x), fi.tiny)
    return fi.eps * 2.0 ** math.floor(math.log2(x))


def value_tol(dtype, vmax, n_states, rounded_inputs=False, lse_max=0.0):
    """Bound on max|v - v_ref| for a merge of n_states states whose values are at most vmax:
    - rounding the merged value (|v| <= vmax: a convex combination) to the dtype: <= 0.5 ulp at
      vmax; the ulp is taken at vmax * (1 + 2^-20) in case float32 error carries |v| into the next
      binade;
    - rounded_inputs (the v_k are roundings of exact values): + 0.5 ulp (the weights sum to 1),
      and the LSEs' float32 rounding (absolute 2^-24 |s_k|, at most 2^-24 lse_max) moves each
      weight by a relative 2 * 2^-24 lse_max and the value by twice that times vmax;
    - float32 weights: exp of exactly rounded LSE differences (relative error 2^-24 |x| e^-|x| <=
      0.37 * 2^-24 absolute on the weighted value) and expf / division / the running sum and the
      rescaled accumulator, a few float32 ulps per state: (8 n + 16) 2^-24 vmax covers it."""
    t = (1.0 if rounded_inputs else 0.5) * ulp(dtype, vmax * (1 + 2.0 ** -20))
    t += (8 * n_states + 16) * F32_U * vmax
    if rounded_inputs:
        t += 4 * F32_U * lse_max * vmax
    return t


def lse_tol(ref, n_states, lse_max=0.0):
    """Per-element bound on |s - s_ref| (finite ref): s = m + log(sum), the sum's float32 error
    ((n + 2) 2^-24 relative) plus logf and the final addition (2^-24 |s| each), doubled for margin;
    plus the inputs' own float32 rounding (2^-24 lse_max) when they are roundings."""
    return F32_EPS * (ref.abs() + n_states + 4) + F32_U * lse_max


# ---- helpers -------------------------------------------------------------------------------------


def nan_like(x):
    return torch.full_like(x, float("nan"))


def strided(shape, dtype, order=None, pad=0, offset=0):
    """A NaN-filled view of `shape` whose storage is laid out in `order` (a permutation of the dims,
    outermost first), padded by `pad` elements in the second-innermost stored dim (values: a
    row / head stride larger than needed; the innermost dim stays contiguous) or, for 2-d LSE
    storage, the innermost stored dim, and starting `offset` elements into its allocation
    (offset % 8 != 0 misaligns 16-bit rows: the scalar fallback)."""
    nd = len(shape)
    order = list(range(nd)) if order is None else list(order)
    stored = [shape[i] for i in order]
    if pad:
        stored[-2 if nd >= 3 else -1] += pad
    numel = offset + max(1, math.prod(stored))
    base = torch.full((numel,), float("nan"), device=DEV, dtype=dtype)
    strides_stored = [0] * nd
    acc = 1
    for i in range(nd - 1, -1, -1):
        strides_stored[i] = acc
        acc *= stored[i]
    strides = [0] * nd
    for pos, dim in enumerate(order):
        strides[dim] = strides_stored[pos]
    return torch.as_strided(base, tuple(shape), tuple(strides), offset)


def fill_(dst, src):
    dst.copy_(src)
    return dst


def rand_states(shape_v, dtype, empty="some", behind_empty="zero", lse_spread=3.0):
    """(v, s): v of shape_v = (..., D) in dtype, s (...) float32 LSEs around 5 with spread
    lse_spread. empty: "none", "some" (about 1 in 5 entries -inf), "all". The values behind an
    empty state are 0 (an empty attention's output) or NaN (garbage; must never be read)."""
    v = torch.randn(*shape_v, device=DEV, dtype=torch.float32).to(dtype)
    s = torch.randn(*shape_v[:-1], device=DEV, dtype=torch.float32) * lse_spread + 5.0
    if empty == "some":
        s[torch.rand(s.shape, device=DEV) < 0.2] = NEG_INF
    elif empty == "all":
        s.fill_(NEG_INF)
    if empty != "none":
        hole = torch.isinf(s)[..., None].expand(v.shape)
        v[hole] = 0.0 if behind_empty == "zero" else float("nan")
    return v, s


def merge_ref(vs, ss):
    """float64 merge of states stacked on dim 1: vs (S, N, H, D), ss (S, N, H) ->
    (v (S, H, D) float64, s (S, H) float64). Empty states (s = -inf) have weight 0 and their values
    are not used; all-empty rows give v = 0, s = -inf."""
    v = vs.double()
    s = ss.double()
    lse = torch.logsumexp(s, dim=1)  # -inf when every state is empty
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.where(torch.isinf(s), torch.zeros_like(s), torch.exp(s - safe[:, None]))
    contrib = torch.where(w[..., None] > 0, w[..., None] * torch.nan_to_num(v), torch.zeros_like(v))
    return contrib.sum(dim=1), lse


def merge2_ref(va, sa, vb, sb):
    return merge_ref(torch.stack([va, vb], 1), torch.stack([sa, sb], 1))


def finite_max(*vs):
    m = 0.0
    for v in vs:
        f = v.double()
        f = f[torch.isfinite(f)]
        if f.numel():
            m = max(m, float(f.abs().max()))
    return m


def check_merged(name, v, s, v_ref, s_ref, dtype, vmax, n_states, rounded_inputs=False,
                 lse_max=0.0, extra_v=0.0, extra_s=0.0):
    """v / s against the float64 reference: no NaN anywhere; s = -inf exactly where s_ref is, and
    v exactly 0 there; elsewhere within value_tol / lse_tol (+ extra, for inputs with their own
    measured error)."""
    assert v.dtype == dtype and s.dtype == torch.float32, name
    assert tuple(v.shape) == tuple(v_ref.shape) and tuple(s.shape) == tuple(s_ref.shape), name
    R.assert_no_nan(name + " v", v)
    R.assert_no_nan(name + " s", s)
    if v.numel() == 0 and s.numel() == 0:
        return
    empty = torch.isinf(s_ref)
    assert torch.equal(torch.isinf(s) & (s < 0), empty), (
        "%s: s is -inf at %d entries, the reference at %d" % (name, int((torch.isinf(s) & (s < 0)).sum()),
                                                              int(empty.sum())))
    if v.numel():
        assert bool((v[empty] == 0).all()), "%s: rows whose states are all empty must be 0" % name
    ok = ~empty
    if bool(ok.any()):
        tol_s = lse_tol(s_ref[ok], n_states, lse_max) + extra_s
        err_s = (s[ok].double() - s_ref[ok]).abs()
        bad = err_s > tol_s
        assert not bool(bad.any()), "%s: s off by up to %.3g (tolerance %.3g there)" % (
            name, float(err_s.max()), float(tol_s[bad][0]))
    if v.numel():
        tol = value_tol(dtype, vmax, n_states, rounded_inputs, lse_max) + extra_v
        err = float((v.double() - v_ref).abs().max())
        assert err <= tol, "%s: max|v - ref| = %.4g > tolerance %.4g (%s, max|v_k| = %.4g, N = %d)" % (
            name, err, tol, dtype, vmax, n_states)


def c_merge_state(va, sa, vb, sb, v_out=None, s_out=None):
    """fastattn._C.merge_state into NaN-poisoned outputs (or the given ones); returns them."""
    if v_out is None:
        v_out = torch.full(tuple(va.shape), float("nan"), device=DEV, dtype=va.dtype)
    if s_out is None:
        s_out = torch.full(tuple(sa.shape), float("nan"), device=DEV, dtype=torch.float32)
    _C.merge_state(va, sa, vb, sb, v_out, s_out, cuda_stream=stream_ptr())
    return v_out, s_out


def c_merge_states(v, s, v_out=None, s_out=None):
    S, _, H, D = v.shape
    if v_out is None:
        v_out = torch.full((S, H, D), float("nan"), device=DEV, dtype=v.dtype)
    if s_out is None:
        s_out = torch.full((S, H), float("nan"), device=DEV, dtype=torch.float32)
    _C.merge_states(v, s, v_out, s_out, cuda_stream=stream_ptr())
    return v_out, s_out


def bits(x):
    return x.contiguous().view(torch.uint8) if x.numel() else x


# ---- merge_state -----------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,head_dim", HEADS_DIMS, ids=["h%dd%d" % hd for hd in HEADS_DIMS])
@pytest.mark.parametrize("seqlen", SEQ_LENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_state(seed, dtype, seqlen, heads, head_dim):
    """Random states with some -inf entries on either side (zeros behind them); outputs poisoned;
    two runs bitwise equal; the public wrapper gives the same bits."""
    va, sa = rand_states((seqlen, heads, head_dim), dtype)
    vb, sb = rand_states((seqlen, heads, head_dim), dtype)
    sb[: seqlen // 3] = NEG_INF  # a block of rows where b is empty, some where both are
    vb[: seqlen // 3] = 0
    v1, s1 = c_merge_state(va, sa, vb, sb)
    v2, s2 = c_merge_state(va, sa, vb, sb)
    torch.cuda.synchronize()
    R.assert_bitwise_equal("v", v1, v2)
    R.assert_bitwise_equal("s", s1, s2)
    v_ref, s_ref = merge2_ref(va, sa, vb, sb)
    check_merged("merge_state", v1, s1, v_ref, s_ref, dtype, finite_max(va, vb), 2)
    v3, s3 = fastattn.merge_state(va, sa, vb, sb)
    assert v3.device == va.device and v3.dtype == dtype and s3.dtype == torch.float32
    R.assert_bitwise_equal("wrapper v", v1, v3)
    R.assert_bitwise_equal("wrapper s", s1, s3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("behind_empty", ["zero", "nan"])
def test_merge_state_empty_sides_exact(seed, dtype, behind_empty):
    """One side empty: the other side comes back exactly (weight exp(0) / 1 = 1). Both empty: v = 0,
    s = -inf, the CPU backend's result. Never NaN, even with NaN stored behind an empty state."""
    S, H, D = 113, 7, 128
    va, sa = rand_states((S, H, D), dtype, empty="none")
    vb, sb = rand_states((S, H, D), dtype, empty="none")
    rows_b_empty, rows_a_empty, rows_both = slice(0, 30), slice(30, 60), slice(60, 80)
    fill = 0.0 if behind_empty == "zero" else float("nan")
    for rows, sides in ((rows_b_empty, "b"), (rows_a_empty, "a"), (rows_both, "ab")):
        if "a" in sides:
            sa[rows] = NEG_INF
            va[rows] = fill
        if "b" in sides:
            sb[rows] = NEG_INF
            vb[rows] = fill
    v, s = c_merge_state(va, sa, vb, sb)
    torch.cuda.synchronize()
    R.assert_no_nan("v", v)
    R.assert_no_nan("s", s)
    assert torch.equal(v[rows_b_empty], va[rows_b_empty]) and torch.equal(s[rows_b_empty], sa[rows_b_empty])
    assert torch.equal(v[rows_a_empty], vb[rows_a_empty]) and torch.equal(s[rows_a_empty], sb[rows_a_empty])
    assert bool((v[rows_both] == 0).all()) and bool((s[rows_both] == NEG_INF).all())
    v_ref, s_ref = merge2_ref(va, sa, vb, sb)
    check_merged("merge_state", v, s, v_ref, s_ref, dtype, finite_max(va, vb), 2)
    if behind_empty == "zero":  # the CPU backend multiplies by the zero weight: zeros behind -inf
        vc, sc = fastattn.merge_state(va.cpu(), sa.cpu(), vb.cpu(), sb.cpu())
        assert torch.equal(v[rows_both].cpu(), vc[rows_both]) and torch.equal(s[rows_both].cpu(), sc[rows_both])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_state_everything_empty(seed, dtype):
    va, sa = rand_states((17, 4, 64), dtype, empty="all")
    vb, sb = rand_states((17, 4, 64), dtype, empty="all")
    v, s = c_merge_state(va, sa, vb, sb)
    torch.cuda.synchronize()
    assert bool((v == 0).all()) and bool((s == NEG_INF).all())


# head_dim values off the 16-byte vector path (and 520 fp16: more than 32 chunks per row), and
# misaligned views of vectorisable rows: the scalar fallback.
ODD_DIMS = [1, 7, 36, 100, 520]


@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_attention_sinks(seed, dtype, layout):
    """merge_attention_sinks: the state (v = 0, s = sinks[h]) merged in place, against the float64
    merge of the same two states: the vector path (contiguous), transposed and padded views, and
    the scalar fallback (misaligned data, an odd head_dim); empty rows get (0, sinks[h])."""
    S, H = 799, 6
    D = 37 if layout == "misaligned" else 128
    v0, s0 = rand_states((S, H, D), dtype)
    sinks_wide = torch.randn(H, 3, device=DEV) * 3 + 5.0
    sinks = sinks_wide[:, 1]  # a strided (H,) view
    if layout == "contiguous":
        v, s = v0.clone(), s0.clone()
    else:
        offset = 1 if layout == "misaligned" else 0
        v = fill_(strided((S, H, D), dtype, order=(1, 0, 2), pad=2, offset=offset), v0)
        s = fill_(strided((S, H), torch.float32, order=(1, 0), pad=1), s0)
    _C.merge_attention_sinks(v, s, sinks, cuda_stream=stream_ptr())
    torch.cuda.synchronize()
    zeros = torch.zeros_like(v0)
    v_ref, s_ref = merge2_ref(v0, s0, zeros, sinks[None].expand(S, H))
    check_merged("merge_attention_sinks " + layout, v, s, v_ref, s_ref, dtype, finite_max(v0), 2)
    empty = torch.isinf(s0)
    assert bool((v[empty] == 0).all()) and torch.equal(s[empty], sinks[None].expand(S, H)[empty])


@pytest.mark.parametrize("head_dim", ODD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_state_odd_head_dims(seed, dtype, head_dim):
    S, H = 113, 3
    va, sa = rand_states((S, H, head_dim), dtype)
    vb, sb = rand_states((S, H, head_dim), dtype)
    v, s = c_merge_state(va, sa, vb, sb)
    torch.cuda.synchronize()
    v_ref, s_ref = merge2_ref(va, sa, vb, sb)
    check_merged("merge_state d%d" % head_dim, v, s, v_ref, s_ref, dtype, finite_max(va, vb), 2)


@pytest.mark.parametrize("offset", [0, 1, 3], ids=["aligned", "off1", "off3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_state_strided(seed, dtype, offset):
    """Strided and transposed inputs and outputs: v_a stored (H, S, D), v_b with padded rows, v_out
    stored (H, S, D) with padding; LSEs stored (H, S) (as the attention ops return them) and one
    with a row stride; offset misaligns the data (scalar fallback). Memory around the output views
    is left untouched (NaN)."""
    S, H, D = 799, 6, 128
    va0, sa0 = rand_states((S, H, D), dtype)
    vb0, sb0 = rand_states((S, H, D), dtype)
    va = fill_(strided((S, H, D), dtype, order=(1, 0, 2), offset=offset), va0)
    vb = fill_(strided((S, H, D), dtype, pad=3, offset=offset), vb0)
    sa = fill_(strided((S, H), torch.float32, order=(1, 0)), sa0)
    sb = fill_(strided((S, H), torch.float32, pad=5, offset=2), sb0)
    v_out = strided((S, H, D), dtype, order=(1, 0, 2), pad=2, offset=offset)
    s_out = strided((S, H), torch.float32, order=(1, 0), pad=1)
    c_merge_state(va, sa, vb, sb, v_out, s_out)
    torch.cuda.synchronize()
    v_ref, s_ref = merge2_ref(va0, sa0, vb0, sb0)
    check_merged("merge_state strided", v_out, s_out, v_ref, s_ref, dtype, finite_max(va0, vb0), 2)
    # Everything of the output allocations outside the views is still NaN.
    for out in (v_out, s_out):
        base = torch.as_strided(out, (out.untyped_storage().nbytes() // out.element_size(),), (1,), 0)
        inside = torch.zeros(base.shape, dtype=torch.bool, device=DEV)
        torch.as_strided(inside, out.shape, out.stride(), out.storage_offset()).fill_(True)
        assert bool(torch.isnan(base[~inside]).all()), "a merge wrote outside its output view"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("alias", ["a", "b"])
def test_merge_state_output_aliases_input(seed, dtype, alias):
    """v_out / s_out the very tensors of one input (element for element)."""
    S, H, D = 799, 8, 64
    va, sa = rand_states((S, H, D), dtype)
    vb, sb = rand_states((S, H, D), dtype)
    v_ref, s_ref = merge2_ref(va, sa, vb, sb)
    vmax = finite_max(va, vb)
    if alias == "a":
        c_merge_state(va, sa, vb, sb, va, sa)
        v, s = va, sa
    else:
        c_merge_state(va, sa, vb, sb, vb, sb)
        v, s = vb, sb
    torch.cuda.synchronize()
    check_merged("merge_state into " + alias, v, s, v_ref, s_ref, dtype, vmax, 2)


# ---- merge_state_in_place -----------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["none", "bool", "uint8", "strided-bool"])
@pytest.mark.parametrize("seqlen", SEQ_LENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_state_in_place(seed, dtype, seqlen, mask_kind):
    """Rows whose mask is false are byte-identical afterwards (v and s); the others hold the merge.
    v is a strided view (stored (H, S, D)); the memory around it is untouched."""
    H, D = 12, 128
    v0, s0 = rand_states((seqlen, H, D), dtype)
    vo, so = rand_states((seqlen, H, D), dtype)
    v = fill_(strided((seqlen, H, D), dtype, order=(1, 0, 2), pad=1), v0)
    s = fill_(strided((seqlen, H), torch.float32, order=(1, 0)), s0)
    keep = torch.rand(seqlen, device=DEV) < 0.6
    mask = None
    if mask_kind == "bool":
        mask = keep.clone()
    elif mask_kind == "uint8":
        mask = keep.to(torch.uint8) * torch.randint(1, 256, (seqlen,), device=DEV, dtype=torch.uint8)
    elif mask_kind == "strided-bool":
        mask = torch.zeros(2 * seqlen, device=DEV, dtype=torch.bool)[::2]
        mask.copy_(keep)
    if mask is None:
        keep = torch.ones(seqlen, device=DEV, dtype=torch.bool)
    before_v, before_s = v.clone(), s.clone()
    base = torch.as_strided(v, (v.untyped_storage().nbytes() // v.element_size(),), (1,), 0)
    base_before = base.clone()
    fastattn.merge_state_in_place(v, s, vo, so, mask=mask)
    torch.cuda.synchronize()
    # masked-out rows: byte-identical
    assert torch.equal(bits(v[~keep]), bits(before_v[~keep])), "a masked-out row of v was written"
    assert torch.equal(bits(s[~keep]), bits(before_s[~keep])), "a masked-out row of s was written"
    # outside the view: untouched
    inside = torch.zeros(base.shape, dtype=torch.bool, device=DEV)
    torch.as_strided(inside, v.shape, v.stride(), v.storage_offset()).fill_(True)
    assert torch.equal(bits(base[~inside]), bits(base_before[~inside]))
    v_ref, s_ref = merge2_ref(v0, s0, vo, so)
    check_merged("merge_state_in_place", v[keep], s[keep], v_ref[keep], s_ref[keep], dtype,
                 finite_max(v0, vo), 2)


# ---- merge_states --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_states", [1, 2, 7, 33])
@pytest.mark.parametrize("seqlen", SEQ_LENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_states(seed, dtype, seqlen, num_states):
    """Random states (some empty, NaN behind them) stored (N, S, H, D) / (N, H, S), so v and s reach
    the op as strided views; heads and head_dim drawn per run."""
    H, D = seed.choice(HEADS_DIMS)
    v0, s0 = rand_states((num_states, seqlen, H, D), dtype, behind_empty="nan")
    v = fill_(strided((seqlen, num_states, H, D), dtype, order=(1, 0, 2, 3)), v0.permute(1, 0, 2, 3))
    s = fill_(strided((seqlen, num_states, H), torch.float32, order=(1, 2, 0)), s0.permute(1, 0, 2))
    v1, s1 = c_merge_states(v, s)
    v2, s2 = c_merge_states(v, s)
    torch.cuda.synchronize()
    R.assert_bitwise_equal("v", v1, v2)
    R.assert_bitwise_equal("s", s1, s2)
    v_ref, s_ref = merge_ref(v, s)
    check_merged("merge_states N=%d h%d d%d" % (num_states, H, D), v1, s1, v_ref, s_ref, dtype,
                 finite_max(v), num_states)
    v3, s3 = fastattn.merge_states(v, s)
    R.assert_bitwise_equal("wrapper v", v1, v3)
    R.assert_bitwise_equal("wrapper s", s1, s3)


@pytest.mark.parametrize("head_dim", ODD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_states_odd_head_dims(seed, dtype, head_dim):
    v, s = rand_states((113, 5, 3, head_dim), dtype)
    v_out, s_out = c_merge_states(v, s)
    torch.cuda.synchronize()
    v_ref, s_ref = merge_ref(v, s)
    check_merged("merge_states d%d" % head_dim, v_out, s_out, v_ref, s_ref, dtype, finite_max(v), 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_states_output_aliases_state0(seed, dtype):
    """v_out = v[:, 0], s_out = s[:, 0] (element for element)."""
    v, s = rand_states((799, 4, 8, 128), dtype)
    v_ref, s_ref = merge_ref(v, s)
    vmax = finite_max(v)
    c_merge_states(v, s, v[:, 0], s[:, 0])
    torch.cuda.synchronize()
    check_merged("merge_states into state 0", v[:, 0], s[:, 0], v_ref, s_ref, dtype, vmax, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_states_empty(seed, dtype):
    """Every state empty: 0 and -inf (as the CPU backend); N = 0 likewise."""
    v, s = rand_states((17, 3, 4, 64), dtype, empty="all", behind_empty="nan")
    v_out, s_out = c_merge_states(v, s)
    v0, s0 = c_merge_states(torch.empty(17, 0, 4, 64, device=DEV, dtype=dtype),
                            torch.empty(17, 0, 4, device=DEV))
    torch.cuda.synchronize()
    for vv, ss in ((v_out, s_out), (v0, s0)):
        assert bool((vv == 0).all()) and bool((ss == NEG_INF).all())
    vc, sc = fastattn.merge_states(torch.zeros(17, 3, 4, 64, dtype=dtype), s.cpu())
    assert torch.equal(v_out.cpu(), vc) and torch.equal(s_out.cpu(), sc)


# ---- algebra ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_associativity(seed, dtype):
    """merge(merge(a, b), c) and merge(a, merge(b, c)) both match the float64 merge of a, b, c within
    the bound for a rounded intermediate (its value rounded to the dtype, its LSE carrying float32
    error), and so each other within twice that; merge_states([a, b, c]) within the direct bound."""
    S, H, D = 799, 8, 128
    (va, sa), (vb, sb), (vc, sc) = (rand_states((S, H, D), dtype) for _ in range(3))
    ab = c_merge_state(va, sa, vb, sb)
    left = c_merge_state(*ab, vc, sc)
    bc = c_merge_state(vb, sb, vc, sc)
    right = c_merge_state(va, sa, *bc)
    v3, s3 = c_merge_states(torch.stack([va, vb, vc], 1), torch.stack([sa, sb, sc], 1))
    torch.cuda.synchronize()
    v_ref, s_ref = merge_ref(torch.stack([va, vb, vc], 1), torch.stack([sa, sb, sc], 1))
    vmax, lmax = finite_max(va, vb, vc), finite_max(sa, sb, sc)
    # The intermediate's LSE error (lse_tol with N = 2) acts like a rounding of its LSE.
    inter_lse = F32_EPS * (lmax + 6)
    extra_v = 2 * inter_lse * vmax
    # Two 2-way merges: float32 arithmetic (8 * 2 + 16) 2^-24 each = value_tol's term for N = 6.
    for name, (v, s) in (("(ab)c", left), ("a(bc)", right)):
        check_merged(name, v, s, v_ref, s_ref, dtype, vmax, 6, rounded_inputs=True, lse_max=lmax,
                     extra_v=extra_v, extra_s=inter_lse)
    tol = 2 * (value_tol(dtype, vmax, 6, True, lmax) + extra_v)
    diff = float((left[0].double() - right[0].double()).abs().max())
    assert diff <= tol, "(ab)c and a(bc) differ by %.4g > %.4g" % (diff, tol)
    check_merged("merge_states abc", v3, s3, v_ref, s_ref, dtype, vmax, 3)


def attention64(q, k, v, scale):
    """float64 softmax attention without masks: q (Sq, H, D), k / v (Sk, H, D) -> out (Sq, H, D),
    lse (Sq, H); no key: out 0, lse -inf."""
    sq, h, d = q.shape
    if k.shape[0] == 0:
        return (torch.zeros(sq, h, d, dtype=torch.float64, device=DEV),
                torch.full((sq, h), NEG_INF, dtype=torch.float64, device=DEV))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    out = torch.einsum("hqk,khd->qhd", p, v.double())
    return out, lse.transpose(0, 1)


def cut_points(rng, n_keys, n_parts, allow_empty):
    """n_parts contiguous partitions of range(n_keys) as boundaries [0, ..., n_keys]; with
    allow_empty and n_parts >= 3 one partition is forced empty."""
    if allow_empty:
        cuts = sorted(rng.randint(0, n_keys) for _ in range(n_parts - 1))
        if n_parts >= 3:
            cuts[len(cuts) // 2] = cuts[len(cuts) // 2 - 1]
    else:
        cuts = sorted(rng.sample(range(1, n_keys), n_parts - 1))
    return [0] + cuts + [n_keys]


@pytest.mark.parametrize("num_states", [1, 2, 7, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_states_partitions_equal_full_attention(seed, dtype, num_states):
    """Attention over a key sequence split into N parts (one of them empty for N >= 7): the float64
    partial states, rounded to the dtype (values) and float32 (LSE) and stored (N, H, S)-major as
    strided views, merged on the GPU, equal attention over the whole sequence."""
    sq, sk, H, D = 113, 1000, 8, 128
    scale = 1.0 / math.sqrt(D)
    q = torch.randn(sq, H, D, device=DEV, dtype=torch.float64)
    k = torch.randn(sk, H, D, device=DEV, dtype=torch.float64)
    vv = torch.randn(sk, H, D, device=DEV, dtype=torch.float64)
    bounds = cut_points(seed, sk, num_states, allow_empty=True)
    v = strided((sq, num_states, H, D), dtype, order=(1, 0, 2, 3))
    s = strided((sq, num_states, H), torch.float32, order=(1, 2, 0))
    for i in range(num_states):
        o_i, l_i = attention64(q, k[bounds[i]:bounds[i + 1]], vv[bounds[i]:bounds[i + 1]], scale)
        v[:, i] = o_i.to(dtype)
        s[:, i] = l_i.float()
    v_out, s_out = c_merge_states(v, s)
    torch.cuda.synchronize()
    o_full, l_full = attention64(q, k, vv, scale)
    check_merged("merge_states of %d partitions" % num_states, v_out, s_out, o_full, l_full, dtype,
                 finite_max(v), num_states, rounded_inputs=True, lse_max=finite_max(s))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_states", [2, 7])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_merge_states_of_flash_attn_partitions(seed, dtype, num_states, head_dim):
    """The partial states come from fastattn.flash_attn_func(..., return_softmax_lse=True) on the GPU
    over N non-empty key partitions. The merged result against float64 attention over all keys may
    carry the partial results' own errors, which are measured (max|out_k - ref_k| and
    max|lse_k - ref_k| against float64 attention over partition k) and propagated: a convex
    combination passes value errors through, and LSE errors shift each weight by a relative
    2 max|dlse| (first order), moving the value by at most that times max|v_k|."""
    sq, sk, H = 77, 799, 8
    q = torch.randn(1, sq, H, head_dim, device=DEV, dtype=dtype)
    k = torch.randn(1, sk, H, head_dim, device=DEV, dtype=dtype)
    vv = torch.randn(1, sk, H, head_dim, device=DEV, dtype=dtype)
    scale = 1.0 / math.sqrt(head_dim)
    bounds = cut_points(seed, sk, num_states, allow_empty=False)
    outs, lses, err_v, err_s = [], [], 0.0, 0.0
    for i in range(num_states):
        kp, vp = k[:, bounds[i]:bounds[i + 1]], vv[:, bounds[i]:bounds[i + 1]]
        o_i, l_i = fastattn.flash_attn_func(q, kp, vp, return_softmax_lse=True)
        r_o, r_l = attention64(q[0], kp[0], vp[0], scale)
        err_v = max(err_v, float((o_i[0].double() - r_o).abs().max()))
        err_s = max(err_s, float((l_i[0].transpose(0, 1).double() - r_l).abs().max()))
        outs.append(o_i[0])
        lses.append(l_i[0].transpose(0, 1))  # (H, Sq) -> (Sq, H): a strided view
    v = torch.stack(outs, 1)
    s = torch.stack(lses, 1)
    v_out, s_out = c_merge_states(v, s)
    torch.cuda.synchronize()
    o_full, l_full = attention64(q[0], k[0], vv[0], scale)
    vmax = finite_max(v)
    # err_v / err_s already hold the partial states' rounding (they are measured against float64),
    # so the merge adds only its own output rounding and float32 arithmetic.
    check_merged("merge_states of flash_attn partitions", v_out, s_out, o_full, l_full, dtype, vmax,
                 num_states, extra_v=err_v + 2 * err_s * vmax * (1 + 4 * err_s), extra_s=err_s)


# ---- sizes, streams, graphs ----------------------------------------------------------------------


def test_zero_sizes(seed):
    """S = 0, H = 0 and D = 0 (the LSEs are still merged), through all three ops."""
    for shape in ((0, 4, 64), (5, 0, 64), (5, 3, 0)):
        va, sa = rand_states(shape, torch.float16)
        vb, sb = rand_states(shape, torch.float16)
        v_ref, s_ref = merge2_ref(va, sa, vb, sb)
        v, s = c_merge_state(va, sa, vb, sb)
        torch.cuda.synchronize()
        check_merged("merge_state %s" % (shape,), v, s, v_ref, s_ref, torch.float16, 0.0, 2)
        v, s = c_merge_states(torch.stack([va, vb], 1), torch.stack([sa, sb], 1))
        torch.cuda.synchronize()
        check_merged("merge_states %s" % (shape,), v, s, v_ref, s_ref, torch.float16, 0.0, 2)
        fastattn.merge_state_in_place(va, sa, vb, sb, mask=torch.ones(shape[0], dtype=torch.bool, device=DEV))
        torch.cuda.synchronize()
        check_merged("merge_state_in_place %s" % (shape,), va, sa, v_ref, s_ref, torch.float16, 0.0, 2)


def test_offsets_beyond_2_31(seed):
    """Element offsets past 2^31 (64-bit index arithmetic): two rows 2^31 elements apart in one
    4 GiB allocation, for v_a, v_b and v_out."""
    free = torch.cuda.mem_get_info()[0]
    H, D = 4, 128
    row = 2 ** 31
    need = (row + 3 * H * D) * 2
    if free < need + (1 << 30):
        pytest.skip("needs %.1f GiB of free GPU memory" % (need / 2 ** 30))
    base = torch.zeros(row + 3 * H * D, device=DEV, dtype=torch.float16)
    views = [torch.as_strided(base, (2, H, D), (row, D, 1), i * H * D) for i in range(3)]
    va, vb, v_out = views
    va.copy_(torch.randn(2, H, D, device=DEV))
    vb.copy_(torch.randn(2, H, D, device=DEV))
    sa = torch.randn(2, H, device=DEV) + 3
    sb = torch.randn(2, H, device=DEV) + 3
    s_out = torch.full((2, H), float("nan"), device=DEV)
    v_out.fill_(float("nan"))
    c_merge_state(va, sa, vb, sb, v_out, s_out)
    torch.cuda.synchronize()
    v_ref, s_ref = merge2_ref(va, sa, vb, sb)
    check_merged("merge_state > 2^31", v_out, s_out, v_ref, s_ref, torch.float16, finite_max(va, vb), 2)
    del base, views, va, vb, v_out
    torch.cuda.empty_cache()


def test_runs_on_current_stream(seed):
    """On a side stream: a GPU spin, the inputs overwritten, the merge, a snapshot. A kernel on
    another stream would read the old inputs or still run when the snapshot is taken."""
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not available")
    S, H, D = 4096, 32, 128
    va, sa = rand_states((S, H, D), torch.float16)
    vb, sb = rand_states((S, H, D), torch.float16)
    new_a = rand_states((S, H, D), torch.float16)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        va.copy_(new_a[0])
        sa.copy_(new_a[1])
        v, s = fastattn.merge_state(va, sa, vb, sb)
        snap = v.clone(), s.clone()
    side.synchronize()
    torch.cuda.synchronize()
    v_ref, s_ref = merge2_ref(new_a[0], new_a[1], vb, sb)
    check_merged("merge_state on a side stream", snap[0], snap[1], v_ref, s_ref, torch.float16,
                 finite_max(new_a[0], vb), 2)


def test_cuda_graph(seed):
    """No allocation or host synchronisation in the merge calls: merge_state and merge_states into
    fixed outputs capture into a CUDA graph; replays with new inputs give the new results."""
    S, N, H, D = 113, 3, 8, 128
    va, sa = rand_states((S, H, D), torch.bfloat16)
    vb, sb = rand_states((S, H, D), torch.bfloat16)
    v, s = rand_states((S, N, H, D), torch.bfloat16)
    o2, l2 = nan_like(va), nan_like(sa)
    on, ln = nan_like(va), nan_like(sa)

    def calls():
        _C.merge_state(va, sa, vb, sb, o2, l2, cuda_stream=stream_ptr())
        _C.merge_states(v, s, on, ln, cuda_stream=stream_ptr())

    graph = capture_or_xfail(calls)
    for _ in range(2):
        for t in (va, vb, v):
            t.copy_(torch.randn(t.shape, device=DEV))
        sa.copy_(torch.randn_like(sa) * 3)
        s.copy_(torch.randn_like(s) * 3)
        for t in (o2, l2, on, ln):
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref2 = merge2_ref(va, sa, vb, sb)
        refn = merge_ref(v, s)
        check_merged("graph merge_state", o2, l2, *ref2, torch.bfloat16, finite_max(va, vb), 2)
        check_merged("graph merge_states", on, ln, *refn, torch.bfloat16, finite_max(v), N)


TABLE = "__dlpack_c_exchange_api__" in torch.Tensor.__dict__


@pytest.mark.skipif(not TABLE, reason="torch.Tensor has no DLPack C exchange table before torch 2.10")
def test_public_merges_take_outputs_and_stream_from_torchs_table(seed, monkeypatch):
    """From torch 2.10 the public merge calls have the binding allocate merge_state's and
    merge_states' outputs and read the current stream through torch's exchange table. On a side
    stream, each of the four calls gives the same bits as the path that allocates in Python and
    asks torch.cuda for the stream, and the reference's merge; merge_state and merge_states with
    no outputs capture into a CUDA graph (outputs from the graph's pool) and replay to the eager
    bits for new inputs."""
    import fastattn.cascade as cascade_module

    S, N, H, D = 113, 3, 8, 128
    dt = torch.bfloat16
    va, sa = rand_states((S, H, D), dt)
    vb, sb = rand_states((S, H, D), dt)
    v, s = rand_states((S, N, H, D), dt)
    sinks = torch.randn(H, device=DEV) * 3 + 5.0

    def calls():
        m2 = fastattn.merge_state(va, sa, vb, sb)
        mn = fastattn.merge_states(v, s)
        vi, si = va.clone(), sa.clone()
        fastattn.merge_state_in_place(vi, si, vb, sb)
        fastattn.merge_attention_sinks(vi, si, sinks)
        return m2 + mn + (vi, si)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        table = calls()
        with monkeypatch.context() as m:
            m.setattr(cascade_module, "through_exchange_table", lambda x: False)
            python = calls()
    side.synchronize()
    for name, a, b in zip(("merge_state v", "merge_state s", "merge_states v", "merge_states s",
                           "in place v", "in place s"), table, python):
        R.assert_bitwise_equal(name + " (the table's against Python's)", a, b)
    assert table[0].dtype == dt and table[1].dtype == torch.float32 and table[2].shape == (S, H, D)
    check_merged("merge_state", table[0], table[1], *merge2_ref(va, sa, vb, sb), dt, finite_max(va, vb), 2)
    check_merged("merge_states", table[2], table[3], *merge_ref(v, s), dt, finite_max(v), N)
    v_ref, s_ref = merge_ref(torch.stack([va, vb, torch.zeros_like(va)], 1),
                             torch.stack([sa, sb, sinks[None].expand(S, H)], 1))
    check_merged("in place, then sinks", table[4], table[5], v_ref, s_ref, dt, finite_max(va, vb), 3,
                 rounded_inputs=True)

    held = {}

    def captured():
        held["m2"] = fastattn.merge_state(va, sa, vb, sb)
        held["mn"] = fastattn.merge_states(v, s)

    graph = capture_or_xfail(captured)
    for t in (va, vb, v):
        t.copy_(torch.randn(t.shape, device=DEV))
    sa.copy_(torch.randn_like(sa) * 3)
    s.copy_(torch.randn_like(s) * 3)
    for t in held["m2"] + held["mn"]:
        t.fill_(float("nan"))
    graph.replay()
    eager = fastattn.merge_state(va, sa, vb, sb) + fastattn.merge_states(v, s)
    torch.cuda.synchronize()
    for name, a, b in zip(("v", "s", "v (N)", "s (N)"), held["m2"] + held["mn"], eager):
        R.assert_bitwise_equal(name + " (replay against eager)", a, b)


# ---- errors --------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    va = torch.randn(5, 2, 64, device=DEV, dtype=torch.float16)
    sa = torch.randn(5, 2, device=DEV)
    with pytest.raises(TypeError, match=r"merge_state: s_b must have dtype float32, got float16"):
        fastattn.merge_state(va, sa, va, sa.half())
    with pytest.raises(ValueError, match=r"merge_state: v_b must have shape"):
        fastattn.merge_state(va, sa, torch.randn(5, 2, 72, device=DEV, dtype=torch.float16), sa)
    with pytest.raises(TypeError, match=r"merge_state: v_b must have the dtype of v_a"):
        fastattn.merge_state(va, sa, va.float(), sa)
    with pytest.raises(ValueError, match=r"merge_state: s_a must be on the device of v_a \(cuda:0\), got cpu"):
        fastattn.merge_state(va, sa.cpu(), va, sa)
    with pytest.raises(ValueError, match=r"merge_state: v_b must be on the device of v_a"):
        fastattn.merge_state(va, sa, va.cpu(), sa)
    with pytest.raises(TypeError, match=r"merge_state: v_out must have the dtype of v_a"):
        _C.merge_state(va, sa, va, sa, torch.empty(5, 2, 64, device=DEV), torch.empty(5, 2, device=DEV))
    with pytest.raises(TypeError, match=r"merge_state_in_place: mask must have dtype in"):
        fastattn.merge_state_in_place(va, sa, va.clone(), sa.clone(),
                                      mask=torch.ones(5, device=DEV, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"merge_state_in_place: mask must be on the device of v"):
        fastattn.merge_state_in_place(va, sa, va.clone(), sa.clone(), mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"merge_state_in_place: s_other must have shape"):
        fastattn.merge_state_in_place(va, sa, va.clone(), torch.randn(5, 3, device=DEV))
    v4 = torch.randn(5, 3, 2, 64, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"merge_states: s must have shape \(S, N, H\)"):
        fastattn.merge_states(v4, torch.randn(5, 2, 3, device=DEV))
    with pytest.raises(TypeError, match=r"merge_states: s must have dtype float32, got float16"):
        fastattn.merge_states(v4, torch.randn(5, 3, 2, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"merge_states: s must be on the device of v"):
        fastattn.merge_states(v4, torch.randn(5, 3, 2))
    with pytest.raises(ValueError, match=r"merge_states: v must be contiguous in its last dimension"):
        fastattn.merge_states(v4.transpose(2, 3).contiguous().transpose(2, 3), torch.randn(5, 3, 2, device=DEV))
