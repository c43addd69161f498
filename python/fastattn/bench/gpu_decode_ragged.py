"""Decode on ragged batches: ``python -m fastattn.bench.gpu_decode_ragged --out DIR [--flashinfer]``.

The decode suite (gpu_decode.py) gives every sequence of a batch the same length. An engine's
decode batch does not: each sequence is at its own point. fastattn's split heuristic and form rules
(``num_splits=0``) see only the cache's capacity (block table width x page size, or the contiguous
cache's length), since reading ``cache_seqlens`` on the host would be a sync; each CTA then divides
its own sequence's keys by that plan's split count. FlashInfer's ``plan()`` reads the lengths on the
host and balances its work over the SMs. This suite measures what that difference costs.

Each case: bf16, head_dim 128 (``--head-dim`` 64 or 256 for the others), a batch whose lengths
are drawn from a named distribution (fresh for each of three input sets, rotated as in the decode
suite), a capacity ``cap`` (the longest possible length), a random pool of pages of 16 holding
exactly the sequences' pages. Distributions:

- ``full``:      every length ``cap`` (the decode suite's row, a control);
- ``uniform``:   lengths uniform in [64, cap];
- ``long<n>``:   n sequences at ``cap``, the rest at 1024.

Timed with the decode suite's timing (``time_interleaved``: interleaved rounds, the queue filled
ahead, a re-warm before each case): fastattn on the pool and (where ``contiguous``) on a (B, cap,
Hkv, D) cache with ``num_splits=0``, fastattn on the pool at fixed split counts (``FIXED_SPLITS``),
``flash_attn_varlen_func`` on the same pool (its decode path plans from ``max_seqlen_k``, the
longest length, not the capacity), fastattn's ``BatchDecodeWithPagedKVCacheWrapper`` on the same
pool (``fastattn-planned``: its ``plan()`` reads the lengths on the host, untimed, and picks the
split counts; ``run()`` is timed; every wrapper shares one workspace buffer, as an engine's one
wrapper does from step to step), ``flash_attn_with_kvcache`` with the one count for the batch that
``decode_num_splits_for_lengths`` picks (``fastattn-planned-uniform``, session 65's wrapper) and
with the per-sequence plan wherever the rule makes one, without the wrapper's margin over the
uniform count (``fastattn-planned-always``),
with ``--plan-splits`` split plans that cut every sequence into parts of ceil(longest / S) keys
(``fastattn-seqplan-s<S>``), the wrapper with ``use_cuda_graph=True`` (each input set its own
wrapper and page-list buffers): its ``run()`` captured in a CUDA graph and the replay timed
(``fastattn-graph``), and the same ``run()`` called directly (``fastattn-graph-eager``: the fixed
plan size, the padding and the CSR lists without the graph), and with ``--flashinfer`` FlashInfer's
three paged paths (gpu_decode_flashinfer.py) on the same pool and its two wrappers with
``use_cuda_graph=True``, captured and replayed the same way (``flashinfer-decode-graph``,
``flashinfer-tc-graph``). Every output is first checked, written into a
NaN-poisoned buffer, against a float32 reference computed per sequence. The copy bound of a case is its mean K/V bytes over the copy
bandwidth measured in the same run. The JSON goes to DIR/bench_cuda_<time>_decode_ragged.json.
"""
import argparse
import json
import math
import os
import sys
import time

from .gpu_prefill import _cycle, warm_gpu

PAGE_SIZE = 16
HEAD_DIM = 128      # the default; --head-dim 64 / 256 run the same cases at those head dims
HEAD_DIMS = (64, 128, 256)
SHORT_LEN = 1024    # the short sequences of the long<n> distributions
MIN_LEN = 64        # the shortest length of the uniform distribution
INPUT_SETS = 3
FIXED_SPLITS = (4, 16)  # --splits replaces them
MAX_ABS_ERR = 2e-2  # bf16 output against the float32 reference (values of order 0.1-1)

