"""The GPU decode suite of ``python -m fastattn.bench`` (fastattn/bench/gpu_decode.py) without a
GPU: the plan of shapes, the byte accounting, the acceptance logic and the table on synthetic
records, the float32 reference, the command line, and one end-to-end run of run_suite on the CPU
through a stand-in for torch.cuda (events timed on the host)."""

import json
import time
import types

import pytest

from fastattn.bench import gpu_decode as gd

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
GiB = 1 << 30


# ---- plan and bytes ---------------------------------------------------------------------------


def test_plan_full_is_the_issue_suite():
    s = gd.Settings.for_mode(False)
    shapes = gd.plan(s)
    assert len(shapes) == 2 * 4 * 3
    assert {(x.dtype, x.head_dim, x.heads_q) for x in shapes} == {("bf16", 128, 32)}
    assert {x.heads_kv for x in shapes} == {8, 32}
    assert {x.batch for x in shapes} == {1, 8, 32, 128}
    assert {x.cache_len for x in shapes} == {1024, 8192, 32768}
    skipped = [x.name for x in shapes if x.skip_reason(s)]
    assert skipped == ["bf16 d128 32/32 b128 L32768"]  # 64 GiB of K+V
    assert max(x.kv_bytes for x in shapes if x.heads_kv == 8) == 16 * GiB
    assert "64 GiB" in shapes[-1].skip_reason(s)
    assert s.time_limit_s < 180


def test_plan_quick_and_overrides():
    q = gd.plan(gd.Settings.for_mode(True))
    assert [(x.heads_kv, x.batch, x.cache_len) for x in q] == [
        (8, 1, 1024), (8, 1, 8192), (8, 32, 1024), (8, 32, 8192)]
    assert any(x.tokens >= gd.ACCEPT_BW_MIN_TOKENS for x in q)  # check (1) has a row
    o = gd.Settings.for_mode(True, batches=[4], cache_lens=[2048], heads_kv=[4], dtypes=["fp16"],
                             head_dims=None)
    assert [x.name for x in gd.plan(o)] == ["fp16 d128 32/4 b4 L2048"]
    assert gd.Settings.for_mode(False, time_limit_s=None).time_limit_s == 150.0


def test_decode_bytes():
    b, L, hkv, hq, d = 8, 8192, 8, 32, 128
    kv = b * L * hkv * d * 2 * 2
    qo = b * hq * d * 2 * 2
    assert gd.decode_bytes(b, L, hkv, hq, d) == kv + qo
    assert gd.kv_cache_bytes(b, L, hkv, d) == kv
    sh = gd.Shape("bf16", d, hq, hkv, b, L)
    assert sh.bytes == kv + qo
    assert sh.peer_bytes(expanded=False) == sh.bytes
    assert sh.peer_bytes(expanded=True) == 4 * kv + qo  # expanded K/V: 4x the cache reads
    assert qo / sh.bytes < 0.004
    assert sh.tokens == b * L


def test_n_sets_rotates_at_least_three_and_more_for_small_caches():
    l2 = 50 << 20
    assert gd._n_sets(16 * GiB, l2) == gd.MIN_INPUT_SETS == 3
    assert gd._n_sets(100 << 20, l2) == 3
    assert gd._n_sets(40 << 20, l2) == 4
    assert gd._n_sets(4 << 20, l2) == 26
    assert gd._n_sets(1 << 10, l2) == 32
    # Fewer where memory holds fewer, never none.
    assert gd._n_sets(16 * GiB, l2, fit=2) == 2
    assert gd._n_sets(4 << 20, l2, fit=5) == 5
    assert gd._n_sets(16 * GiB, l2, fit=0) == 1


# ---- synthetic records ------------------------------------------------------------------------


