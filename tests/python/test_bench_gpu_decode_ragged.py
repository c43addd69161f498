"""fastattn/bench/gpu_decode_ragged.py's parts that need no GPU: the length distributions, an input
set's page pool and block table (built on the CPU), its float32 reference against a naive float64
one, and the case summary and table on a hand-made record."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastattn.bench import gpu_decode_ragged as gr  # noqa: E402


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_draw_lengths():
    assert gr.draw_lengths(torch, "full", 5, 300, gen(0)) == [300] * 5
    lens = gr.draw_lengths(torch, "uniform", 400, 5000, gen(1))
    assert len(lens) == 400 and min(lens) >= gr.MIN_LEN and max(lens) <= 5000
    assert len(set(lens)) > 100  # drawn, not constant
    lens = gr.draw_lengths(torch, "long3", 10, 32768, gen(2))
    assert sorted(lens) == [gr.SHORT_LEN] * 7 + [32768] * 3
    # The long ones are placed at random: two seeds put them in different rows.
    a = gr.draw_lengths(torch, "long3", 64, 32768, gen(3))
    b = gr.draw_lengths(torch, "long3", 64, 32768, gen(4))
    assert a != b
    assert gr.draw_lengths(torch, "long1", 4, 512, gen(5)).count(512) == 4  # short capped at cap
    with pytest.raises(ValueError, match="unknown length distribution 'zipf'"):
        gr.draw_lengths(torch, "zipf", 4, 512, gen(0))
    with pytest.raises(ValueError, match="5 long sequences in a batch of 4"):
        gr.draw_lengths(torch, "long5", 4, 512, gen(0))


@pytest.mark.parametrize("kind", ["uniform", "long2"])
def test_ragged_set_pool_table_and_contiguous_copy(kind):
    cap = 256
    st = gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 6, cap, kind, gen(7), contiguous=True,
                      dtype=torch.float32)
    n_pages = st.k_pages.shape[0]
    assert st.k_pages.shape == (n_pages, gr.PAGE_SIZE, 2, gr.HEAD_DIM)
    assert n_pages == sum(math.ceil(n / gr.PAGE_SIZE) for n in st.lens)
    assert st.block_table.shape == (6, cap // gr.PAGE_SIZE) and st.block_table.dtype == torch.int32
    assert st.seqlens.tolist() == st.lens
    # Every page of the pool belongs to exactly one sequence; unused entries are page 0 (valid).
    used = torch.cat([st.block_table[b, :st.npages[b]] for b in range(6)])
    assert sorted(used.tolist()) == list(range(n_pages))
    for b in range(6):
        assert (st.block_table[b, st.npages[b]:] == 0).all()
    assert st.kv_bytes == sum(st.lens) * 2 * gr.HEAD_DIM * 4 * 2
    # The contiguous cache holds each sequence's keys in order, page by page; zero past the length.
    for b in range(6):
        n = st.lens[b]
        for t in range(0, n, 37):
            page = int(st.block_table[b, t // gr.PAGE_SIZE])
            assert torch.equal(st.k[b, t], st.k_pages[page, t % gr.PAGE_SIZE])
            assert torch.equal(st.v[b, t], st.v_pages[page, t % gr.PAGE_SIZE])
        assert not st.k[b, n:].any() and not st.v[b, n:].any()


def test_varlen_inputs():
    st = gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 5, 128, "uniform", gen(9), contiguous=False,
                      dtype=torch.float32)
    q, cu_q, seqused, table, max_k = st.varlen_inputs()
    assert q.shape == (5, 4, gr.HEAD_DIM) and torch.equal(q, st.q[:, 0])
    assert q.data_ptr() != st.q.data_ptr()  # its own copy
    assert cu_q.tolist() == list(range(6)) and cu_q.dtype == torch.int32
    assert seqused.tolist() == st.lens and torch.equal(table, st.block_table)
    assert max_k == max(st.lens)


def test_csr_inputs_match_the_block_table():
    st = gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 6, 256, "uniform", gen(13), contiguous=False,
                      dtype=torch.float32)
    st.lens[2], st.npages[2] = 0, 0  # a request without pages
    indptr, indices, last = st.csr_inputs()
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    assert indptr.tolist()[0] == 0 and indptr.tolist()[-1] == indices.numel() == sum(st.npages)
    for b in range(6):
        row = indices[indptr[b]:indptr[b + 1]]
        assert torch.equal(row, st.block_table[b, :st.npages[b]])
        if st.npages[b]:
            assert (st.npages[b] - 1) * gr.PAGE_SIZE + int(last[b]) == st.lens[b]
            assert 1 <= int(last[b]) <= gr.PAGE_SIZE
        else:
            assert int(last[b]) == 0


def test_planned_call_on_the_cpu():
    """The planned wrapper's call (fastattn_call(PLANNED)) writes the reference's answer into the
    poisoned (B, 1, Hq, D) buffer; on the CPU its plan keeps the backend's own (num_splits 0)."""
    import fastattn
    st = gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 5, 128, "long1", gen(17), contiguous=False,
                      dtype=torch.float32)
    out = torch.full((5, 1, 4, gr.HEAD_DIM), float("nan"))
    st.fastattn_call(fastattn, gr.PLANNED, 0, out)()
    np.testing.assert_allclose(out[:, 0].numpy(), st.reference(torch).numpy(), rtol=0, atol=1e-5)
    assert st._small[gr.PLANNED][1].num_splits == 0