PAGED = "fastattn-paged16"
CONTIG = "fastattn-contiguous"
VARLEN = "fastattn-varlen"  # flash_attn_varlen_func's decode path on the same pool (max_seqlen_k planned)
PLANNED = "fastattn-planned"  # BatchDecodeWithPagedKVCacheWrapper: split counts planned from the lengths
# flash_attn_with_kvcache with one split count for the batch from the lengths
# (decode_num_splits_for_lengths: session 65's wrapper)
PLANNED_UNIFORM = "fastattn-planned-uniform"
SEQPLAN = "fastattn-seqplan"  # a split plan of chunk ceil(longest / S) (--plan-splits S)
# flash_attn_with_kvcache with the per-sequence plan wherever the rule makes one (no margin over the
# uniform count: decode_split_counts_for_lengths(min_gain=1)), else num_splits 0
PLANNED_ALWAYS = "fastattn-planned-always"
# BatchDecodeWithPagedKVCacheWrapper(use_cuda_graph=True): run() captured, the replay timed; and
# the same run() called directly
GRAPH = "fastattn-graph"
GRAPH_EAGER = "fastattn-graph-eager"
WRAPPER_WORKSPACE_BYTES = 256 << 20
# One workspace buffer for every planned wrapper, as an engine keeps one for its wrapper and plans it
# again each step. (A buffer per input set, each last written three calls before, made the wrapper's
# split states 1.5-2% slower to write and merge than the allocator's block that
# flash_attn_with_kvcache reuses call after call: bench/NOTES.md, session 66.)
_WRAPPER_WORKSPACE = {}