def rec(hkv, b, L, paged=None, contig=None, flash=None, cudnn=None, expanded=(), copy=4.0e12,
        paged_info=None):
    """A record as measure_shape makes it, from times in microseconds (None: n/a)."""
    sh = gd.Shape("bf16", 128, 32, hkv, b, L)
    r = gd.base_record(sh)
    for key, t in ((gd.PAGED, paged), (gd.CONTIG, contig), ("sdpa-flash", flash),
                   ("sdpa-cudnn", cudnn)):
        if t is None:
            r["impls"][key] = {"s": None, "error": "NotImplementedError: no CUDA kernel",
                               "not_implemented": True} if key.startswith("fastattn") else \
                {"s": None, "error": "RuntimeError: refused"}
            continue
        exp = key in expanded
        nbytes = sh.peer_bytes(exp) if key.startswith("sdpa") else sh.bytes
        info = {"s": t * 1e-6, "bytes": nbytes, "tbps": nbytes / (t * 1e-6) / 1e12, "spread": 0.01}
        if key.startswith("sdpa"):
            info["gqa_mode"] = ("expanded" if exp else "enable_gqa") if hkv != 32 else "plain"
        else:
            info.update(finite=True, max_abs_err=2e-3)
        r["impls"][key] = info
    if paged_info:
        r["impls"][gd.PAGED].update(paged_info)
    gd._ratios(r)
    return r


def time_at(fraction, b, L, hkv=8, copy=4.0e12):
    """Microseconds at which a call reaches `fraction` of the copy bandwidth."""
    return gd.decode_bytes(b, L, hkv, 32, 128) / (fraction * copy) * 1e6


def passing_records(copy=4.0e12):
    rs = []
    for hkv in (8, 32):
        for b, L in ((1, 1024), (32, 8192), (128, 8192)):
            t = time_at(0.93, b, L, hkv, copy)
            rs.append(rec(hkv, b, L, paged=t, contig=0.99 * t, flash=1.3 * t, cudnn=1.2 * t))
    return rs


def test_ratios_are_time_ratios():
    r = rec(8, 32, 8192, paged=110.0, contig=100.0, flash=150.0, cudnn=220.0)
    ra = r["ratios"]
    assert ra["paged16/cudnn"] == pytest.approx(2.0)
    assert ra["contiguous/cudnn"] == pytest.approx(2.2)
    assert ra["paged16/flash"] == pytest.approx(150 / 110)
    assert ra["paged16_time/contiguous_time"] == pytest.approx(1.1)
    r2 = rec(8, 32, 8192, paged=None, contig=100.0, flash=150.0, cudnn=None)
    assert r2["ratios"]["paged16/cudnn"] is None and r2["ratios"]["contiguous/cudnn"] is None
    assert r2["ratios"]["paged16_time/contiguous_time"] is None


def test_summary_all_pass():
    copy = 4.0e12
    rs = passing_records(copy)
    rs.append(gd.skipped_record(gd.Shape("bf16", 128, 32, 32, 128, 32768), "too big"))
    gd.add_copy_fractions(rs, copy / 1e12)
    s = gd.summarize(rs, copy / 1e12, budget_s=0.5)
    assert s["bandwidth"]["status"] == "PASS"
    assert s["bandwidth"]["of"] == 4  # b32 L8192 and b128 L8192, GQA and MHA (b1 L1024 is small)
    assert s["bandwidth"]["min"] == pytest.approx(0.93, rel=1e-6)
    assert s["vs_cudnn"]["status"] == "PASS" and s["vs_cudnn"]["of"] == 12
    assert s["paged_vs_contiguous"]["status"] == "PASS"
    assert s["paged_vs_contiguous"]["max"] == pytest.approx(1 / 0.99)
    assert s["skipped"] == [["bf16 d128 32/32 b128 L32768", "too big"]]
    assert s["fastattn_na"] == {"n": 0, "of": 12, "not_implemented": 0}
    assert s["max_err_fastattn"] == pytest.approx(2e-3)
    json.dumps(s)
    text = "\n".join(gd.summary_lines(s, "NVIDIA H200", "2026-01-01", "python -m fastattn.bench"))
    assert text.count("-> PASS") == 3
    assert "4.00 TB/s" in text and "skipped rows" in text
    assert rs[1]["impls"][gd.PAGED]["copy_fraction"] == pytest.approx(0.93)


