"""The GPU merge suite of ``python -m fastattn.bench`` (fastattn/bench/gpu_merge.py) without a GPU:
the plan and byte accounting, the acceptance logic and the table on synthetic records, the float32
reference, and one end-to-end run of run() / the CLI on the CPU through a stand-in for torch.cuda
(events timed on the host; the merges run on fastattn's CPU backend)."""

import json
import time
import types

import pytest

from fastattn.bench import gpu_merge as gm

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
GiB = 1 << 30
MiB = 1 << 20


def test_plan_and_bytes():
    s = gm.Settings.for_mode(False)
    shapes = gm.plan(s)
    assert len(shapes) == 3 * 2 * 2
    assert {(x.op, x.num_states) for x in shapes} == {("merge_state", 2), ("merge_states", 2),
                                                     ("merge_states", 8)}
    assert {x.dtype for x in shapes} == {"fp16", "fp32"} and {x.seqlen for x in shapes} == {4096, 65536}
    assert not [x for x in shapes if x.skip_reason(s)]
    # short rows first: none is timed right after the multi-GB rows (see gm.plan)
    assert [x.seqlen for x in shapes] == sorted(x.seqlen for x in shapes)
    sh = gm.Shape("merge_states", 8, "fp32", 65536, 32, 128)
    # 8 value + 8 LSE tensors read, one of each written
    assert sh.bytes == 9 * (65536 * 32 * 128 * 4 + 65536 * 32 * 4)
    assert gm.Shape("merge_state", 2, "fp16", 4096, 32, 128).bytes == 3 * 4096 * 32 * (128 * 2 + 4)
    assert gm.Shape("merge_state", 2, "fp16", 4096, 32, 128).name == "merge_state fp16 S4096"
    assert sh.name == "merge_states N8 fp32 S65536"
    # every 65536-row shape moves >= 64 MiB, so the acceptance has rows
    assert all(x.bytes >= gm.ACCEPT_MIN_BYTES for x in shapes if x.seqlen == 65536)
    q = gm.plan(gm.Settings.for_mode(True))
    assert {x.dtype for x in q} == {"fp16"} and len(q) == 6
    assert gm.Settings.for_mode(True, time_limit_s=None).time_limit_s == 20.0


def _rec(name, nbytes, tbps, op="merge_state", n=2, **info):
    d = {"s": nbytes / (tbps * 1e12) if tbps else None, "tbps": tbps, "bytes": nbytes,
         "finite": True, "max_abs_err": 1e-3, "max_lse_err": 1e-6, "spread": 0.01}
    d.update(info)
    return {"name": name, "op": op, "num_states": n, "dtype": "fp16", "seqlen": 1, "heads": 32,
            "head_dim": 128, "bytes": nbytes, "impls": {"fastattn": d}}


def test_summary_pass_and_fail():
    recs = [_rec("small", 10 * MiB, 1.0), _rec("big a", 512 * MiB, 3.6),
            _rec("big b", 1024 * MiB, 4.0, op="merge_states", n=8)]
    gm.add_copy_fractions(recs, 4.3)
    s = gm.summarize(recs, 4.3)
    assert s["bandwidth"]["status"] == "PASS" and s["bandwidth"]["n"] == 2  # small row not judged
    assert s["bandwidth"]["min_at"] == "big a"
    assert s["per_op_min_fraction"]["merge_state"] == pytest.approx(1.0 / 4.3)
    lines = gm.summary_lines(s, "GPU", "today", "cmd")
    assert any(">= 80% of the copy bandwidth" in l and l.endswith("PASS") for l in lines)
    recs.append(_rec("big slow", 256 * MiB, 3.0))
    s = gm.summarize(recs, 4.3)
    assert s["bandwidth"]["status"] == "FAIL"
    assert s["bandwidth"]["failing"][0][0] == "big slow"
    recs.append(_rec("big n/a", 256 * MiB, None))
    assert "big n/a" in gm.summarize(recs, 4.3)["bandwidth"]["missing"]
    assert gm.summarize([], 4.3)["bandwidth"]["status"] == "NO ROWS"


def test_bad_records_and_table():
    recs = [_rec("ok", 512 * MiB, 4.0), _rec("nan", 512 * MiB, 4.0, finite=False),
            _rec("failed", 512 * MiB, None, failed=True, error="RuntimeError: x")]
    bad = gm.bad_records(recs)
    assert len(bad) == 2 and bad[0].startswith("nan") and bad[1].startswith("failed")
    gm.add_copy_fractions(recs, 4.0)
    table = gm.format_table(recs, 4.0)
    assert "100%" in table and "NaN!" in table and "copy bandwidth 4.00 TB/s" in table
    assert "n/a: RuntimeError: x" in table