def wrapper_workspace(torch, device):
    key = str(device)
    if key not in _WRAPPER_WORKSPACE:
        _WRAPPER_WORKSPACE[key] = torch.empty(WRAPPER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _WRAPPER_WORKSPACE[key]

def graph_replay(torch, fn):
    """fn captured in a CUDA graph (after a warm-up call on a side stream, as torch advises):
    returns the graph's replay, a callable that runs fn's kernels again on the current stream and
    keeps fn (and so the tensors it holds) alive."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay():
        graph.replay()
    # The captured kernels read and write the tensors fn holds (its output among them): they must
    # live as long as the replay.
    replay.captured = fn
    return replay


# (name, heads_q, heads_kv, batch, cap, distribution, time a contiguous cache too)
CASES = (
    ("GQA8 b32 8k full", 32, 8, 32, 8192, "full", True),
    ("GQA8 b32 8k uniform", 32, 8, 32, 8192, "uniform", True),
    ("GQA8 b8 32k uniform", 32, 8, 8, 32768, "uniform", True),
    ("GQA8 b128 8k uniform", 32, 8, 128, 8192, "uniform", True),
    ("MHA b8 8k uniform", 32, 32, 8, 8192, "uniform", True),
    ("GQA8 b32 32k long1", 32, 8, 32, 32768, "long1", True),
    ("GQA8 b128 32k long4", 32, 8, 128, 32768, "long4", False),
    ("MHA b32 16k long1", 32, 32, 32, 16384, "long1", False),
    # Added in session 65, after the split rule's constants were set: its check cases.
    ("GQA8 b64 16k uniform", 32, 8, 64, 16384, "uniform", False),
    ("GQA8 b16 32k long2", 32, 8, 16, 32768, "long2", False),
    ("MHA b16 8k long1", 32, 32, 16, 8192, "long1", False),
    # Added in session 72, after the plan's tail weight by head dim was set: its check cases.
    ("GQA8 b64 32k long3", 32, 8, 64, 32768, "long3", False),
    ("MHA b8 16k long1", 32, 32, 8, 16384, "long1", False),
    ("GQA8 b8 32k long1", 32, 8, 8, 32768, "long1", False),
)


def seqplan_key(splits):
    return "%s-s%d" % (SEQPLAN, splits)


def chunk_counts(lens, splits):
    """Split counts of a chunk of ceil(longest / splits) keys: ceil(len / chunk), 1..64."""
    longest = max(lens) if lens else 0
    if longest == 0:
        return [1] * len(lens)
    chunk = -(-longest // splits)
    return [min(64, max(1, -(-n // chunk))) for n in lens]


def fixed_key(splits):
    return "%s-s%d" % (PAGED, splits)


def draw_lengths(torch, kind, batch, cap, gen):
    """batch lengths (python ints in [0, cap]) of distribution `kind` (module notes), drawn with
    the torch.Generator `gen`."""
    if kind == "full":
        return [cap] * batch
    if kind == "uniform":
        lo = min(MIN_LEN, cap)
        return [int(x) for x in torch.randint(lo, cap + 1, (batch,), generator=gen)]
    if kind.startswith("long") and kind[4:].isdigit():
        n = int(kind[4:])
        if not 0 <= n <= batch:
            raise ValueError("distribution %r: %d long sequences in a batch of %d" % (kind, n, batch))
        lens = [min(SHORT_LEN, cap)] * batch
        for i in torch.randperm(batch, generator=gen)[:n].tolist():
            lens[i] = cap
        return lens
    raise ValueError("unknown length distribution %r (full, uniform, long<n>)" % (kind,))


class RaggedSet:
    """One input set: q (B, 1, Hq, D); a pool k_pages / v_pages (num_pages, 16, Hkv, D) holding
    exactly the sequences' pages in a random order; block_table (B, cap / 16) int32 (a sequence's
    unused entries are 0, a valid page id that is never read); seqlens (B,) int32; and, when
    `contiguous`, k / v (B, cap, Hkv, D) with the same values (zero past each length). D is
    `head_dim`."""

    def __init__(self, torch, device, heads_q, heads_kv, batch, cap, kind, gen, contiguous,
                 dtype=None, head_dim=HEAD_DIM):
        dt = dtype or torch.bfloat16
        d = head_dim
        self._torch = torch
        self.lens = draw_lengths(torch, kind, batch, cap, gen)
        self.npages = [(n + PAGE_SIZE - 1) // PAGE_SIZE for n in self.lens]
        total = sum(self.npages)
        self.q = torch.randn(batch, 1, heads_q, d, device=device, dtype=dt)
        self.k_pages = torch.randn(total, PAGE_SIZE, heads_kv, d, device=device, dtype=dt)
        self.v_pages = torch.randn(total, PAGE_SIZE, heads_kv, d, device=device, dtype=dt)
        perm = torch.randperm(total, generator=gen).to(torch.int32)
        table = torch.zeros(batch, (cap + PAGE_SIZE - 1) // PAGE_SIZE, dtype=torch.int32)
        start = 0
        for b, n in enumerate(self.npages):
            table[b, :n] = perm[start:start + n]
            start += n
        self.block_table = table.to(device)
        self.seqlens = torch.tensor(self.lens, dtype=torch.int32, device=device)
        self.k = self.v = None
        if contiguous:
            self.k = torch.zeros(batch, cap, heads_kv, d, dtype=dt, device=device)
            self.v = torch.zeros_like(self.k)
            for b in range(batch):
                kb, vb = self.sequence_kv(b)
                self.k[b, :self.lens[b]] = kb
                self.v[b, :self.lens[b]] = vb
        self._small = {}

    @property
    def kv_bytes(self):
        """K and V bytes the call must read: every sequence's keys, all KV heads."""
        hkv, d = self.k_pages.shape[2], self.k_pages.shape[3]
        return sum(self.lens) * hkv * d * self.k_pages.element_size() * 2

    def sequence_kv(self, b):
        """Sequence b's keys and values (len_b, Hkv, D), gathered from its pages."""
        ids = self.block_table[b, :self.npages[b]].long()
        hkv, d = self.k_pages.shape[2], self.k_pages.shape[3]
        n = self.lens[b]
        return (self.k_pages[ids].reshape(-1, hkv, d)[:n], self.v_pages[ids].reshape(-1, hkv, d)[:n])

    def own_small_inputs(self, impl):
        """(q, seqlens, block_table) copies read by `impl` alone (as gpu_decode.InputSet's)."""
        if impl not in self._small:
            self._small[impl] = (self.q.clone(), self.seqlens.clone(), self.block_table.clone())
        return self._small[impl]

    def varlen_inputs(self):
        """(q (B, Hq, D), cu_seqlens_q (B + 1,) = 0..B, seqused_k, block_table, max_seqlen_k) for
        flash_attn_varlen_func's decode path: one query row per sequence, its own copies."""
        q, seqlens, table = self.own_small_inputs(VARLEN)
        batch = q.shape[0]
        cu_q = self._torch.arange(batch + 1, dtype=self._torch.int32, device=q.device)
        return q.reshape(batch, q.shape[2], q.shape[3]), cu_q, seqlens, table, max(self.lens)

    def csr_inputs(self):
        """(indptr (B + 1,), indices, last_page_len (B,)) int32 on the GPU: FlashInfer's page lists
        of the same pages as the block table (a request without keys owns no page)."""
        torch = self._torch
        dev = self.block_table.device
        indptr = [0]
        for n in self.npages:
            indptr.append(indptr[-1] + n)
        rows = [self.block_table[b, :n] for b, n in enumerate(self.npages)]
        indices = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int32, device=dev)
        last = [n - (p - 1) * PAGE_SIZE if p else 0 for n, p in zip(self.lens, self.npages)]
        return (torch.tensor(indptr, dtype=torch.int32, device=dev), indices.contiguous(),
                torch.tensor(last, dtype=torch.int32, device=dev))

    def planned_wrapper(self, fastattn):
        """fastattn.BatchDecodeWithPagedKVCacheWrapper planned on this set's page lists (the
        host read and the split choice happen here, outside the timing)."""
        torch = self._torch
        wrapper = fastattn.BatchDecodeWithPagedKVCacheWrapper(wrapper_workspace(torch, self.q.device), "NHD")
        hq, d = self.q.shape[2], self.q.shape[3]
        wrapper.plan(*self.csr_inputs(), hq, self.k_pages.shape[2], d, PAGE_SIZE,
                     q_data_type=self.q.dtype)
        return wrapper

    def graph_wrapper(self, fastattn):
        """(q (B, Hq, D), wrapper): a use_cuda_graph=True wrapper over this set's own page-list
        buffers (of this set's sizes), planned on its lists (untimed)."""
        if GRAPH not in self._small:
            torch = self._torch
            indptr, indices, last = self.csr_inputs()
            wrapper = fastattn.BatchDecodeWithPagedKVCacheWrapper(
                wrapper_workspace(torch, self.q.device), "NHD", use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.empty_like(indptr),
                paged_kv_indices_buffer=torch.empty(max(1, indices.numel()), dtype=torch.int32,
                                                    device=indices.device),
                paged_kv_last_page_len_buffer=torch.empty_like(last))
            b, _, hq, d = self.q.shape
            wrapper.plan(indptr, indices, last, hq, self.k_pages.shape[2], d, PAGE_SIZE,
                         q_data_type=self.q.dtype)
            self._small[GRAPH] = (self.q.clone().reshape(b, hq, d), wrapper)
        return self._small[GRAPH]

    def reference(self, torch):
        """float32 attention (B, Hq, D) of each sequence over its own keys, query head h reading KV
        head h // (Hq / Hkv), no mask; an empty sequence's rows are 0."""
        batch, _, hq, d = self.q.shape
        hkv = self.k_pages.shape[2]
        g = hq // hkv
        out = torch.zeros(batch, hq, d, dtype=torch.float32, device=self.q.device)
        for b in range(batch):
            if self.lens[b] == 0:
                continue
            k, v = (x.float().permute(1, 0, 2) for x in self.sequence_kv(b))  # (Hkv, len, D)
            q = self.q[b, 0].float().reshape(hkv, g, d)
            p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
            out[b] = (p @ v).reshape(hq, d)
        return out

    def split_plan(self, fastattn, counts):
        """The split plan of `counts` on the GPU (longest parts first)."""
        plan = fastattn.decode_split_plan(counts, self.lens)
        return self._torch.from_numpy(plan).to(self.q.device)

    def fastattn_call(self, fastattn, impl, num_splits, out):
        if impl in (PLANNED_UNIFORM, PLANNED_ALWAYS, SEQPLAN):  # own inputs; the plan made here, untimed
            key = impl if impl != SEQPLAN else seqplan_key(num_splits)
            q, seqlens, table = self.own_small_inputs(key)
            plan = None
            if impl == PLANNED_UNIFORM:
                splits = fastattn.decode_num_splits_for_lengths(
                    self.lens, self.k_pages.shape[2], torch_sm_count(self._torch))
            elif impl == PLANNED_ALWAYS:
                counts = fastattn.decode_split_counts_for_lengths(
                    self.lens, self.k_pages.shape[2], torch_sm_count(self._torch), min_gain=1.0,
                    head_dim=self.q.shape[3])
                splits = 0
                if counts is not None:
                    plan = self.split_plan(fastattn, counts)
            else:
                splits, plan = 0, self.split_plan(fastattn, chunk_counts(self.lens, num_splits))
            self._small[key + ":splits"] = splits
            return lambda: fastattn.flash_attn_with_kvcache(
                q, self.k_pages, self.v_pages, cache_seqlens=seqlens, block_table=table,
                num_splits=splits, out=out, split_plan=plan)
        if impl == PLANNED:  # out (B, 1, Hq, D) viewed as the wrapper's (B, Hq, D)
            if PLANNED not in self._small:
                q = self.q.clone()
                self._small[PLANNED] = (q.reshape(q.shape[0], q.shape[2], q.shape[3]),
                                        self.planned_wrapper(fastattn))
            q, wrapper = self._small[PLANNED]
            out3 = out.reshape(q.shape)
            cache = (self.k_pages, self.v_pages)
            return lambda: wrapper.run(q, cache, out=out3)
        if impl in (GRAPH, GRAPH_EAGER):  # one wrapper a set for both; out viewed as (B, Hq, D)
            q, wrapper = self.graph_wrapper(fastattn)
            out3 = out.reshape(q.shape)
            cache = (self.k_pages, self.v_pages)
            run = lambda: wrapper.run(q, cache, out=out3)  # noqa: E731
            return run if impl == GRAPH_EAGER else graph_replay(self._torch, run)
        if impl == VARLEN:  # out (B, 1, Hq, D) viewed as the packed (B, Hq, D)
            q, cu_q, seqlens, table, max_k = self.varlen_inputs()
            out3 = out.reshape(q.shape)
            return lambda: fastattn.flash_attn_varlen_func(
                q, self.k_pages, self.v_pages, cu_q, None, 1, max_k, block_table=table,
                seqused_k=seqlens, out=out3)
        q, seqlens, table = self.own_small_inputs(impl)
        if impl == CONTIG:
            return lambda: fastattn.flash_attn_with_kvcache(q, self.k, self.v, cache_seqlens=seqlens,
                                                            num_splits=num_splits, out=out)
        return lambda: fastattn.flash_attn_with_kvcache(q, self.k_pages, self.v_pages, cache_seqlens=seqlens,
                                                        block_table=table, num_splits=num_splits, out=out)