def test_summary_failures_are_listed():
    copy = 4.0e12
    rs = passing_records(copy)
    b, L = 128, 8192
    slow = time_at(0.80, b, L)  # below 90% of copy, slower than cuDNN, paged 8% over contiguous
    rs[2] = rec(8, b, L, paged=slow, contig=slow / 1.08, flash=slow, cudnn=0.95 * slow)
    gd.add_copy_fractions(rs, copy / 1e12)
    s = gd.summarize(rs, copy / 1e12)
    name = rs[2]["name"]
    assert s["bandwidth"]["status"] == "FAIL"
    assert s["bandwidth"]["failing"] == [[name, pytest.approx(0.80)]]
    assert s["vs_cudnn"]["status"] == "FAIL"
    assert [n for n, _ in s["vs_cudnn"]["failing"]] == ["paged16 " + name]  # contiguous 1.03x
    assert s["paged_vs_contiguous"]["status"] == "FAIL"
    assert s["paged_vs_contiguous"]["failing"] == [[name, pytest.approx(1.08)]]
    lines = gd.summary_lines(s, "gpu", "date", "cmd")
    text = "\n".join(lines)
    assert text.count("-> FAIL") == 3
    assert "%s 80.0%%" % name in text and "%s 1.080x" % name in text
    assert "min 80.0%" in text


def test_summary_with_fastattn_missing():
    copy = 4.0e12
    rs = [rec(8, 32, 8192, paged=None, contig=None, flash=300.0, cudnn=280.0),
          rec(8, 1, 1024, paged=None, contig=None, flash=30.0, cudnn=None)]
    gd.add_copy_fractions(rs, copy / 1e12)
    s = gd.summarize(rs, copy / 1e12)
    assert s["bandwidth"]["status"] == "INCOMPLETE" and s["bandwidth"]["n"] == 0
    assert s["vs_cudnn"]["status"] == "INCOMPLETE"
    assert s["fastattn_na"] == {"n": 4, "of": 4, "not_implemented": 4}
    assert s["peers"]["sdpa-cudnn"] == {"gqa enable_gqa": 1, "gqa n/a": 1}
    text = "\n".join(gd.summary_lines(s, "gpu", "date", "cmd"))
    assert "INCOMPLETE" in text and "4 of 4 fastattn timings" in text
    assert gd.bad_records(rs) == []  # NotImplementedError is n/a, not a failure


def test_bad_records():
    r = rec(8, 1, 1024, paged=10.0, contig=10.0, flash=12.0, cudnn=13.0,
            paged_info={"finite": False})
    r2 = rec(8, 1, 8192, paged=None, contig=10.0, flash=12.0, cudnn=13.0)
    r2["impls"][gd.PAGED] = {"s": None, "error": "RuntimeError: boom", "failed": True}
    r3 = gd.base_record(gd.Shape("bf16", 128, 32, 8, 8, 1024))
    r3["error"] = "OutOfMemoryError: x"
    bad = gd.bad_records([r, r2, r3])
    assert len(bad) == 3
    assert "non-finite" in bad[0] and "boom" in bad[1] and "OutOfMemoryError" in bad[2]


def test_format_table():
    rs = passing_records()
    rs.append(rec(8, 8, 1024, paged=None, contig=20.0, flash=30.0, cudnn=25.0,
                  expanded=("sdpa-cudnn",)))
    rs.append(gd.skipped_record(gd.Shape("bf16", 128, 32, 32, 128, 32768), "K+V cache 64 GiB"))
    gd.add_copy_fractions(rs, 4.0)
    text = gd.format_table(rs, 4.0)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["shape", "paged", "us", "TB/s"]
    assert len({len(l) for l in lines[:2 + len(rs)]}) == 1  # aligned columns
    row = [l for l in lines if l.startswith("bf16 d128 32/8 b8 L1024")][0]
    assert " n/a " in row and "*" in row  # fastattn paged n/a; cuDNN charged expanded bytes
    assert "93%" in lines[2]
    skip = [l for l in lines if l.startswith("bf16 d128 32/32 b128 L32768")][0]
    assert "skip" in skip
    assert any(l.startswith("n/a: NotImplementedError") for l in lines)
    assert "copy bandwidth 4.00 TB/s" in text