@needs_torch
def test_reference_f32():
    v = torch.randn(5, 3, 2, 8)
    s = torch.randn(5, 3, 2)
    out, lse = gm.reference_f32(torch, v, s, rows_per_chunk=2)
    w = torch.softmax(s, dim=1)
    assert torch.allclose(out, (v * w[..., None]).sum(1), atol=1e-6)
    assert torch.allclose(lse, torch.logsumexp(s, 1))


class _Event:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _FakeTorch:
    """torch with "cuda" mapped to the CPU: host-timed events, no-op synchronize and sleep."""

    def __init__(self):
        self.cuda = types.SimpleNamespace(
            Event=_Event, synchronize=lambda: None, empty_cache=lambda: None,
            mem_get_info=lambda: (100 * GiB, 140 * GiB), _sleep=lambda cycles: None,
            current_stream=lambda *a: types.SimpleNamespace(cuda_stream=0),
            get_device_name=lambda i=0: "Fake GPU", get_device_capability=lambda i=0: (9, 0),
            get_device_properties=lambda i: types.SimpleNamespace(L2_cache_size=1 << 16))

    def __getattr__(self, name):
        return getattr(torch, name)

    def device(self, name):
        return torch.device("cpu")


def _tiny(**kw):
    args = dict(seqlens=[64, 8], heads=4, head_dim=32, dtypes=["fp16", "fp32"], copy_bytes=1 << 20,
                rounds=2, min_calls=2, max_calls=4)
    args.update(kw)
    return gm.Settings.for_mode(True, **args)


@needs_torch
def test_run_end_to_end_on_fake_cuda(monkeypatch):
    monkeypatch.setattr(gm, "warm_gpu", lambda torch: None)
    s = _tiny(max_set_bytes=int(gm.Shape("merge_states", 8, "fp32", 64, 4, 32).bytes) - 1)
    records, lines = gm.run(_FakeTorch(), s, log=lambda *a, **k: None, command="cmd")
    assert [r["name"] for r in records] == [x.name for x in gm.plan(s)]
    assert [r["name"] for r in records if r.get("skipped")] == ["merge_states N8 fp32 S64"]
    for r in records:
        assert r["copy_tbps"] > 0
        if r.get("skipped"):
            continue
        info = r["impls"]["fastattn"]
        assert info["finite"] and info["runs"] == 4 and info["tbps"] > 0 and "copy_fraction" in info
        bound = 2.0 ** -10 * 8 if r["dtype"] == "fp16" else 1e-5  # a few ulps of |v| <~ 4
        assert info["max_abs_err"] < bound and info["max_lse_err"] < 1e-5, (r["name"], info)
    assert gm.bad_records(records) == []
    assert lines[0].startswith("shape") and any(l.startswith("### GPU merge summary: Fake GPU") for l in lines)
    json.dumps(records)


@needs_torch
def test_cli_merge_suite_on_fake_cuda(monkeypatch, tmp_path, capsys):
    """`python -m fastattn.bench --device cuda --suite merge` wiring: the JSON keys and the summary
    block (GPU stand-in as above, tiny shapes)."""
    from fastattn.bench import runner
    fake = _FakeTorch()
    monkeypatch.setattr(runner, "pick_device", lambda requested: ("cuda", fake))
    monkeypatch.setattr(gm, "warm_gpu", lambda torch: None)
    orig = gm.Settings.for_mode
    monkeypatch.setattr(gm.Settings, "for_mode", classmethod(
        lambda cls, quick, **kw: orig(quick, **dict(kw, seqlens=[16], heads=2, head_dim=32,
                                                    copy_bytes=1 << 20, min_calls=2, max_calls=4))))
    rc = runner.main(["--device", "cuda", "--suite", "merge", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "GPU merge summary: Fake GPU" in out
    (js,) = tmp_path.glob("bench_cuda_*_quick.json")
    rec = json.loads(js.read_text())
    assert rec["suites"] == ["merge"] and rec["rows"] == []
    assert [r["name"] for r in rec["merge"]] == [x.name for x in gm.plan(gm.Settings.for_mode(True))]
    assert rec["merge_meta"]["copy"]["tbps"] > 0
    assert rec["merge_summary"]["bandwidth"]["status"] in ("PASS", "FAIL", "NO ROWS")
    assert rec["merge_summary_text"][0].startswith("### GPU merge summary")
