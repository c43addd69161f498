// fastattn._C.PagedDecodeRunner: the decode wrapper's run() (python/fastattn/decode.py) in one call.
//
// The wrapper makes one runner (importing its workspace) and each plan() hands it the arrays it
// built for the step (key lengths and split plan, block table or page lists), imported once and
// kept alive. Every run() of the step (once a layer) then imports only what changes per call
// (q, the pages, out, lse), checks them against the plan with the wrapper's error messages, makes
// the views the op takes from the strides (q and out (B, H, D) -> (B, 1, H, D), lse (B, H) ->
// (B, H, 1), a (P, 2, ...) cache -> its k and v pages) and calls
// fastattn::kvcache_attention_forward. This is the wrapper's contract
// with its plan, moved out of Python because its views and checks cost more there than the op
// (bench/NOTES.md, session 71); the attention itself is validated by the op as for every call.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "arrays.h"
#include "fastattn/fastattn.h"

namespace fastattn_binding {
namespace {

/// The row-major shape written as Python writes a tuple: "(2, 8, 128)".
std::string tuple_string(std::initializer_list<std::int64_t> dims) {
  std::string s = "(";
  int i = 0;
  for (std::int64_t d : dims) s += (i++ ? ", " : "") + std::to_string(d);
  return s + (dims.size() == 1 ? ",)" : ")");
}

/// `t` with a dimension of size 1 inserted at `dim` (any stride serves a size-1 dimension).
TensorView with_unit_dim(TensorView t, int dim) {
  for (int i = t.ndim; i > dim; --i) {
    t.shape[std::size_t(i)] = t.shape[std::size_t(i - 1)];
    t.strides[std::size_t(i)] = t.strides[std::size_t(i - 1)];
  }
  t.shape[std::size_t(dim)] = 1;
  t.strides[std::size_t(dim)] = 1;
  ++t.ndim;
  return t;
}

/// Entry `index` of dimension `dim` of `t`, that dimension removed (as torch's t.select(dim, index)).
TensorView select(TensorView t, int dim, std::int64_t index) {
  t.data = static_cast<char*>(t.data) +
           index * t.strides[std::size_t(dim)] * std::int64_t(fastattn::dtype_size(t.dtype));
  for (int i = dim; i + 1 < t.ndim; ++i) {
    t.shape[std::size_t(i)] = t.shape[std::size_t(i + 1)];
    t.strides[std::size_t(i)] = t.strides[std::size_t(i + 1)];
  }
  --t.ndim;
  return t;
}

class PagedDecodeRunner {
 public:
  /// workspace: the wrapper's float workspace buffer (used where it is a contiguous uint8 array
  /// on q's device); graph: the wrapper captures run() in CUDA graphs, which must not allocate.
  PagedDecodeRunner(nb::handle workspace, bool graph) : graph_(graph) {
    ArrayRW a;
    if (nb::try_cast(workspace, a, /*convert=*/false)) {
      const TensorView t = make_tensor_view(a, "float_workspace_buffer");
      workspace_dtype_ = fastattn::dtype_name(t.dtype);
      workspace_bytes_ = t.numel() * std::int64_t(fastattn::dtype_size(t.dtype));
      if (t.dtype == fastattn::DType::kUInt8 && t.is_contiguous()) {
        workspace_ = t;
        workspace_array_ = a;
      }
    } else {
      workspace_dtype_ = object_type_name(workspace);
    }
  }

  /// One plan() of the wrapper. arrays: int32, the key lengths (entries 0..batch) then the split
  /// plan (entries batch..plan_end; none where plan_end == batch); block_table (B, W) int32, or
  /// page_indptr (B + 1) and page_indices int32 (graph mode). max_page_id: the largest page id
  /// plan() read (None: not read). The previous plan is kept if this one is refused.
  void set_plan(nb::handle arrays, std::int64_t batch, std::int64_t plan_end, nb::handle block_table,
                nb::handle page_indptr, nb::handle page_indices, int num_splits, std::int64_t num_qo_heads,
                std::int64_t num_kv_heads, std::int64_t head_dim, std::int64_t page_size, std::string data_type,
                std::optional<std::int64_t> max_page_id, bool on_gpu) {
    Plan p;
    const TensorView all = in_view(arrays, "arrays", p.keep);
    if (all.ndim != 1 || all.dtype != fastattn::DType::kInt32 || batch < 0 || plan_end < batch ||
        all.shape[0] < plan_end)
      throw fastattn::ValueError("PagedDecodeRunner.set_plan: arrays must be 1-D int32 of at least plan_end = " +
                                 std::to_string(plan_end) + " >= batch = " + std::to_string(batch) +
                                 " entries, got " + all.shape_string());
    p.seqlens = slice(all, 0, batch);
    if (plan_end > batch) p.split_plan = slice(all, batch, plan_end);
    p.block_table = opt_in(block_table, "block_table", p.keep);
    p.page_indptr = opt_in(page_indptr, "page_indptr", p.keep);
    p.page_indices = opt_in(page_indices, "page_indices", p.keep);
    p.num_splits = num_splits;
    p.batch = batch;
    p.heads_q = num_qo_heads;
    p.heads_kv = num_kv_heads;
    p.head_dim = head_dim;
    p.page_size = page_size;
    p.data_type = std::move(data_type);
    p.max_page_id = max_page_id;
    p.on_gpu = on_gpu;
    plan_ = std::move(p);
    workspace_key_.reset();  // the workspace a call needs depends on the plan's splits
  }