def test_save_plot(tmp_path):
    rs = passing_records()
    rs.append(gd.skipped_record(gd.Shape("bf16", 128, 32, 32, 128, 32768), "too big"))
    gd.add_copy_fractions(rs, 4.0)
    out = gd.save_plot(rs, str(tmp_path / "d.png"), "title", 4.0)
    assert out == str(tmp_path / "d.png") or out.startswith("no plot (matplotlib")


# ---- torch parts on the CPU ---------------------------------------------------------------------


@needs_torch
def test_reference_f32_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, L, d = 3, 8, 2, 37, 16
    q = torch.randn(b, 1, hq, d, generator=g).bfloat16()
    k = torch.randn(b, hkv, L, d, generator=g).bfloat16()
    v = torch.randn(b, hkv, L, d, generator=g).bfloat16()
    out = gd.reference_f32(torch, q, k, v, chunk_bytes=1)  # one sequence per chunk
    rep = hq // hkv
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().repeat_interleave(rep, 1),
        v.float().repeat_interleave(rep, 1)).transpose(1, 2)
    assert out.shape == (b, 1, hq, d) and out.dtype == torch.float32
    assert float((out - want).abs().max()) < 1e-5


class _Event:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _FakeTorch:
    """torch with "cuda" mapped to the CPU: host-timed events, no-op synchronize and sleep. SDPA
    refuses enable_gqa (so GQA peers take the expanded path); the CPU has no cuDNN backend."""

    def __init__(self):
        def sdpa(q, k, v, **kw):
            if kw.pop("enable_gqa", False):
                raise RuntimeError("enable_gqa refused (test)")
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)

        self.cuda = types.SimpleNamespace(
            Event=_Event, synchronize=lambda: None, empty_cache=lambda: None,
            mem_get_info=lambda: (100 * GiB, 140 * GiB), _sleep=lambda cycles: None,
            get_device_properties=lambda i: types.SimpleNamespace(
                L2_cache_size=1 << 16, multi_processor_count=132, uuid="0f0e0d0c-fake"))
        self.nn = types.SimpleNamespace(functional=types.SimpleNamespace(
            scaled_dot_product_attention=sdpa))

    def __getattr__(self, name):
        return getattr(torch, name)

    def device(self, name):
        return torch.device("cpu")


@pytest.fixture
def no_warm(monkeypatch):
    """The suite's GPU warm-ups (matrix products, copies) left out: the stand-in has no clocks."""
    monkeypatch.setattr(gd, "warm_gpu", lambda torch: None)
    monkeypatch.setattr(gd, "rewarm_gpu", lambda torch: None)


def _tiny_settings(**kw):
    """B 1, 2 x L 32, 64 x 32/8 and 32/32 heads; MHA b2 L64 (and GQA b2 L64 expanded) is over
    the memory limit."""
    args = dict(batches=[1, 2], cache_lens=[32, 64], heads_kv=[8, 32], copy_bytes=1 << 20,
                max_cache_bytes=2 * 64 * 32 * 128 * 2 * 2 - 1, rounds=2, min_calls=2, max_calls=4)
    args.update(kw)
    return gd.Settings.for_mode(True, **args)


