// fastattn._C.PagedDecodeRunner: the decode wrapper's run() (python/fastattn/decode.py) in one call.
//
// plan() makes a runner from the arrays it built for the step (key lengths, block table or page
// lists, split plan) and the workspace, imported here once and kept alive. Every run() of the
// step (once a layer) then imports only what changes per call (q, the pages, out, lse), checks
// them against the plan with the wrapper's error messages, makes the views the op takes from the
// strides (q and out (B, H, D) -> (B, 1, H, D), lse (B, H) -> (B, H, 1), a (P, 2, ...) cache ->
// its k and v pages) and calls fastattn::kvcache_attention_forward. This is the wrapper's contract
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
  /// The plan's arrays (on the device of the workspace when on_gpu): seqlens (B) int32 key
  /// lengths; block_table (B, W) int32, or page_indptr (B + 1) and page_indices int32 (graph mode);
  /// split_plan or None. max_page_id: the largest page id plan() read (None: not read).
  /// workspace: the wrapper's float workspace buffer; graph: a captured run() must not allocate.
  PagedDecodeRunner(nb::handle seqlens, nb::handle block_table, nb::handle page_indptr,
                    nb::handle page_indices, nb::handle split_plan, int num_splits, std::int64_t batch,
                    std::int64_t num_qo_heads, std::int64_t num_kv_heads, std::int64_t head_dim,
                    std::int64_t page_size, std::string data_type, std::optional<std::int64_t> max_page_id,
                    bool on_gpu, nb::handle workspace, bool graph)
      : num_splits_(num_splits),
        batch_(batch),
        heads_q_(num_qo_heads),
        heads_kv_(num_kv_heads),
        head_dim_(head_dim),
        page_size_(page_size),
        data_type_(std::move(data_type)),
        max_page_id_(max_page_id),
        on_gpu_(on_gpu),
        graph_(graph) {
    seqlens_ = in_view(seqlens, "seqlens", keep_);
    block_table_ = opt_in(block_table, "block_table", keep_);
    page_indptr_ = opt_in(page_indptr, "page_indptr", keep_);
    page_indices_ = opt_in(page_indices, "page_indices", keep_);
    split_plan_ = opt_in(split_plan, "split_plan", keep_);
    if (on_gpu) {
      // A buffer the op can use as scratch: a contiguous uint8 array (it is checked against q's
      // device at each call). Anything else is left to the caller's allocator.
      ArrayRW a;
      if (!nb::try_cast(workspace, a, /*convert=*/false)) {
        workspace_dtype_ = object_type_name(workspace);
      } else {
        workspace_bytes_ = std::int64_t(a.nbytes());
        workspace_dtype_ = dlpack_dtype_name(a.dtype());
        if (a.dtype() == nb::dtype<std::uint8_t>()) {
          workspace_ = make_tensor_view(a, "float_workspace_buffer");
          keep_.rw.push_back(a);
          if (!workspace_->is_contiguous()) workspace_.reset();
        }
      }
    }
  }

  /// Attention of q (B, Hq, D) over the planned pages into out (B, Hq, D) and lse (B, Hq) float32
  /// or None. pages: the (P, 2, page_size, Hkv, D) cache with v_pages None, or the k pages
  /// (P, page_size, Hkv, D) with v_pages. workspace_alloc(nbytes): the caller's allocator, used
  /// when the wrapper's workspace is too small (never in graph mode: an error instead).
  void run(nb::handle q, nb::handle pages, nb::handle v_pages, nb::handle out, nb::handle lse,
           std::int64_t window_left, std::optional<float> softmax_scale, float softcap,
           std::uintptr_t cuda_stream, nb::handle workspace_alloc) {
    Keep keep;
    fastattn::KVCacheArgs a;
    const TensorView tq = in_view(q, "q", keep);
    if (tq.ndim != 3 || tq.shape[0] != batch_ || tq.shape[1] != heads_q_ || tq.shape[2] != head_dim_)
      throw fastattn::ValueError("q must have shape (batch_size, num_qo_heads, head_dim) = " +
                                 tuple_string({batch_, heads_q_, head_dim_}) + " as planned, got " +
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
    if ((tq.device.type == fastattn::DeviceType::kCUDA) != on_gpu_)
      throw fastattn::ValueError(
          std::string("q must be on the device of the workspace buffer plan() used (") +
          (on_gpu_ ? "a CUDA device" : "the host") + "), got q on " +
          (on_gpu_ ? "the host" : "a CUDA device"));
    const TensorView tout = out_view(out, "out", keep);
    if (tout.ndim != 3 || tout.shape[0] != batch_ || tout.shape[1] != heads_q_ ||
        tout.shape[2] != head_dim_)
      throw fastattn::ValueError("out must have shape " + tuple_string({batch_, heads_q_, head_dim_}) +
                                 ", got " + tout.shape_string());
    if (!lse.is_none()) {
      const TensorView tlse = out_view(lse, "lse", keep);
      if (tlse.ndim != 2 || tlse.shape[0] != batch_ || tlse.shape[1] != heads_q_)
        throw fastattn::ValueError("lse must have shape " + tuple_string({batch_, heads_q_}) + ", got " +
                                   tlse.shape_string());
      a.lse = with_unit_dim(tlse, 2);
    }
    a.q = with_unit_dim(tq, 1);
    a.out = with_unit_dim(tout, 1);
    a.cache_seqlens = seqlens_;
    a.block_table = block_table_;
    a.page_indptr = page_indptr_;
    a.page_indices = page_indices_;
    a.split_plan = split_plan_;
    a.num_splits = num_splits_;
    a.options.softmax_scale = softmax_scale;
    a.options.window_left = window_left;
    a.options.softcap = softcap;
    a.exec = make_exec(cuda_stream, 0);

    nb::object allocated;  // keeps a workspace from the caller's allocator alive through the call
    if (on_gpu_) {
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
  struct WorkspaceKey {
    std::int64_t batch, heads_q, num_pages, window_left;
    bool operator==(const WorkspaceKey& o) const {
      return batch == o.batch && heads_q == o.heads_q && num_pages == o.num_pages &&
             window_left == o.window_left;
    }
  };

  void check_dtype(const TensorView& t, const std::string& what) const {
    if (data_type_ != fastattn::dtype_name(t.dtype))
      throw fastattn::TypeError(what + fastattn::dtype_name(t.dtype) + " but plan() was given " + data_type_);
  }

  void check_pages(const TensorView& t, const char* name) const {
    if (t.ndim != 4 || t.shape[1] != page_size_ || t.shape[2] != heads_kv_ || t.shape[3] != head_dim_)
      throw fastattn::ValueError(std::string("paged_kv_cache's ") + name +
                                 " pages must have shape (max_num_pages, page_size, num_kv_heads, "
                                 "head_dim) = (*, " + std::to_string(page_size_) + ", " +
                                 std::to_string(heads_kv_) + ", " + std::to_string(head_dim_) +
                                 ") as planned, got " + t.shape_string());
    if (max_page_id_ && t.shape[0] <= *max_page_id_)
      throw fastattn::ValueError("plan() was given page id " + std::to_string(*max_page_id_) +
                                 ", but paged_kv_cache holds " + std::to_string(t.shape[0]) + " pages");
    check_dtype(t, "paged_kv_cache has dtype ");
  }

  Keep keep_;  // the plan's arrays, alive as long as the runner
  TensorView seqlens_;
  std::optional<TensorView> block_table_, page_indptr_, page_indices_, split_plan_, workspace_;
  int num_splits_;
  std::int64_t batch_, heads_q_, heads_kv_, head_dim_, page_size_;
  std::string data_type_;
  std::optional<std::int64_t> max_page_id_;
  bool on_gpu_, graph_;
  std::string workspace_dtype_;    // for the graph-mode error
  std::int64_t workspace_bytes_ = 0;
  // The workspace settled for the last call's shapes: whether the buffer serves, and the need.
  std::optional<WorkspaceKey> workspace_key_;
  bool workspace_ok_ = false;
  std::size_t workspace_need_ = 0;
};

}  // namespace

void bind_decode_runner(nb::module_& m) {
  nb::class_<PagedDecodeRunner>(m, "PagedDecodeRunner",
                                "The decode wrapper's run() for one plan (python/fastattn/decode.py).")
      .def(nb::init<nb::handle, nb::handle, nb::handle, nb::handle, nb::handle, int, std::int64_t,
                    std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::string,
                    std::optional<std::int64_t>, bool, nb::handle, bool>(),
           nb::arg("seqlens"), nb::arg("block_table").none(), nb::arg("page_indptr").none(),
           nb::arg("page_indices").none(), nb::arg("split_plan").none(), nb::arg("num_splits"),
           nb::arg("batch"), nb::arg("num_qo_heads"), nb::arg("num_kv_heads"), nb::arg("head_dim"),
           nb::arg("page_size"), nb::arg("data_type"), nb::arg("max_page_id").none(), nb::arg("on_gpu"),
           nb::arg("workspace").none(), nb::arg("graph"))
      .def("run", &PagedDecodeRunner::run, nb::arg("q"), nb::arg("pages"), nb::arg("v_pages").none(),
           nb::arg("out"), nb::arg("lse").none(), nb::arg("window_left"),
           nb::arg("softmax_scale").none(), nb::arg("softcap"), nb::arg("cuda_stream"),
           nb::arg("workspace_alloc").none(),
           "Attention of q (B, Hq, D) over the planned pages into out (and lse); positional.");
}

}  // namespace fastattn_binding