def test_reference_against_naive_float64():
    st = gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 3, 64, "uniform", gen(11), contiguous=True,
                      dtype=torch.float32)
    st.lens[1] = 0  # an empty sequence: rows of zeros
    st.npages[1] = 0
    ref = st.reference(torch).numpy()
    q = st.q.double().numpy()
    k, v = st.k.double().numpy(), st.v.double().numpy()
    for b in range(3):
        for h in range(4):
            n = st.lens[b]
            if n == 0:
                assert not ref[b, h].any()
                continue
            kh = h // 2
            s = k[b, :n, kh] @ q[b, 0, h] / math.sqrt(gr.HEAD_DIM)
            p = np.exp(s - s.max())
            want = (p / p.sum()) @ v[b, :n, kh]
            np.testing.assert_allclose(ref[b, h], want, rtol=0, atol=1e-5)


def hand_record():
    impls = {gr.PAGED: {"s": 300e-6}, gr.VARLEN: {"s": 310e-6}, gr.CONTIG: {"s": 290e-6},
             gr.fixed_key(4): {"s": 110e-6}, gr.fixed_key(16): {"s": 95e-6},
             "flashinfer-decode": {"s": 106e-6}, "flashinfer-tc": {"s": 250e-6},
             "flashinfer-xqa": {"error": "refused"},
             gr.PLANNED: {"s": 90e-6, "num_splits": [None, None, 0],
                          "split_counts": [[10] + [1] * 31, [9] + [2] * 31, None]},
             gr.PLANNED_UNIFORM: {"s": 99e-6, "num_splits": [7, 8, 0]}, gr.PLANNED_ALWAYS: {"s": 90e-6},
             gr.seqplan_key(8): {"s": 92e-6}, gr.seqplan_key(32): {"s": 88e-6},
             gr.GRAPH: {"s": 81e-6, "split_counts": [[10] + [1] * 31] * 3, "plan_items": [65] * 3},
             gr.GRAPH_EAGER: {"s": 91.8e-6}, "flashinfer-decode-graph": {"s": 97.2e-6},
             "flashinfer-tc-graph": {"error": "refused"}}
    rec = {"name": "GQA8 b32 32k long1", "lengths": [[32768] + [1024] * 31] * 3,
           "copy_bound_s": 62e-6, "impls": impls}
    rec["summary"] = gr.case_summary(rec)
    return rec


