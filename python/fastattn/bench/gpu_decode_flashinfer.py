"""FlashInfer's paged decode as peers of the GPU decode suite (``--flashinfer``).

The decode issue asks fastattn to beat every peer we can measure, and FlashInfer is what engines
call for paged decode today. With ``--flashinfer`` (and ``flashinfer`` importable) the suite times
three of its paged decode paths on the very page pool fastattn's ``paged16`` variant reads: the
same k/v page tensors (num_pages, 16, Hkv, D) in FlashInfer's "NHD" layout, the same random block
table and lengths, the same q:

- ``flashinfer-decode``  BatchDecodeWithPagedKVCacheWrapper(use_tensor_cores=False): its CUDA-core
                         decode kernel, with the split-KV and merge its plan() chooses;
- ``flashinfer-tc``      the same wrapper with use_tensor_cores=True (its prefill kernel run for
                         decode, which FlashInfer advises for large GQA groups);
- ``flashinfer-xqa``     xqa_batch_decode_with_kv_cache: TensorRT-LLM's XQA decode kernel, what
                         FlashInfer's trtllm_batch_decode_with_kv_cache runs on sm_90.

The wrappers' plan() (host scheduling and a host-to-device copy) runs once per input set, outside
the timed region: an engine runs it once per decode step and then calls run() for every layer, so
run() is what a layer costs. XQA has no plan step. The timed calls write into outputs made
beforehand. The two wrappers share one 128 MiB workspace (FlashInfer's usual size; their calls
run one after another on one stream, and each writes its split-KV partials before it reads them).
XQA has its own, zeroed: its first 8 MiB are semaphores that must read zero when a call starts
(each call leaves them zero again), and a wrapper's partials written over them made XQA's split
calls wrong in session 48's first run.

FlashInfer is not a dependency of fastattn: without it (or without ``--flashinfer``) the suite is
what it was. Its kernels are compiled by FlashInfer's own JIT on first use, or loaded from its AOT
directory where prebuilt ones were placed (``bench/NOTES.md``, session 48, says how the device runs
got them).
"""
import math

PEERS = ("flashinfer-decode", "flashinfer-tc", "flashinfer-xqa")
# The two wrappers with use_cuda_graph=True, run() captured in a CUDA graph and replayed (the ragged
# suite's graph arms: Peers.graph_calls).
GRAPH_PEERS = ("flashinfer-decode-graph", "flashinfer-tc-graph")
WORKSPACE_BYTES = 128 << 20


def load():
    """The flashinfer module. Raises ImportError (with the reason) when it cannot be imported."""
    try:
        import flashinfer  # noqa: F401
        import flashinfer.decode  # noqa: F401
    except Exception as e:  # a broken install raises more than ImportError
        raise ImportError("flashinfer unavailable: %s: %s" % (type(e).__name__, str(e)[:200])) from e
    return flashinfer


def csr_from_block_table(torch, table, seqlens, page_size):
    """FlashInfer's page lists from a flash_attn block table.

    table (B, max_pages) int32 and seqlens (B,) int32 on one device ->
    (indptr (B + 1,) int32, indices (sum of pages,) int32, last_page_len (B,) int32): sequence b's
    pages are indices[indptr[b]:indptr[b + 1]], ceil(seqlens[b] / page_size) of them, and its last
    page holds last_page_len[b] tokens (page_size for a full page; 0 only for an empty sequence)."""
    lens = seqlens.to(torch.int64)
    pages = (lens + page_size - 1) // page_size
    indptr = torch.zeros(table.shape[0] + 1, dtype=torch.int64, device=table.device)
    indptr[1:] = torch.cumsum(pages, 0)
    cols = torch.arange(table.shape[1], device=table.device)
    indices = table[cols.unsqueeze(0) < pages.unsqueeze(1)]  # row-major: sequence by sequence
    last = torch.where(lens > 0, lens - (pages - 1) * page_size, torch.zeros_like(lens))
    return indptr.to(torch.int32), indices.to(torch.int32).contiguous(), last.to(torch.int32)


