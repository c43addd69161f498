"""fastattn/bench/decode_across_runs.py on hand-made suite JSON: the per-shape medians, ratio ranges
and behind counts worked out by hand, the rows a run skipped or could not time, and the command
line (its table file and its errors for files that are not decode suite output)."""

import json

import pytest

from fastattn.bench import decode_across_runs as dar


def record(hkv, b, L, contig, paged, cudnn, skipped=None):
    """A decode suite row as the JSON holds it, from times in µs (None: not timed)."""
    name = "bf16 d128 32/%d b%d L%d" % (hkv, b, L)
    rec = {"name": name, "dtype": "bf16", "head_dim": 128, "heads_q": 32, "heads_kv": hkv,
           "batch": b, "cache_len": L, "impls": {}, "ratios": {}}
    if skipped:
        rec["skipped"] = skipped
        return rec
    for key, t in (("fastattn-contiguous", contig), ("fastattn-paged16", paged), ("sdpa-cudnn", cudnn)):
        rec["impls"][key] = {"s": None if t is None else t * 1e-6}
    return rec


def write_run(tmp_path, name, rows, ahead=None, uuid="GPU-0000-1111-2222-3333-aabbccdd"):
    run = {"date": "2026-11-22T10:00:00", "machine": {"gpu_uuid": uuid}, "decode": rows,
           "decode_summary": {"copy_tbps": 4.25}}
    if ahead is not None:
        run["decode_summary"]["vs_cudnn"] = {"n": 4, "failing": [["x", 0.99]] * (4 - ahead)}
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return str(path)


def three_runs(tmp_path):
    # Shape X in all three runs; shape Y skipped in b and without a cuDNN time in c (one run left).
    a = write_run(tmp_path, "a.json", [record(8, 32, 8192, 100.0, 110.0, 105.0),
                                       record(32, 8, 1024, 36.0, 37.0, 36.5)], ahead=3)
    b = write_run(tmp_path, "b.json", [record(8, 32, 8192, 102.0, 101.0, 101.0),
                                       record(32, 8, 1024, None, None, None, skipped="too big")], ahead=2)
    c = write_run(tmp_path, "c.json", [record(8, 32, 8192, 98.0, 100.0, 103.0),
                                       record(32, 8, 1024, 36.0, 37.0, None)])
    return [a, b, c]


def test_across_runs_figures(tmp_path):
    runs = dar.load_runs(three_runs(tmp_path))
    rows = dar.across_runs(runs)
    assert [r["name"] for r in rows] == ["bf16 d128 32/8 b32 L8192", "bf16 d128 32/32 b8 L1024"]
    x, y = rows
    assert x["runs"] == 3
    assert x["us"] == pytest.approx({"fastattn-contiguous": 100.0, "fastattn-paged16": 101.0,
                                     "sdpa-cudnn": 103.0})
    # cuDNN / contiguous: 105/100, 101/102, 103/98; cuDNN / paged16: 105/110, 101/101, 103/100.
    assert x["vs_cudnn"]["contiguous"] == pytest.approx((101 / 102, 103 / 98))
    assert x["vs_cudnn"]["paged16"] == pytest.approx((105 / 110, 103 / 100))
    assert x["behind"] == {"contiguous": 1, "paged16": 2}  # a ratio of exactly 1.00 is not faster
    assert x["paged_over_contig"] == pytest.approx((101 / 102, 110 / 100))
    assert y["runs"] == 1
    assert y["vs_cudnn"]["paged16"] == pytest.approx((36.5 / 37.0, 36.5 / 37.0))
    assert y["behind"] == {"contiguous": 0, "paged16": 1}


def test_format_across_runs(tmp_path):
    runs = dar.load_runs(three_runs(tmp_path))
    text = dar.format_across_runs(dar.across_runs(runs), runs)
    assert ("| bf16 d128 32/8 b32 L8192 | 3 | 100.0 | 101.0 | 103.0 | 0.990-1.051x | 1 | 0.955-1.030x "
            "| 2 | 0.990-1.100x |") in text
    assert "| bf16 d128 32/32 b8 L1024 | 1 | 36.0 | 37.0 | 36.5 |" in text
    # Y is behind in its one run, but not "in every run" of three; X's paged16 / contiguous 1.10x.
    assert "3 runs; 3 of 4 figures behind in at least one run; behind in every run: none" in text
    assert "above 1.05x in some run: bf16 d128 32/8 b32 L8192." in text
    assert "- a.json: 2026-11-22T10:00:00, GPU aabbccdd, copy 4.25 TB/s, 3 of 4 figures faster" in text
    assert "- c.json: 2026-11-22T10:00:00, GPU aabbccdd, copy 4.25 TB/s, no check (2) in its summary" in text