def test_case_summary_and_table():
    rec = hand_record()
    sm = rec["summary"]
    assert sm["heuristic_s"] == 300e-6
    assert sm["heuristic_over_bound"] == pytest.approx(300 / 62)
    assert sm["best_fixed"] == gr.fixed_key(16) and sm["best_fixed_s"] == 95e-6
    assert sm["best_flashinfer"] == "flashinfer-decode"
    assert sm["flashinfer_over_heuristic"] == pytest.approx(106 / 300)
    assert sm["flashinfer_over_best_fixed"] == pytest.approx(106 / 95)
    assert sm["planned_s"] == 90e-6 and sm["planned_over_bound"] == pytest.approx(90 / 62)
    assert sm["flashinfer_over_planned"] == pytest.approx(106 / 90)
    assert sm["planned_over_best_fixed"] == pytest.approx(90 / 95)
    assert sm["planned_uniform_s"] == 99e-6 and sm["uniform_over_planned"] == pytest.approx(99 / 90)
    assert sm["planned_always_s"] == 90e-6 and sm["uniform_over_always"] == pytest.approx(99 / 90)
    assert sm["best_seqplan"] == gr.seqplan_key(32) and sm["best_seqplan_s"] == 88e-6
    assert sm["planned_over_best_seqplan"] == pytest.approx(90 / 88)
    assert sm["graph_s"] == 81e-6 and sm["graph_over_planned"] == pytest.approx(81 / 90)
    assert sm["graph_eager_s"] == 91.8e-6 and sm["graph_eager_over_planned"] == pytest.approx(91.8 / 90)
    assert sm["best_flashinfer_graph"] == "flashinfer-decode-graph"
    assert sm["flashinfer_graph_over_graph"] == pytest.approx(97.2 / 81)
    text = gr.format_table([rec], 4.27)
    assert "copy 4.27 TB/s" in text
    line = text.splitlines()[1]
    assert line.startswith("GQA8 b32 32k long1")
    assert "tokens    64512" in line and "bound    62.0" in line
    assert "paged16 300.0" in line and "varlen 310.0" in line and "paged16-s16 95.0" in line
    assert "fi-xqa n/a" in line
    assert "planned 90.0" in line
    assert "planned-uniform 99.0" in line and "seqplan-s32 88.0" in line
    assert ("FI/heur 0.353 FI/fixed 1.116 FI/plan 1.178 plan/fixed 0.947 uniform/plan 1.100 "
            "uniform/always 1.100 plan/best-seqplan 1.023 graph/plan 0.900 graph-eager/plan 1.020 "
            "FIgraph/graph 1.200 ['per-seq max 10, 41 parts', 'per-seq max 9, 71 parts', 0]") in line
    assert "graph 81.0" in line and "fi-decode-graph 97.2" in line and "fi-tc-graph n/a" in line
    assert "head_dim 128," in text  # a record without head_dim is from before --head-dim
    rec["head_dim"] = 256
    assert "head_dim 256," in gr.format_table([rec], 4.27)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_ragged_set_and_planned_call_at_other_head_dims(head_dim):
    """--head-dim: the pool, q and the reference at that head dim; the planned wrapper's call on
    the CPU matches the float32 reference there."""
    import fastattn
    st = gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 5, 128, "uniform", gen(23), contiguous=True,
                      dtype=torch.float32, head_dim=head_dim)
    assert st.q.shape == (5, 1, 4, head_dim)
    assert st.k_pages.shape[1:] == (gr.PAGE_SIZE, 2, head_dim) and st.k.shape == (5, 128, 2, head_dim)
    assert st.kv_bytes == sum(st.lens) * 2 * head_dim * 4 * 2
    out = torch.full((5, 1, 4, head_dim), float("nan"))
    st.fastattn_call(fastattn, gr.PLANNED, 0, out)()
    np.testing.assert_allclose(out[:, 0].numpy(), st.reference(torch).numpy(), rtol=0, atol=1e-5)


def test_head_dim_argument():
    with pytest.raises(SystemExit):
        gr.main(["--out", "/nonexistent", "--head-dim", "96"])


def test_chunk_counts():
    assert gr.chunk_counts([32768, 1024, 0, 3000], 8) == [8, 1, 1, 1]
    assert gr.chunk_counts([32768, 1024, 5000], 32) == [32, 1, 5]
    assert gr.chunk_counts([0, 0], 4) == [1, 1]
    assert gr.chunk_counts([10 ** 6, 1], 64) == [64, 1]


def test_seqplan_call_on_the_cpu():
    """A split plan's call (fastattn_call(SEQPLAN, S)) writes the reference's answer into the
    poisoned buffer (the CPU backend checks the plan and ignores it)."""
    import fastattn
    st = gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 5, 256, "long1", gen(19), contiguous=False,
                      dtype=torch.float32)
    out = torch.full((5, 1, 4, gr.HEAD_DIM), float("nan"))
    st.fastattn_call(fastattn, gr.SEQPLAN, 4, out)()
    np.testing.assert_allclose(out[:, 0].numpy(), st.reference(torch).numpy(), rtol=0, atol=1e-5)
    assert st._small[gr.seqplan_key(4) + ":splits"] == 0


def test_planned_wrappers_share_one_workspace():
    import fastattn
    sets = [gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 3, 128, "long1", gen(s), contiguous=False,
                         dtype=torch.float32) for s in (21, 22)]
    ws = [st.planned_wrapper(fastattn)._workspace_buffer for st in sets]
    assert ws[0] is ws[1] and ws[0].numel() == gr.WRAPPER_WORKSPACE_BYTES


def test_graph_wrapper_eager_call_on_the_cpu():
    """The graph arms' wrapper (use_cuda_graph=True over the set's own buffers): its eager call
    (GRAPH_EAGER) writes the reference's answer; its plan is padded to the fixed size."""
    import fastattn
    st = gr.RaggedSet(torch, torch.device("cpu"), 4, 2, 5, 256, "long1", gen(23), contiguous=False,
                      dtype=torch.float32)
    out = torch.full((5, 1, 4, gr.HEAD_DIM), float("nan"))
    st.fastattn_call(fastattn, gr.GRAPH_EAGER, 0, out)()
    np.testing.assert_allclose(out[:, 0].numpy(), st.reference(torch).numpy(), rtol=0, atol=1e-5)
    _, wrapper = st._small[gr.GRAPH]
    assert wrapper.is_cuda_graph_enabled and wrapper._workspace_buffer is gr.wrapper_workspace(torch, "cpu")
    plan = wrapper._graph.split_plan
    assert plan.shape[0] == 5 + 1 + fastattn.decode_graph_plan_items(5, 2, 1)