def torch_sm_count(torch):
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _checked(torch, call, out, ref, what):
    """Runs call (which writes into the NaN-poisoned `out`) and returns its max |error| against
    ref (B, Hq, D); a non-finite or larger-than-MAX_ABS_ERR output raises naming `what`."""
    out.fill_(float("nan"))
    call()
    torch.cuda.synchronize()
    got = out.reshape(ref.shape).float()
    err = float((got - ref).abs().max()) if bool(torch.isfinite(got).all()) else math.inf
    if not err <= MAX_ABS_ERR:
        raise AssertionError("%s: max |error| %.3g against the float32 reference (allowed %.3g)"
                             % (what, err, MAX_ABS_ERR))
    return err


def measure_case(torch, fastattn, case, settings, gen, sleeper, copy_tbps, peers=None,
                 fixed_splits=FIXED_SPLITS, plan_splits=(), head_dim=HEAD_DIM):
    """Builds one case's input sets (at `head_dim`), checks and times every implementation;
    returns its record."""
    from . import gpu_decode as gd
    name, hq, hkv, batch, cap, kind, contiguous = case
    dev = torch.device("cuda")
    sets = [RaggedSet(torch, dev, hq, hkv, batch, cap, kind, gen, contiguous, head_dim=head_dim)
            for _ in range(INPUT_SETS)]
    ref = sets[0].reference(torch)
    impls = {PAGED: 0, VARLEN: 0, PLANNED: 0, PLANNED_UNIFORM: 0, PLANNED_ALWAYS: 0, GRAPH: 0,
             GRAPH_EAGER: 0}
    if contiguous:
        impls[CONTIG] = 0
    for s in fixed_splits:
        impls[fixed_key(s)] = s
    for s in plan_splits:
        impls[seqplan_key(s)] = s
    info, fns = {}, {}
    for key, splits in impls.items():
        layout = (key if key in (CONTIG, VARLEN, PLANNED, PLANNED_UNIFORM, PLANNED_ALWAYS, GRAPH,
                                 GRAPH_EAGER)
                  else SEQPLAN if key.startswith(SEQPLAN) else PAGED)
        outs = [torch.empty(batch, 1, hq, head_dim, dtype=torch.bfloat16, device=dev) for _ in sets]
        err = _checked(torch, sets[0].fastattn_call(fastattn, layout, splits, outs[0]), outs[0], ref, key)
        info[key] = {"num_splits": splits, "max_abs_err": err}
        fns[key] = _cycle([st.fastattn_call(fastattn, layout, splits, o) for st, o in zip(sets, outs)])
    # The counts each set's plan() chose (sets differ in their lengths): a uniform count, or one
    # per sequence (the sequences at the longest length and the rest, as sets of counts).
    wrappers = [st._small[PLANNED][1] for st in sets]
    info[PLANNED]["num_splits"] = [w.num_splits for w in wrappers]
    info[PLANNED]["split_counts"] = [None if w.split_counts is None else [int(c) for c in w.split_counts]
                                     for w in wrappers]
    info[PLANNED_UNIFORM]["num_splits"] = [st._small[PLANNED_UNIFORM + ":splits"] for st in sets]
    graph_wrappers = [st._small[GRAPH][1] for st in sets]
    info[GRAPH]["split_counts"] = [[int(c) for c in w.split_counts] for w in graph_wrappers]
    info[GRAPH]["plan_items"] = [int(w._graph.split_plan.shape[0]) - batch - 1 for w in graph_wrappers]
    if peers is not None:
        from .gpu_decode_flashinfer import GRAPH_PEERS as FI_GRAPH_PEERS, PEERS as FI_PEERS
        per_set = []
        for st in sets:
            q, seqlens, table = st.own_small_inputs("flashinfer")
            calls = peers.calls(q, st.k_pages, st.v_pages, table, seqlens, cap)
            calls.update(peers.graph_calls(q, st.k_pages, st.v_pages, *st.csr_inputs(),
                                           capture=lambda fn: graph_replay(torch, fn)))
            per_set.append(calls)
        for peer in FI_PEERS + FI_GRAPH_PEERS:
            makes = [ps[peer][0] for ps in per_set]
            if any(m is None for m in makes):
                info[peer] = {"error": next(ps[peer][1] for ps in per_set if ps[peer][0] is None)}
                continue
            outs = [torch.empty(batch, hq, head_dim, dtype=torch.bfloat16, device=dev) for _ in sets]
            try:
                info[peer] = {"max_abs_err": _checked(torch, makes[0](outs[0]), outs[0], ref, peer)}
            except Exception as e:  # a peer that fails or is wrong is reported, not timed
                info[peer] = {"error": "%s: %s" % (type(e).__name__, str(e)[:300])}
                continue
            fns[peer] = _cycle([m(o) for m, o in zip(makes, outs)])
    gd.rewarm_gpu(torch)
    stats = gd.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
    kv_bytes = [st.kv_bytes for st in sets]
    mean_bytes = sum(kv_bytes) / len(kv_bytes)
    for key, st in stats.items():
        info[key].update(s=st["s"], runs=st["runs"], spread=st["spread"],
                         round_medians_s=st["round_medians_s"], tbps=mean_bytes / st["s"] / 1e12)
    rec = {"name": name, "head_dim": head_dim, "heads_q": hq, "heads_kv": hkv, "batch": batch, "cap": cap,
           "distribution": kind, "lengths": [st.lens for st in sets], "kv_bytes": kv_bytes,
           "copy_bound_s": mean_bytes / (copy_tbps * 1e12), "impls": info}
    rec["summary"] = case_summary(rec)
    del sets, fns
    return rec