def test_behind_in_every_run(tmp_path):
    paths = [write_run(tmp_path, "%d.json" % i, [record(32, 128, 1024, 470.0, 476.0 + i, 474.0)])
             for i in range(2)]
    runs = dar.load_runs(paths)
    text = dar.format_across_runs(dar.across_runs(runs), runs)
    assert "behind in every run: paged16 bf16 d128 32/32 b128 L1024;" in text


def test_cli(tmp_path, capsys):
    paths = three_runs(tmp_path)
    out = tmp_path / "table.md"
    assert dar.main(paths + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| shape | runs |")
    assert out.read_text() == printed


def test_cli_rejects_other_files(tmp_path, capsys):
    other = tmp_path / "prefill.json"
    other.write_text(json.dumps({"rows": [], "prefill": []}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert dar.main([str(other)]) == 2
    err = capsys.readouterr().err
    assert "prefill.json: expected the JSON of a decode suite run" in err and "keys prefill, rows" in err
    assert dar.main([str(broken)]) == 2
    assert "broken.json: not JSON" in capsys.readouterr().err
    assert dar.main([str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def with_flashinfer(rec, **peers_us):
    """rec with FlashInfer peers' times (µs; None: timed but failed) added."""
    for name, t in peers_us.items():
        rec["impls"]["flashinfer-" + name] = {"s": None if t is None else t * 1e-6}
    return rec


def test_flashinfer_across_runs(tmp_path):
    a = write_run(tmp_path, "a.json", [
        with_flashinfer(record(8, 32, 8192, 100.0, 110.0, 105.0), decode=165.0, tc=121.0, xqa=None),
        record(32, 8, 1024, 36.0, 37.0, 36.5)])
    b = write_run(tmp_path, "b.json", [
        with_flashinfer(record(8, 32, 8192, 102.0, 100.0, 101.0), decode=150.0, tc=100.0, xqa=120.0)])
    runs = dar.load_runs([a, b])
    rows = dar.flashinfer_across_runs(runs)
    assert [r["name"] for r in rows] == ["bf16 d128 32/8 b32 L8192"]  # the other has no peers
    (x,) = rows
    assert x["runs"] == 2
    assert x["us"] == pytest.approx({"flashinfer-decode": 157.5, "flashinfer-tc": 110.5,
                                     "flashinfer-xqa": 120.0})
    assert x["over_paged"]["flashinfer-decode"] == pytest.approx((1.5, 1.5))
    assert x["over_paged"]["flashinfer-tc"] == pytest.approx((1.0, 1.1))
    assert x["over_paged"]["flashinfer-xqa"] == pytest.approx((1.2, 1.2))
    assert x["not_slower"] == {"flashinfer-decode": 0, "flashinfer-tc": 1, "flashinfer-xqa": 0}
    assert x["peer_runs"] == {"flashinfer-decode": 2, "flashinfer-tc": 2, "flashinfer-xqa": 1}
    # cuDNN / fastest peer: 105 / 121 in a, 101 / 100 in b.
    assert x["cudnn_over_best"] == pytest.approx((105 / 121, 101 / 100))
    text = dar.format_flashinfer_across_runs(rows)
    assert "| bf16 d128 32/8 b32 L8192 | 2 | 157.5 | 1.500-1.500x | 0 of 2 |" in text
    assert "1.000-1.100x | 1 of 2 |" in text and "1.200-1.200x | 0 of 1 |" in text
    assert "0.868-1.010x |" in text
    assert dar.format_flashinfer_across_runs(dar.flashinfer_across_runs(dar.load_runs(
        three_runs(tmp_path)))) == ""


def test_cli_with_flashinfer(tmp_path, capsys):
    a = write_run(tmp_path, "a.json", [
        with_flashinfer(record(8, 32, 8192, 100.0, 110.0, 105.0), decode=165.0)])
    assert dar.main([a]) == 0
    out = capsys.readouterr().out
    assert "flashinfer-decode µs" in out and "cuDNN / fastest FlashInfer" in out