@needs_torch
def test_run_suite_end_to_end_on_fake_cuda(no_warm):
    s = _tiny_settings()
    records, meta = gd.run_suite(_FakeTorch(), s, log=lambda *a, **k: None)
    assert [r["name"] for r in records] == [x.name for x in gd.plan(s)]
    assert [r["name"] for r in records if r.get("skipped")] == ["bf16 d128 32/32 b2 L64"]
    assert meta["copy"]["tbps"] > 0 and meta["queue_ahead"]
    for r in records:
        if r.get("skipped"):
            continue
        im = r["impls"]
        flash = im["sdpa-flash"]
        # GQA b2 L64: K/V expanded to 32 heads would pass the memory limit, so flash is n/a
        too_big = r["gqa"] and r["batch"] == 2 and r["cache_len"] == 64
        for key in (gd.PAGED, gd.CONTIG):
            assert im[key]["finite"] and im[key]["max_abs_err"] < 0.05, (r["name"], im[key])
            assert im[key]["err_vs"] == ("float32 torch" if too_big else "sdpa-flash")
            assert im[key]["bytes"] == r["bytes"] and im[key]["tbps"] > 0
            assert im[key]["runs"] == 4 and "copy_fraction" in im[key]
        if too_big:
            assert flash["s"] is None and "expanded: skipped" in flash["error"]
            assert r["ratios"]["paged16/flash"] is None
        elif r["gqa"]:
            assert flash["gqa_mode"] == "expanded" and flash["bytes"] > r["bytes"]
            assert "refused" in flash and r["ratios"]["paged16/flash"] > 0
        else:
            assert flash["gqa_mode"] == "plain" and flash["bytes"] == r["bytes"]
        assert im["sdpa-cudnn"]["s"] is None and im["sdpa-cudnn"]["error"]
        assert r["ratios"]["paged16/cudnn"] is None
        assert r["input_sets"] >= gd.MIN_INPUT_SETS
    assert gd.bad_records(records) == []
    summ = gd.summarize(records, meta["copy"]["tbps"], s.budget_s)
    json.dumps([records, meta, summ])
    assert gd.summary_lines(summ, "fake", "today", "cmd")
    assert "bf16 d128 32/8 b1 L32" in gd.format_table(records, meta["copy"]["tbps"])


@needs_torch
def test_run_suite_fastattn_not_implemented(no_warm, monkeypatch):

    def missing(*a, **kw):
        raise NotImplementedError("flash_attn_with_kvcache: no CUDA kernel (test)")
    monkeypatch.setattr(gd.fastattn, "flash_attn_with_kvcache", missing)
    s = _tiny_settings(heads_kv=[8], max_cache_bytes=gd.MAX_CACHE_BYTES)
    records, meta = gd.run_suite(_FakeTorch(), s, log=lambda *a, **k: None)
    for r in records:
        for key in (gd.PAGED, gd.CONTIG):
            assert r["impls"][key]["s"] is None and r["impls"][key]["not_implemented"]
        assert r["impls"]["sdpa-flash"]["s"] is not None
    assert gd.bad_records(records) == []
    summ = gd.summarize(records, meta["copy"]["tbps"])
    assert summ["fastattn_na"]["n"] == summ["fastattn_na"]["of"] == 2 * len(records)


