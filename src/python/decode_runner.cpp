// fastattn._C.PagedDecodeRunner: the decode wrapper's run() (python/fastattn/decode.py) in one call.
//
// plan() makes a runner from the arrays it built for the step (key lengths, block table or page
// lists, split plan) and the workspace, imported here once and kept alive. Every run() of the
// step (once a layer) then imports only what changes per call (q, the pages, out, lse), checks
// them against the plan and views them as the op takes them (fastattn::paged_decode_call_args,
// include/fastattn/decode_call.h), settles the workspace once per shape, and calls
// fastattn::kvcache_attention_forward. In Python those views and checks cost more than the op
// (bench/NOTES.md, session 71).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "arrays.h"
#include "fastattn/fastattn.h"
#include "framework_outputs.h"

namespace fastattn_binding {
namespace {

class PagedDecodeRunner {
 public:
  /// The plan's arrays (on the device of the workspace when on_gpu): seqlens (B) int32 key
  /// lengths; block_table (B, W) int32, or page_indptr (B + 1) and page_indices int32 (graph mode);
  /// split_plan or None. max_page_id: the largest page id plan() read (None: not read).
  /// workspace: the wrapper's float workspace buffer; graph: a captured run() must not allocate.
  /// kv_layout: "NHD" or "HND", the layout of run()'s pages. q_len: query rows per request
  /// (q_len_per_req); window_right: keys a row sees past its own position where q_len > 1 (0:
  /// causal within the request's rows; -1: all of them).
  PagedDecodeRunner(nb::handle seqlens, nb::handle block_table, nb::handle page_indptr,
                    nb::handle page_indices, nb::handle split_plan, int num_splits, std::int64_t batch,
                    std::int64_t num_qo_heads, std::int64_t num_kv_heads, std::int64_t head_dim,
                    std::int64_t page_size, std::string data_type, std::optional<std::int64_t> max_page_id,
                    bool on_gpu, nb::handle workspace, bool graph, const std::string& kv_layout,
                    std::int64_t q_len, std::int64_t window_right)
      : graph_(graph), window_right_(window_right) {
    // q_len and window_right are checked where they are used (paged_decode_call_args, the op's
    // options), and before this by the wrapper's plan().
    plan_.layout = fastattn::paged_kv_layout_from_name(kv_layout);
    plan_.seqlens = in_view(seqlens, "seqlens", keep_);
    plan_.block_table = opt_in(block_table, "block_table", keep_);
    plan_.page_indptr = opt_in(page_indptr, "page_indptr", keep_);
    plan_.page_indices = opt_in(page_indices, "page_indices", keep_);
    plan_.split_plan = opt_in(split_plan, "split_plan", keep_);
    plan_.num_splits = num_splits;
    plan_.batch = batch;
    plan_.q_len = q_len;
    plan_.num_qo_heads = num_qo_heads;
    plan_.num_kv_heads = num_kv_heads;
    plan_.head_dim = head_dim;
    plan_.page_size = page_size;
    plan_.data_type = std::move(data_type);
    plan_.max_page_id = max_page_id;
    plan_.on_gpu = on_gpu;
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

  /// Attention of q (B x N, Hq, D), N = q_len, over the planned pages into out (B x N, Hq, D) and
  /// lse (B x N, Hq) float32 or None. pages: the (P, 2, page_size, Hkv, D) cache with v_pages None, or the k pages
  /// (P, page_size, Hkv, D) with v_pages; in the HND layout (P, 2, Hkv, page_size, D) and
  /// (P, Hkv, page_size, D). workspace_alloc(nbytes): the caller's allocator, used
  /// when the wrapper's workspace is too small (never in graph mode: an error instead).
  /// sinks: None, or (Hq) float32 attention sinks, folded into out and lse by the attention
  /// (KVCacheArgs::sinks). out None, and lse None where return_lse: allocated by q's framework
  /// through its DLPack exchange table (framework_outputs.h), in q's dtype; stream_from_q: the
  /// stream from that table instead of cuda_stream. Returns out, or (out, lse) with return_lse.
  nb::object run(nb::handle q, nb::handle pages, nb::handle v_pages, nb::handle out, nb::handle lse,
                 std::int64_t window_left, std::optional<float> softmax_scale, float softcap,
                 std::uintptr_t cuda_stream, nb::handle workspace_alloc, nb::handle sinks, bool return_lse,
                 bool stream_from_q) {
    Keep keep;
    const TensorView tq = in_view(q, "q", keep);
    TensorView k_pages, v;
    if (v_pages.is_none()) {
      std::tie(k_pages, v) = fastattn::split_paged_kv_cache(in_view(pages, "paged_kv_cache", keep), plan_.layout,
                                                           "paged_kv_cache");
    } else {
      k_pages = in_view(pages, "paged_kv_cache[0]", keep);
      v = in_view(v_pages, "paged_kv_cache[1]", keep);
    }
    // The planned shapes: out (B x N, Hq, D) and lse (B x N, Hq).
    const std::int64_t out_shape[3] = {plan_.batch * plan_.q_len, plan_.num_qo_heads, plan_.head_dim};
    auto [out_array, out_v] = given_or_allocated(out, "out", q, tq, out_shape, 3, tq.dtype, keep);
    nb::object lse_array = nb::borrow(lse);
    std::optional<TensorView> lse_v;
    if (return_lse)
      std::tie(lse_array, lse_v) = given_or_allocated(lse, "lse", q, tq, out_shape, 2, fastattn::DType::kFloat32, keep);
    else
      lse_v = opt_out(lse, "lse", keep);
    fastattn::KVCacheArgs a = fastattn::paged_decode_call_args(plan_, tq, k_pages, v, out_v, lse_v);
    if (!sinks.is_none()) {
      a.sinks = in_view(sinks, "sinks", keep);
      fastattn::check_decode_sinks(plan_, tq, *a.sinks);
    }
    a.options.softmax_scale = softmax_scale;
    a.options.window_left = window_left;
    // One row sits at its request's last key: nothing lies to its right, and -1 keeps its kernels'.
    a.options.window_right = plan_.q_len > 1 ? window_right_ : -1;
    a.options.softcap = softcap;
    a.exec = make_exec(stream_from_q ? current_stream_of(q, tq) : cuda_stream, 0);

    nb::object allocated;  // keeps a workspace from the caller's allocator alive through the call
    if (plan_.on_gpu) {
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
    {
      nb::gil_scoped_release release;
      fastattn::kvcache_attention_forward(a);
    }
    if (return_lse) return nb::make_tuple(out_array, lse_array);
    return out_array;
  }

 private:
  struct WorkspaceKey {
    std::int64_t batch, heads_q, num_pages, window_left;
    bool operator==(const WorkspaceKey& o) const {
      return batch == o.batch && heads_q == o.heads_q && num_pages == o.num_pages &&
             window_left == o.window_left;
    }
  };

  Keep keep_;  // the plan's arrays and the workspace, alive as long as the runner
  fastattn::PagedDecodeCallPlan plan_;
  bool graph_;
  std::int64_t window_right_;
  std::optional<TensorView> workspace_;  // set where it is a contiguous uint8 array
  std::string workspace_dtype_;          // for the graph-mode error
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
                    std::optional<std::int64_t>, bool, nb::handle, bool, const std::string&, std::int64_t,
                    std::int64_t>(),
           nb::arg("seqlens"), nb::arg("block_table").none(), nb::arg("page_indptr").none(),
           nb::arg("page_indices").none(), nb::arg("split_plan").none(), nb::arg("num_splits"),
           nb::arg("batch"), nb::arg("num_qo_heads"), nb::arg("num_kv_heads"), nb::arg("head_dim"),
           nb::arg("page_size"), nb::arg("data_type"), nb::arg("max_page_id").none(), nb::arg("on_gpu"),
           nb::arg("workspace").none(), nb::arg("graph"), nb::arg("kv_layout") = "NHD", nb::arg("q_len") = 1,
           nb::arg("window_right") = -1)
      .def("run", &PagedDecodeRunner::run, nb::arg("q"), nb::arg("pages"), nb::arg("v_pages").none(),
           nb::arg("out").none(), nb::arg("lse").none(), nb::arg("window_left"),
           nb::arg("softmax_scale").none(), nb::arg("softcap"), nb::arg("cuda_stream"),
           nb::arg("workspace_alloc").none(), nb::arg("sinks").none() = nb::none(),
           nb::arg("return_lse") = false, nb::arg("stream_from_q") = false,
           "Attention of q (B x q_len, Hq, D) over the planned pages into out (and lse); positional. "
           "Returns out, or (out, lse) with return_lse; out (and lse) None: allocated by q's framework.");
}

}  // namespace fastattn_binding
