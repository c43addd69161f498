"""fastattn/bench/gpu_decode_layouts.py's parts that need no GPU: an input set's two pools hold the
same pages, its float32 reference against a naive float64 one over the CSR lists, fastattn's
wrapper on the CPU in both layouts against that reference, and the table on a hand-made record."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402


def test_input_set_pools_reference_and_wrapper():
    hq, hkv, batch, cache_len, d = 4, 2, 3, 64, 32
    s = L.InputSet(torch, hq, hkv, batch, cache_len, torch.Generator().manual_seed(5), device="cpu",
                   head_dim=d)
    assert tuple(s.hnd.shape) == (batch * cache_len // L.PAGE, 2, hkv, L.PAGE, d)
    assert torch.equal(s.hnd.transpose(2, 3), s.nhd)
    assert s.indices.sort().values.tolist() == list(range(batch * cache_len // L.PAGE))
    ref = s.reference(torch)
    # Naive float64 attention over each request's pages in list order.
    kv = s.nhd.double().numpy()
    q = s.q.double().numpy()
    ip, ids = s.indptr.tolist(), s.indices.tolist()
    for b in range(batch):
        k = np.concatenate([kv[p, 0] for p in ids[ip[b]:ip[b + 1]]])  # (L, Hkv, D)
        v = np.concatenate([kv[p, 1] for p in ids[ip[b]:ip[b + 1]]])
        for h in range(hq):
            sc = k[:, h // (hq // hkv)] @ q[b, h] / np.sqrt(d)
            p = np.exp(sc - sc.max())
            want = (p / p.sum()) @ v[:, h // (hq // hkv)]
            assert np.abs(ref[b, h].double().numpy() - want).max() < 1e-4
    for layout in L.LAYOUTS:
        w = L.fastattn_wrapper(fastattn, np.empty(16, np.uint8), s, layout, hq, hkv)
        out = torch.full_like(s.q, float("nan"))
        w.run(s.q, s.pages(layout), out=out)
        assert float((out.float() - ref).abs().max()) <= L.TOLERANCE, layout


def test_table_and_brief():
    keys = ["fastattn-NHD", "flashinfer-decode-NHD", "flashinfer-tc-NHD", "fastattn-HND",
            "flashinfer-decode-HND", "flashinfer-tc-HND"]
    rec = {"heads_q": 32, "heads_kv": 8, "batch": 1, "cache_len": 1024,
           "impls": {k: {"s": 1e-5 * (1 + i / 10), "tbps": 1.0} for i, k in enumerate(keys)}}
    table = L.format_table([rec])
    row = table.splitlines()[2]
    assert row.startswith("| 32/8 b1 L1024 | 10.0 (1.00) |")
    # HND / NHD for fastattn, then FlashInfer's time over fastattn's in each layout.
    assert row.endswith("| 1.300 | 1.100 | 1.077 | 1.200 | 1.154 |")
    assert "fastattn-HND 13.0 us" in L.brief(rec)