@needs_torch
def test_every_implementation_reads_its_own_small_inputs(monkeypatch):
    """q, cache_seqlens and the block table (SDPA: its q) are equal in value for every
    implementation of a set but never the same storage, so that no timed call finds them in L2
    because another implementation read them just before it (session 61)."""
    fake = _FakeTorch()
    gen = torch.Generator().manual_seed(0)
    st = gd.InputSet(fake, gd.Shape("bf16", 128, 32, 8, 2, 48), 16,
                     lambda n: torch.randperm(n, generator=gen))
    seen = []

    def record_fastattn(q, k, v, cache_seqlens=None, block_table=None, **kw):
        seen.append((q, cache_seqlens, block_table))
        return q
    monkeypatch.setattr(gd.fastattn, "flash_attn_with_kvcache", record_fastattn)
    used = {}
    for var in gd.VARIANTS:
        st.fastattn_call(var)()
        used[var] = seen[-1]
    (qp, lp, tp), (qc, lc, tc) = used["paged16"], used["contiguous"]
    assert tp is not None and tc is None
    assert qp.data_ptr() != qc.data_ptr() and lp.data_ptr() != lc.data_ptr()
    assert qp.data_ptr() != st.q.data_ptr() and tp.data_ptr() != st.table.data_ptr()
    assert torch.equal(qp, st.q) and torch.equal(qc, st.q)
    assert torch.equal(lp, st.seqlens) and torch.equal(lc, st.seqlens) and torch.equal(tp, st.table)

    peer_q = []

    def record_sdpa(q, k, v, **kw):
        peer_q.append(q)
        return q
    fake.nn.functional.scaled_dot_product_attention = record_sdpa
    for peer in gd.PEERS:
        st.sdpa_call(fake, peer, "enable_gqa")()
    qf, qd = peer_q[0], peer_q[1]
    assert qf.data_ptr() != qd.data_ptr() and qf.data_ptr() != st.tq.data_ptr()
    assert torch.equal(qf, st.tq) and torch.equal(qd, st.tq)
    # The same implementation keeps its copies from call to call.
    assert st.own_small_inputs(gd.PAGED)[0] is qp


# ---- command line -------------------------------------------------------------------------------


def test_cli_help_and_flags(capsys):
    from fastattn.bench import runner
    with pytest.raises(SystemExit) as e:
        runner.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--batches", "--cache-lens", "--kv-heads", "--suite"):
        assert flag in out
    with pytest.raises(SystemExit) as e:
        runner.main(["--kv-heads", "5", "--device", "cpu"])
    assert e.value.code == 2