def case_summary(rec):
    """The figures a case is read by (seconds): fastattn's heuristic (also over the copy bound),
    its best fixed split count and FlashInfer's fastest path, and the fastest FlashInfer time over
    the heuristic's and over the best fixed count's (> 1: fastattn faster); the planned wrapper,
    the one planned count (over the wrapper and over the plan everywhere: > 1, the plan faster)
    and the best split plan at fixed S."""
    im = rec["impls"]
    bound = rec["copy_bound_s"]

    def t(key):
        return im.get(key, {}).get("s")
    heur = t(PAGED)
    fixed = {k: t(k) for k in im if k.startswith(PAGED + "-s") and t(k)}
    best_fixed = min(fixed, key=fixed.get) if fixed else None
    # FlashInfer's eager calls (against fastattn's eager ones); its graph replays apart
    peers = {k: t(k) for k in im if k.startswith("flashinfer") and not k.endswith("-graph") and t(k)}
    best_peer = min(peers, key=peers.get) if peers else None
    planned = t(PLANNED)
    uniform = t(PLANNED_UNIFORM)
    always = t(PLANNED_ALWAYS)
    plans = {k: t(k) for k in im if k.startswith(SEQPLAN) and t(k)}
    best_plan = min(plans, key=plans.get) if plans else None
    graph, graph_eager = t(GRAPH), t(GRAPH_EAGER)
    fi_graphs = {k: t(k) for k in im if k.startswith("flashinfer") and k.endswith("-graph") and t(k)}
    best_fi_graph = min(fi_graphs, key=fi_graphs.get) if fi_graphs else None
    out = {"graph_s": graph, "graph_eager_s": graph_eager,
           "graph_over_planned": graph / planned if graph and planned else None,
           "graph_eager_over_planned": graph_eager / planned if graph_eager and planned else None,
           "best_flashinfer_graph": best_fi_graph,
           "flashinfer_graph_over_graph": (fi_graphs[best_fi_graph] / graph
                                           if best_fi_graph and graph else None),
           "planned_uniform_s": uniform,
           "uniform_over_planned": uniform / planned if uniform and planned else None,
           "planned_always_s": always,
           "uniform_over_always": uniform / always if uniform and always else None,
           "best_seqplan": best_plan, "best_seqplan_s": plans.get(best_plan),
           "planned_over_best_seqplan": planned / plans[best_plan] if best_plan and planned else None,
           "heuristic_s": heur, "heuristic_over_bound": heur / bound if heur else None,
           "best_fixed": best_fixed, "best_fixed_s": fixed.get(best_fixed),
           "planned_s": planned, "planned_over_bound": planned / bound if planned else None,
           "best_flashinfer": best_peer, "best_flashinfer_s": peers.get(best_peer)}
    if best_peer and heur:
        out["flashinfer_over_heuristic"] = peers[best_peer] / heur
    if best_peer and best_fixed:
        out["flashinfer_over_best_fixed"] = peers[best_peer] / fixed[best_fixed]
    if best_peer and planned:
        out["flashinfer_over_planned"] = peers[best_peer] / planned
    if best_fixed and planned:
        out["planned_over_best_fixed"] = planned / fixed[best_fixed]
    return out