class Peers:
    """The FlashInfer peers of one suite run: the wrappers' workspace and XQA's, and per input set
    the callables (each returns its output (B, Hq, D), or writes into ``out`` when given one)."""

    def __init__(self, torch, flashinfer, page_size):
        self.torch, self.fi, self.page_size = torch, flashinfer, page_size
        self.workspace = None      # the wrappers', made on the first shape's device
        self.xqa_workspace = None  # XQA's own (semaphores first), zeroed
        self.version = getattr(flashinfer, "__version__", "?")

    def _make_workspaces(self, device):
        """The wrappers' workspace and XQA's, zeroed, on the first shape's device."""
        if self.workspace is None:
            self.workspace = self.torch.zeros(WORKSPACE_BYTES, dtype=self.torch.uint8, device=device)
            self.xqa_workspace = self.torch.zeros(WORKSPACE_BYTES, dtype=self.torch.uint8, device=device)

    def calls(self, q, k_pages, v_pages, table, seqlens, cache_len):
        """q (B, 1, Hq, D); k_pages, v_pages (num_pages, page_size, Hkv, D); table (B, pages)
        int32; seqlens (B,) int32 -> {peer name: (make_call, error)}: make_call(out=None) gives
        the callable, error is None or why that peer cannot run this shape (its set-up raised)."""
        torch, fi = self.torch, self.fi
        b, _, hq, d = q.shape
        hkv = k_pages.shape[2]
        q3 = q.reshape(b, hq, d)
        indptr, indices, last = csr_from_block_table(torch, table, seqlens, self.page_size)
        self._make_workspaces(q.device)
        out = {}
        for name, tensor_cores in (("flashinfer-decode", False), ("flashinfer-tc", True)):
            try:
                w = fi.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                          use_tensor_cores=tensor_cores)
                w.plan(indptr, indices, last, hq, hkv, d, self.page_size,
                       q_data_type=q.dtype, kv_data_type=k_pages.dtype,
                       sm_scale=1.0 / math.sqrt(d))
                out[name] = (self._wrapper_call(w, q3, k_pages, v_pages), None)
            except Exception as e:
                out[name] = (None, "%s: %s" % (type(e).__name__, str(e)[:300]))
        try:
            lens_u32 = seqlens.view(torch.uint32) if hasattr(torch, "uint32") else seqlens
            out["flashinfer-xqa"] = (self._xqa_call(q3, k_pages, v_pages, table, lens_u32,
                                                    cache_len, d), None)
        except Exception as e:
            out["flashinfer-xqa"] = (None, "%s: %s" % (type(e).__name__, str(e)[:300]))
        return out

    def graph_calls(self, q, k_pages, v_pages, indptr, indices, last, capture):
        """{peer name of GRAPH_PEERS: (make_call, error)}: the two wrappers with
        use_cuda_graph=True over page-list buffers of their own (an input set's), planned on the
        CSR lists indptr / indices / last_page_len; make_call(out) captures run() into a CUDA graph
        with capture(fn) and gives the replay."""
        torch, fi = self.torch, self.fi
        b, _, hq, d = q.shape
        q3 = q.reshape(b, hq, d)
        self._make_workspaces(q.device)
        out = {}
        for name, tensor_cores in zip(GRAPH_PEERS, (False, True)):
            try:
                w = fi.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
                    paged_kv_indptr_buffer=torch.empty_like(indptr),
                    paged_kv_indices_buffer=torch.empty(max(1, indices.numel()), dtype=torch.int32,
                                                        device=indices.device),
                    paged_kv_last_page_len_buffer=torch.empty_like(last))
                w.plan(indptr, indices, last, hq, k_pages.shape[2], d, self.page_size,
                       q_data_type=q.dtype, kv_data_type=k_pages.dtype,
                       sm_scale=1.0 / math.sqrt(d))
                run = self._wrapper_call(w, q3, k_pages, v_pages)
                out[name] = ((lambda r: lambda out=None: capture(r(out)))(run), None)
            except Exception as e:
                out[name] = (None, "%s: %s" % (type(e).__name__, str(e)[:300]))
        return out

    @staticmethod
    def _wrapper_call(w, q3, k_pages, v_pages):
        def make(out=None):
            kw = {} if out is None else {"out": out}
            return lambda: w.run(q3, (k_pages, v_pages), **kw)
        return make

    def _xqa_call(self, q3, k_pages, v_pages, table, lens_u32, cache_len, d):
        xqa = self.fi.decode.xqa_batch_decode_with_kv_cache

        def make(out=None):
            kw = {} if out is None else {"out": out}
            return lambda: xqa(q3, (k_pages, v_pages), self.xqa_workspace, table, lens_u32,
                               cache_len, bmm1_scale=1.0 / math.sqrt(d), bmm2_scale=1.0,
                               kv_layout="NHD", **kw)
        return make