@needs_torch
def test_cli_decode_suite_on_fake_cuda(no_warm, monkeypatch, tmp_path, capsys):
    """`python -m fastattn.bench --device cuda --suite decode` wiring: the JSON keys, the summary
    block, the _decode.png plot (GPU stand-in as above, one tiny shape)."""
    from fastattn.bench import runner
    fake = _FakeTorch()
    fake.cuda.get_device_name = lambda i=0: "Fake GPU"
    fake.cuda.get_device_capability = lambda i=0: (9, 0)
    monkeypatch.setattr(runner, "pick_device", lambda requested: ("cuda", fake))
    orig = gd.Settings.for_mode
    monkeypatch.setattr(gd.Settings, "for_mode", classmethod(
        lambda cls, quick, **kw: orig(quick, copy_bytes=1 << 20, **kw)))
    rc = runner.main(["--device", "cuda", "--suite", "decode", "--quick", "--batches", "1",
                      "--cache-lens", "32", "--kv-heads", "8", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "GPU decode summary: Fake GPU" in out and "(3) paged16 time" in out
    (js,) = tmp_path.glob("bench_cuda_*_quick.json")
    rec = json.loads(js.read_text())
    assert rec["suites"] == ["decode"] and rec["rows"] == []
    # the machine record names the GPU it ran on
    assert rec["machine"]["gpu"] == "Fake GPU" and rec["machine"]["gpu_capability"] == "sm_90"
    assert rec["machine"]["sm_count"] == 132 and rec["machine"]["gpu_uuid"] == "0f0e0d0c-fake"
    assert [r["name"] for r in rec["decode"]] == ["bf16 d128 32/8 b1 L32"]
    assert rec["decode_meta"]["copy"]["tbps"] > 0
    assert set(rec["decode_summary"]) >= {"bandwidth", "vs_cudnn", "paged_vs_contiguous"}
    assert rec["decode_summary_text"][0].startswith("### GPU decode summary")
    pngs = [p.name for p in tmp_path.glob("*.png")]
    assert pngs == [js.name[:-len(".json")] + "_decode.png"] or not pngs  # no matplotlib: none


# ---- FlashInfer peers (gpu_decode_flashinfer.py) -----------------------------------------------


@needs_torch
def test_csr_from_block_table_ragged():
    from fastattn.bench import gpu_decode_flashinfer as gf
    page = 16
    lens = [0, 1, 16, 17, 40]
    table = torch.randint(0, 1000, (len(lens), 4), dtype=torch.int32)
    indptr, indices, last = gf.csr_from_block_table(torch, table, torch.tensor(lens, dtype=torch.int32),
                                                    page)
    want_indices, want_indptr, want_last = [], [0], []
    for b, n in enumerate(lens):
        pages = -(-n // page)
        want_indices += [int(x) for x in table[b, :pages]]
        want_indptr.append(want_indptr[-1] + pages)
        want_last.append(0 if n == 0 else n - (pages - 1) * page)
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    assert indptr.tolist() == want_indptr == [0, 0, 1, 2, 4, 7]
    assert indices.tolist() == want_indices
    assert last.tolist() == want_last == [0, 1, 16, 1, 8]


def _paged_attention_f32(q3, k_pages, v_pages, pages_of, lens, scale):
    """Test-side reference over FlashInfer's page lists: q3 (B, Hq, D); pages_of(b) -> page ids."""
    b_n, hq, d = q3.shape
    hkv = k_pages.shape[2]
    out = torch.empty(b_n, hq, d)
    for b in range(b_n):
        ids = torch.as_tensor(pages_of(b), dtype=torch.long)
        k = k_pages[ids].reshape(-1, hkv, d)[:lens[b]].float()
        v = v_pages[ids].reshape(-1, hkv, d)[:lens[b]].float()
        for h in range(hq):
            g = h // (hq // hkv)
            p = torch.softmax(k[:, g] @ q3[b, h].float() * scale, 0)
            out[b, h] = p @ v[:, g]
    return out


def _fake_flashinfer(tc_raises=True, xqa_scale_bug=True):
    """A stand-in for the flashinfer module with the calls gpu_decode_flashinfer makes: the decode
    wrapper computes from its planned page lists and scribbles on its workspace (split-KV partials);
    the tensor-core wrapper's plan raises; XQA asserts its semaphores (its workspace's first bytes)
    read zero, and with xqa_scale_bug forgets the softmax scale (a wrong peer the suite must refuse
    to time)."""
    class Wrapper:
        def __init__(self, workspace, layout, use_tensor_cores=False):
            assert layout == "NHD" and workspace.dtype == torch.uint8
            self.tc, self.workspace = use_tensor_cores, workspace

        def plan(self, indptr, indices, last, hq, hkv, d, page, q_data_type=None,
                 kv_data_type=None, sm_scale=None):
            if self.tc and tc_raises:
                raise RuntimeError("no tensor-core module (test)")
            self.indptr, self.indices, self.last = indptr.tolist(), indices.tolist(), last.tolist()
            self.page, self.scale = page, sm_scale

        def run(self, q3, kv, out=None):
            self.workspace[:64] = 7
            lens = [(self.indptr[b + 1] - self.indptr[b] - 1) * self.page + self.last[b]
                    for b in range(q3.shape[0])]
            y = _paged_attention_f32(q3, kv[0], kv[1],
                                     lambda b: self.indices[self.indptr[b]:self.indptr[b + 1]],
                                     lens, self.scale).to(q3.dtype)
            if out is None:
                return y
            out.copy_(y)
            return out

    def xqa(q3, kv, workspace, table, lens, max_len, bmm1_scale=1.0, bmm2_scale=1.0,
            kv_layout="NHD", out=None):
        assert lens.dtype in (torch.int32, getattr(torch, "uint32", torch.int32))
        assert int(workspace[:1024].count_nonzero()) == 0, "XQA's semaphores are not zero"
        n = lens.view(torch.int32).tolist()
        y = _paged_attention_f32(q3, kv[0], kv[1], lambda b: table[b].tolist(), n,
                                 1.0 if xqa_scale_bug else bmm1_scale).to(q3.dtype)
        if out is None:
            return y
        out.copy_(y)
        return out

    return types.SimpleNamespace(__version__="0.0-test", BatchDecodeWithPagedKVCacheWrapper=Wrapper,
                                 decode=types.SimpleNamespace(xqa_batch_decode_with_kv_cache=xqa))


@needs_torch
def test_run_suite_with_flashinfer_peers(no_warm, monkeypatch):
    """--flashinfer: each peer checked against the reference on the paged16 pool, timed when
    right, refused when wrong or failing; ratios, summary line and table."""
    from fastattn.bench import gpu_decode_flashinfer as gf
    monkeypatch.setattr(gf, "load", lambda: _fake_flashinfer())
    s = _tiny_settings(heads_kv=[8, 32], batches=[2], cache_lens=[48], flashinfer=True,
                       max_cache_bytes=gd.MAX_CACHE_BYTES)
    records, meta = gd.run_suite(_FakeTorch(), s, log=lambda *a, **k: None)
    assert meta["flashinfer"] == {"version": "0.0-test", "peers": list(gd.FLASHINFER_PEERS)}
    assert len(records) == 2
    for r in records:
        im = r["impls"]
        dec = im["flashinfer-decode"]
        assert dec["s"] > 0 and dec["tbps"] > 0 and dec["max_abs_err"] < 0.02, dec
        assert r["ratios"]["paged16/flashinfer-decode"] == pytest.approx(dec["s"] / im[gd.PAGED]["s"])
        assert im["flashinfer-tc"]["s"] is None and "no tensor-core module" in im["flashinfer-tc"]["error"]
        assert r["ratios"]["paged16/flashinfer-tc"] is None
        xq = im["flashinfer-xqa"]
        assert xq["s"] is None and xq["error"].startswith("wrong output") and "runs" not in xq
    assert gd.bad_records(records) == []  # a peer's failure is not fastattn's
    summ = gd.summarize(records, meta["copy"]["tbps"], s.budget_s)
    assert set(summ["vs_flashinfer"]) == set(gd.FLASHINFER_PEERS)
    assert summ["vs_flashinfer"]["flashinfer-decode"]["n"] == 2
    lines = "\n".join(gd.summary_lines(summ, "fake", "today", "cmd"))
    assert "paged16 vs flashinfer-decode on the same page pool" in lines
    assert "flashinfer-tc: no figures" in lines
    table = gd.format_table(records, meta["copy"]["tbps"])
    assert "fi-decode us" in table and "fi-xqa/pg" in table
    json.dumps([records, meta, summ])


@needs_torch
def test_run_suite_flashinfer_xqa_right(no_warm, monkeypatch):
    """XQA with the scale right is timed beside the decode wrapper, on its own zeroed workspace."""
    from fastattn.bench import gpu_decode_flashinfer as gf
    monkeypatch.setattr(gf, "load", lambda: _fake_flashinfer(tc_raises=False, xqa_scale_bug=False))
    s = _tiny_settings(heads_kv=[8], batches=[2], cache_lens=[40], flashinfer=True)
    records, meta = gd.run_suite(_FakeTorch(), s, log=lambda *a, **k: None)
    for p in gd.FLASHINFER_PEERS:
        info = records[0]["impls"][p]
        assert info["s"] > 0 and info["max_abs_err"] < 0.02, (p, info)
        assert records[0]["ratios"]["paged16/" + p] > 0


@needs_torch
def test_run_suite_flashinfer_missing(no_warm, monkeypatch):
    from fastattn.bench import gpu_decode_flashinfer as gf

    def missing():
        raise ImportError("flashinfer unavailable: ModuleNotFoundError: test")
    monkeypatch.setattr(gf, "load", missing)
    s = _tiny_settings(heads_kv=[8], batches=[1], cache_lens=[32], flashinfer=True)
    records, meta = gd.run_suite(_FakeTorch(), s, log=lambda *a, **k: None)
    assert "unavailable" in meta["flashinfer"]["error"]
    assert not any(k.startswith("flashinfer") for r in records for k in r["impls"])
    assert "vs_flashinfer" not in gd.summarize(records, meta["copy"]["tbps"])
    assert "fi-decode" not in gd.format_table(records)