  /// Attention of q (B, Hq, D) over the planned pages into out (B, Hq, D) and lse (B, Hq) float32
  /// or None. pages: the (P, 2, page_size, Hkv, D) cache with v_pages None, or the k pages
  /// (P, page_size, Hkv, D) with v_pages. workspace_alloc(nbytes): the caller's allocator, used
  /// when the wrapper's workspace is too small (never in graph mode: an error instead).
  void run(nb::handle q, nb::handle pages, nb::handle v_pages, nb::handle out, nb::handle lse,
           std::int64_t window_left, std::optional<float> softmax_scale, float softcap,
           std::uintptr_t cuda_stream, nb::handle workspace_alloc) {
    if (!plan_) throw fastattn::Error("BatchDecodeWithPagedKVCacheWrapper.plan() must be called before run()");
    const Plan& pl = *plan_;
    Keep keep;
    fastattn::KVCacheArgs a;
    const TensorView tq = in_view(q, "q", keep);
    if (tq.ndim != 3 || tq.shape[0] != pl.batch || tq.shape[1] != pl.heads_q || tq.shape[2] != pl.head_dim)
      throw fastattn::ValueError("q must have shape (batch_size, num_qo_heads, head_dim) = " +
                                 tuple_string({pl.batch, pl.heads_q, pl.head_dim}) + " as planned, got " +
                                 tq.shape_string());
    check_dtype(tq, "q has dtype ");
    if (v_pages.is_none()) {
      const TensorView kv = in_view(pages, "paged_kv_cache", keep);
      if (kv.ndim != 5 || kv.shape[1] != 2)
        throw fastattn::ValueError("paged_kv_cache must have shape (max_num_pages, 2, page_size, "
                                   "num_kv_heads, head_dim) (NHD), got " + kv.shape_string());
      a.k_cache = select(kv, 1, 0);
      a.v_cache = select(kv, 1, 1);
    } else {
      a.k_cache = in_view(pages, "paged_kv_cache[0]", keep);
      a.v_cache = in_view(v_pages, "paged_kv_cache[1]", keep);
    }
    check_pages(a.k_cache, "k");
    check_pages(a.v_cache, "v");
    if ((tq.device.type == fastattn::DeviceType::kCUDA) != pl.on_gpu)
      throw fastattn::ValueError(
          std::string("q must be on the device of the workspace buffer plan() used (") +
          (pl.on_gpu ? "a CUDA device" : "the host") + "), got q on " +
          (pl.on_gpu ? "the host" : "a CUDA device"));
    const TensorView tout = out_view(out, "out", keep);
    if (tout.ndim != 3 || tout.shape[0] != pl.batch || tout.shape[1] != pl.heads_q ||
        tout.shape[2] != pl.head_dim)
      throw fastattn::ValueError("out must have shape " + tuple_string({pl.batch, pl.heads_q, pl.head_dim}) +
                                 ", got " + tout.shape_string());
    if (!lse.is_none()) {
      const TensorView tlse = out_view(lse, "lse", keep);
      if (tlse.ndim != 2 || tlse.shape[0] != pl.batch || tlse.shape[1] != pl.heads_q)
        throw fastattn::ValueError("lse must have shape " + tuple_string({pl.batch, pl.heads_q}) + ", got " +
                                   tlse.shape_string());
      a.lse = with_unit_dim(tlse, 2);
    }
    a.q = with_unit_dim(tq, 1);
    a.out = with_unit_dim(tout, 1);
    a.cache_seqlens = pl.seqlens;
    a.block_table = pl.block_table;
    a.page_indptr = pl.page_indptr;
    a.page_indices = pl.page_indices;
    a.split_plan = pl.split_plan;
    a.num_splits = pl.num_splits;
    a.options.softmax_scale = softmax_scale;
    a.options.window_left = window_left;
    a.options.softcap = softcap;
    a.exec = make_exec(cuda_stream, 0);

    nb::object allocated;  // keeps a workspace from the caller's allocator alive through the call
    if (pl.on_gpu) {
      const WorkspaceKey key{tq.shape[0], tq.shape[1], a.k_cache.shape[0], window_left};
      if (!workspace_key_ || !(*workspace_key_ == key)) {
        const std::size_t need = fastattn::kvcache_workspace_bytes(a);
        workspace_ok_ = workspace_ && workspace_->device == tq.device &&
                        std::int64_t(need) <= workspace_bytes_;
        workspace_need_ = need;
        workspace_key_ = key;
      }
      if (workspace_ok_) {
        a.workspace = workspace_;
      } else if (graph_) {
        // A captured call must not allocate: its partial states live in the buffer.
        throw fastattn::ValueError(
            "float_workspace_buffer must be a contiguous uint8 array on q's device of at least " +
            std::to_string(workspace_need_) + " bytes with use_cuda_graph=True, got " + workspace_dtype_ +
            " of " + std::to_string(workspace_bytes_) + " bytes");
      } else if (workspace_need_ > 0 && !workspace_alloc.is_none()) {
        allocated = workspace_alloc(workspace_need_);
        a.workspace = out_view(allocated, "workspace", keep);
      }
    }
    nb::gil_scoped_release release;
    fastattn::kvcache_attention_forward(a);
  }