def format_table(records, copy_tbps):
    """One line per case: mean tokens, copy bound, every implementation's µs, FlashInfer's fastest
    over fastattn's heuristic, its best fixed split count and its planned wrapper, the planned
    wrapper over the best fixed count, the graph-mode wrapper (replayed and eager) over the planned
    one, and FlashInfer's fastest graph replay over fastattn's (the split counts the planned wrapper
    chose per input set in brackets)."""
    dims = sorted({rec.get("head_dim", HEAD_DIM) for rec in records}) or [HEAD_DIM]
    lines = ["decode on ragged batches (bf16, head_dim %s, pages of 16 over a random pool; copy "
             "%.2f TB/s); µs, median; FI/heur, FI/fixed, FI/plan: FlashInfer's fastest time over "
             "fastattn's heuristic / best fixed split count / planned wrapper (> 1: fastattn "
             "faster); plan/fixed: the planned wrapper over the best fixed count"
             % ("/".join(str(d) for d in dims), copy_tbps)]
    for rec in records:
        toks = sum(sum(x) for x in rec["lengths"]) / max(1, len(rec["lengths"]))
        cells = []
        for key, v in rec["impls"].items():
            short = key.replace("fastattn-", "").replace("flashinfer-", "fi-")
            cells.append("%s %s" % (short, "%.1f" % (v["s"] * 1e6) if v.get("s") else "n/a"))
        sm = rec["summary"]

        def ratio(key):
            return "%.3f" % sm[key] if sm.get(key) else "-"
        im = rec["impls"].get(PLANNED, {})
        counts = im.get("split_counts") or [None] * len(im.get("num_splits", []))
        chosen = [c if sc is None else "per-seq max %d, %d parts" % (max(sc), sum(sc))
                  for c, sc in zip(im.get("num_splits", []), counts)]
        lines.append("%-22s tokens %8.0f bound %7.1f | %s | FI/heur %s FI/fixed %s FI/plan %s "
                     "plan/fixed %s uniform/plan %s uniform/always %s plan/best-seqplan %s "
                     "graph/plan %s graph-eager/plan %s FIgraph/graph %s %s" % (
                         rec["name"], toks, rec["copy_bound_s"] * 1e6, "  ".join(cells),
                         ratio("flashinfer_over_heuristic"), ratio("flashinfer_over_best_fixed"),
                         ratio("flashinfer_over_planned"), ratio("planned_over_best_fixed"),
                         ratio("uniform_over_planned"), ratio("uniform_over_always"),
                         ratio("planned_over_best_seqplan"), ratio("graph_over_planned"),
                         ratio("graph_eager_over_planned"), ratio("flashinfer_graph_over_graph"),
                         chosen))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastattn.bench.gpu_decode_ragged",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the JSON")
    ap.add_argument("--flashinfer", action="store_true", help="also time FlashInfer's paged decode")
    ap.add_argument("--seed", type=int, default=64, help="seed of the length draws and page orders")
    ap.add_argument("--splits", default=",".join(str(s) for s in FIXED_SPLITS),
                    help="fixed split counts to time, comma-separated (default %(default)s)")
    ap.add_argument("--plan-splits", default="",
                    help="split plans to time, comma-separated S: each sequence in parts of "
                         "ceil(longest / S) keys (default: none)")
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM, choices=HEAD_DIMS,
                    help="head dim of every case (default %(default)s)")
    ap.add_argument("--cases", default="",
                    help="only the cases whose name contains one of these comma-separated strings")
    args = ap.parse_args(argv)
    try:
        fixed_splits = tuple(int(x) for x in args.splits.split(",") if x.strip())
    except ValueError:
        ap.error("--splits must be comma-separated ints, got %r" % args.splits)
    if any(s < 1 for s in fixed_splits):
        ap.error("--splits must be >= 1, got %r" % args.splits)
    try:
        plan_splits = tuple(int(x) for x in args.plan_splits.split(",") if x.strip())
    except ValueError:
        ap.error("--plan-splits must be comma-separated ints, got %r" % args.plan_splits)
    if any(s < 1 or s > 64 for s in plan_splits):
        ap.error("--plan-splits must be in 1..64, got %r" % args.plan_splits)
    wanted = [x for x in args.cases.split(",") if x]
    cases = [c for c in CASES if not wanted or any(w in c[0] for w in wanted)]
    if not cases:
        ap.error("--cases %r matches no case" % args.cases)
    import torch

    import fastattn
    from . import gpu_decode as gd
    if not torch.cuda.is_available():
        ap.error("the ragged decode suite needs a CUDA GPU")
    peers = None
    if args.flashinfer:
        from . import gpu_decode_flashinfer as gfi
        peers = gfi.Peers(torch, gfi.load(), PAGE_SIZE)
    settings = gd.Settings()
    gen = torch.Generator().manual_seed(args.seed)
    warm_gpu(torch)
    sleeper = gd.make_sleeper(torch)
    copy = gd.measure_copy(torch, settings, sleeper)
    records = []
    for case in cases:
        records.append(measure_case(torch, fastattn, case, settings, gen, sleeper, copy["tbps"], peers,
                                    fixed_splits, plan_splits, head_dim=args.head_dim))
        torch.cuda.empty_cache()
    print(format_table(records, copy["tbps"]))
    prop = torch.cuda.get_device_properties(0)
    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": "python -m fastattn.bench.gpu_decode_ragged "
           + " ".join(argv if argv is not None else sys.argv[1:]),
           "gpu": prop.name, "gpu_uuid": str(getattr(prop, "uuid", "")), "copy_tbps": copy["tbps"],
           "flashinfer": getattr(peers, "version", None), "cases": records}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_cuda_%s_decode_ragged.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as f:
        json.dump(run, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