 private:
  /// What one plan() fixed: its arrays (kept alive here) and the sizes run() checks against.
  struct Plan {
    Keep keep;
    TensorView seqlens;
    std::optional<TensorView> block_table, page_indptr, page_indices, split_plan;
    int num_splits = 0;
    std::int64_t batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0, page_size = 0;
    std::string data_type;
    std::optional<std::int64_t> max_page_id;
    bool on_gpu = false;
  };

  struct WorkspaceKey {
    std::int64_t batch, heads_q, num_pages, window_left;
    bool operator==(const WorkspaceKey& o) const {
      return batch == o.batch && heads_q == o.heads_q && num_pages == o.num_pages &&
             window_left == o.window_left;
    }
  };

  /// Entries [from, to) of the 1-D `t`.
  static TensorView slice(TensorView t, std::int64_t from, std::int64_t to) {
    t.data = static_cast<char*>(t.data) + from * t.strides[0] * std::int64_t(fastattn::dtype_size(t.dtype));
    t.shape[0] = to - from;
    return t;
  }

  void check_dtype(const TensorView& t, const std::string& what) const {
    if (plan_->data_type != fastattn::dtype_name(t.dtype))
      throw fastattn::TypeError(what + fastattn::dtype_name(t.dtype) + " but plan() was given " + plan_->data_type);
  }

  void check_pages(const TensorView& t, const char* name) const {
    const Plan& pl = *plan_;
    if (t.ndim != 4 || t.shape[1] != pl.page_size || t.shape[2] != pl.heads_kv || t.shape[3] != pl.head_dim)
      throw fastattn::ValueError(std::string("paged_kv_cache's ") + name +
                                 " pages must have shape (max_num_pages, page_size, num_kv_heads, "
                                 "head_dim) = (*, " + std::to_string(pl.page_size) + ", " +
                                 std::to_string(pl.heads_kv) + ", " + std::to_string(pl.head_dim) +
                                 ") as planned, got " + t.shape_string());
    if (pl.max_page_id && t.shape[0] <= *pl.max_page_id)
      throw fastattn::ValueError("plan() was given page id " + std::to_string(*pl.max_page_id) +
                                 ", but paged_kv_cache holds " + std::to_string(t.shape[0]) + " pages");
    check_dtype(t, "paged_kv_cache has dtype ");
  }

  bool graph_;
  std::optional<ArrayRW> workspace_array_;  // keeps the workspace alive as long as the runner
  std::optional<TensorView> workspace_;     // set where it is a contiguous uint8 array
  std::string workspace_dtype_;             // for the graph-mode error
  std::int64_t workspace_bytes_ = 0;
  std::optional<Plan> plan_;
  // The workspace settled for the last call's shapes under this plan: whether the buffer serves,
  // and the bytes the call needs.
  std::optional<WorkspaceKey> workspace_key_;
  bool workspace_ok_ = false;
  std::size_t workspace_need_ = 0;
};

}  // namespace

void bind_decode_runner(nb::module_& m) {
  nb::class_<PagedDecodeRunner>(m, "PagedDecodeRunner",
                                "The decode wrapper's run() (python/fastattn/decode.py): one a wrapper.")
      .def(nb::init<nb::handle, bool>(), nb::arg("workspace"), nb::arg("graph"))
      .def("set_plan", &PagedDecodeRunner::set_plan, nb::arg("arrays"), nb::arg("batch"), nb::arg("plan_end"),
           nb::arg("block_table").none(), nb::arg("page_indptr").none(), nb::arg("page_indices").none(),
           nb::arg("num_splits"), nb::arg("num_qo_heads"), nb::arg("num_kv_heads"), nb::arg("head_dim"),
           nb::arg("page_size"), nb::arg("data_type"), nb::arg("max_page_id").none(), nb::arg("on_gpu"),
           "One plan(): its arrays and sizes (the previous plan is kept if this one is refused).")
      .def("run", &PagedDecodeRunner::run, nb::arg("q"), nb::arg("pages"), nb::arg("v_pages").none(),
           nb::arg("out"), nb::arg("lse").none(), nb::arg("window_left"),
           nb::arg("softmax_scale").none(), nb::arg("softcap"), nb::arg("cuda_stream"),
           nb::arg("workspace_alloc").none(),
           "Attention of q (B, Hq, D) over the planned pages into out (and lse); positional.");
}

}  // namespace fastattn_binding
