// The public ops: validate every argument (src/core/validate.cpp), then dispatch by device.
#include "fastattn/ops.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>

#include "core/check.h"
#include "core/validate.h"
#include "cpu/cpu_backend.h"
#if defined(FASTATTN_WITH_CUDA)
#include "cuda/cuda_backend.h"
#endif

namespace fastattn {
namespace {

/// Throws unless the op runs on the CPU (the ops without CUDA kernels yet end here).
void require_cpu(const check::ArgChecker& c) {
  if (c.device().type == DeviceType::kCPU) return;
  throw NotSupportedError(std::string(c.op()) + ": tensors are on " + device_name(c.device()) +
                          ", but this build has no CUDA kernels for this op yet; pass CPU tensors");
}

constexpr std::initializer_list<DType> kFloatTypes = {DType::kFloat32, DType::kFloat16,
                                                      DType::kBFloat16};

/// v (S, H, D) float, s (S, H) float32 matching it.
void state_pair(check::ArgChecker& c, const TensorView& v, const std::string& vn,
                const TensorView& s, const std::string& sn, const TensorView* ref) {
  c.present(v, vn);
  c.on_device(v, vn);
  c.last_dim_contiguous(v, vn);
  c.present(s, sn);
  c.on_device(s, sn);
  if (ref) {
    c.same_dtype(v, vn, *ref, "v_a");
    c.shape_is(v, vn, {ref->size(0), ref->size(1), ref->size(2)}, "(S, H, D)");
  } else {
    c.dtype_in(v, vn, kFloatTypes);
    c.ndim_is(v, vn, 3, "(S, H, D)");
  }
  c.dtype_is(s, sn, DType::kFloat32);
  c.shape_is(s, sn, {v.size(0), v.size(1)}, "(S, H)");
}

/// The two-state merge of checked arguments on the op's device: (v_out, s_out) = merge((v_a, s_a),
/// (v_b, s_b)) for the rows `mask` selects (null: all); v_b's data null reads as zeros.
void run_merge_state(check::ArgChecker& c, const TensorView& v_a, const TensorView& s_a, const TensorView& v_b,
                     const TensorView& s_b, const TensorView& v_out, const TensorView& s_out,
                     const TensorView* mask, const ExecConfig& exec) {
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA)
    return cuda_cascade::merge_state(c, v_a, s_a, v_b, s_b, v_out, s_out, mask, exec);
#endif
  require_cpu(c);
  cpu::merge_state({&v_a, &s_a, &v_b, &s_b, &v_out, &s_out, mask}, exec.num_threads);
}

}  // namespace

void attention_forward(const AttentionArgs& args) {
  check::ArgChecker c("attention_forward");
  const auto d = core::validate(c, args);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA) return cuda_prefill::attention_forward(c, args, d);
#endif
  require_cpu(c);
  cpu::attention_forward(c, args, d);
}

void varlen_attention_forward(const VarlenAttentionArgs& args) {
  check::ArgChecker c("varlen_attention_forward");
  const auto d = core::validate(c, args);
  if (args.workspace) core::validate_workspace(c, *args.workspace);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA) return cuda_prefill::varlen_attention_forward(c, args, d);
#endif
  require_cpu(c);
  cpu::varlen_attention_forward(c, args, d);
}

std::size_t varlen_workspace_bytes(const VarlenAttentionArgs& args) {
  check::ArgChecker c("varlen_workspace_bytes");
  [[maybe_unused]] const auto d = core::validate(c, args);
  if (args.workspace) core::validate_workspace(c, *args.workspace);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA) return cuda_decode::varlen_workspace_bytes(c, args, d);
#endif
  require_cpu(c);
  return 0;  // the CPU backend's varlen path needs no scratch from the caller
}

void kvcache_attention_forward(const KVCacheArgs& args) {
  check::ArgChecker c("kvcache_attention_forward");
  const auto d = core::validate(c, args);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA) return cuda_decode::kvcache_attention_forward(c, args, d);
#endif
  require_cpu(c);
  cpu::kvcache_attention_forward(c, args, d);
}

std::size_t kvcache_workspace_bytes(const KVCacheArgs& args) {
  check::ArgChecker c("kvcache_workspace_bytes");
  const auto d = core::validate(c, args);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA) return cuda_decode::kvcache_workspace_bytes(c, args, d);
#endif
  require_cpu(c);
  return cpu::kvcache_workspace_bytes(c, args, d);
}

void shared_prefix_attention_forward(const SharedPrefixAttentionArgs& args) {
  check::ArgChecker c("shared_prefix_attention_forward");
  const auto d = core::validate(c, args);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA) return cuda_cascade::shared_prefix_attention_forward(c, args, d);
#endif
  require_cpu(c);
  cpu::shared_prefix_attention_forward(c, args, d);
}

std::size_t shared_prefix_workspace_bytes(const SharedPrefixAttentionArgs& args) {
  check::ArgChecker c("shared_prefix_workspace_bytes");
  const auto d = core::validate(c, args);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA) return cuda_cascade::shared_prefix_workspace_bytes(c, args, d);
#endif
  require_cpu(c);
  return cpu::shared_prefix_workspace_bytes(c, args, d);
}

void merge_state(const TensorView& v_a, const TensorView& s_a, const TensorView& v_b,
                 const TensorView& s_b, const TensorView& v_out, const TensorView& s_out,
                 const ExecConfig& exec) {
  check::ArgChecker c("merge_state");
  state_pair(c, v_a, "v_a", s_a, "s_a", nullptr);
  state_pair(c, v_b, "v_b", s_b, "s_b", &v_a);
  state_pair(c, v_out, "v_out", s_out, "s_out", &v_a);
  core::validate_exec(c, exec);
  run_merge_state(c, v_a, s_a, v_b, s_b, v_out, s_out, nullptr, exec);
}

void merge_state_in_place(const TensorView& v, const TensorView& s, const TensorView& v_other,
                          const TensorView& s_other, const std::optional<TensorView>& mask,
                          const ExecConfig& exec) {
  check::ArgChecker c("merge_state_in_place");
  state_pair(c, v, "v", s, "s", nullptr);
  // Messages name the in-place call's arguments; the shape reference is v.
  c.present(v_other, "v_other");
  c.on_device(v_other, "v_other");
  c.last_dim_contiguous(v_other, "v_other");
  c.same_dtype(v_other, "v_other", v, "v");
  c.shape_is(v_other, "v_other", {v.size(0), v.size(1), v.size(2)}, "(S, H, D) like v");
  c.present(s_other, "s_other");
  c.on_device(s_other, "s_other");
  c.dtype_is(s_other, "s_other", DType::kFloat32);
  c.shape_is(s_other, "s_other", {v.size(0), v.size(1)}, "(S, H)");
  if (mask) {
    c.present(*mask, "mask");
    c.on_device(*mask, "mask");
    c.dtype_in(*mask, "mask", {DType::kBool, DType::kUInt8});
    c.shape_is(*mask, "mask", {v.size(0)}, "(S)");
  }
  core::validate_exec(c, exec);
  run_merge_state(c, v, s, v_other, s_other, v, s, mask ? &*mask : nullptr, exec);
}

void merge_attention_sinks(const TensorView& v, const TensorView& s, const TensorView& sinks,
                           const ExecConfig& exec) {
  check::ArgChecker c("merge_attention_sinks");
  state_pair(c, v, "v", s, "s", nullptr);
  c.present(sinks, "sinks");
  c.on_device(sinks, "sinks");
  c.dtype_is(sinks, "sinks", DType::kFloat32);
  c.shape_is(sinks, "sinks", {v.size(1)}, "(H) like v's heads");
  core::validate_exec(c, exec);
  // The sinks' state: zero values (a view with no data, which the merge reads as zeros) and
  // LSE sinks[h] in every row (a stride-0 view of the sinks).
  TensorView zeros = v;
  zeros.data = nullptr;
  zeros.strides[0] = zeros.strides[1] = 0;
  TensorView sink_lse = s;
  sink_lse.data = sinks.data;
  sink_lse.strides[0] = 0;
  sink_lse.strides[1] = sinks.stride(0);
  run_merge_state(c, v, s, zeros, sink_lse, v, s, nullptr, exec);
}

void merge_states(const TensorView& v, const TensorView& s, const TensorView& v_out,
                  const TensorView& s_out, const ExecConfig& exec) {
  check::ArgChecker c("merge_states");
  c.present(v, "v");
  c.on_device(v, "v");
  c.last_dim_contiguous(v, "v");
  c.dtype_in(v, "v", kFloatTypes);
  c.ndim_is(v, "v", 4, "(S, N, H, D)");
  c.present(s, "s");
  c.on_device(s, "s");
  c.dtype_is(s, "s", DType::kFloat32);
  c.shape_is(s, "s", {v.size(0), v.size(1), v.size(2)}, "(S, N, H)");
  c.present(v_out, "v_out");
  c.on_device(v_out, "v_out");
  c.last_dim_contiguous(v_out, "v_out");
  c.same_dtype(v_out, "v_out", v, "v");
  c.shape_is(v_out, "v_out", {v.size(0), v.size(2), v.size(3)}, "(S, H, D)");
  c.present(s_out, "s_out");
  c.on_device(s_out, "s_out");
  c.dtype_is(s_out, "s_out", DType::kFloat32);
  c.shape_is(s_out, "s_out", {v.size(0), v.size(2)}, "(S, H)");
  core::validate_exec(c, exec);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA) return cuda_cascade::merge_states(c, v, s, v_out, s_out, exec);
#endif
  require_cpu(c);
  cpu::merge_states(v, s, v_out, s_out, exec.num_threads);
}

void csr_to_block_table(const TensorView& page_indptr, const TensorView& page_indices,
                        const TensorView& block_table, const ExecConfig& exec) {
  check::ArgChecker c("csr_to_block_table");
  for (auto [t, name, layout] : {std::tuple{&page_indptr, "page_indptr", "(B + 1)"},
                                 std::tuple{&page_indices, "page_indices", "(nnz)"}}) {
    c.present(*t, name);
    c.on_device(*t, name);
    c.dtype_is(*t, name, DType::kInt32);
    c.ndim_is(*t, name, 1, layout);
    c.contiguous(*t, name);
  }
  if (page_indptr.size(0) < 1) c.fail_value("page_indptr", "must have B + 1 >= 1 entries, got 0");
  c.present(block_table, "block_table");
  c.on_device(block_table, "block_table");
  c.dtype_is(block_table, "block_table", DType::kInt32);
  c.shape_is(block_table, "block_table", {page_indptr.size(0) - 1, -1}, "(B, W), B = len(page_indptr) - 1");
  c.last_dim_contiguous(block_table, "block_table");
  core::validate_exec(c, exec);
#if defined(FASTATTN_WITH_CUDA)
  if (c.device().type == DeviceType::kCUDA)
    return cuda_decode::csr_to_block_table(c, page_indptr, page_indices, block_table, exec);
#endif
  require_cpu(c);
  cpu::csr_to_block_table(c, page_indptr, page_indices, block_table);
}

void copy_host_to_device(const TensorView& src, const TensorView& dst, const ExecConfig& exec) {
  check::ArgChecker c("copy_host_to_device");
  c.present(src, "src");
  c.present(dst, "dst");
  if (src.device.type != DeviceType::kCPU)
    throw DeviceError(std::string(c.op()) + ": src must be on the host, got " + device_name(src.device));
  c.contiguous(src, "src");
  c.contiguous(dst, "dst");
  c.same_dtype(dst, "dst", src, "src");
  if (src.ndim != dst.ndim || !std::equal(src.shape.begin(), src.shape.begin() + src.ndim, dst.shape.begin()))
    c.fail_value("dst", "must have the shape of src (" + src.shape_string() + "), got " + dst.shape_string());
  core::validate_exec(c, exec);
  c.on_device(dst, "dst");
  const std::size_t bytes = static_cast<std::size_t>(src.numel()) * dtype_size(src.dtype);
  if (bytes == 0) return;
#if defined(FASTATTN_WITH_CUDA)
  if (dst.device.type == DeviceType::kCUDA) return cuda_memory::copy_host_to_device(c, src, dst, exec);
#endif
  require_cpu(c);
  std::memcpy(dst.data, src.data, bytes);
}

const char* version() { return FASTATTN_VERSION; }

bool backend_available(const Device& device) {
  if (device.type == DeviceType::kCPU) return true;
  // The CUDA backend serves prefill (attention_forward, varlen_attention_forward), KV-cache
  // decode (kvcache_attention_forward) and the merge ops (merge_state, merge_state_in_place,
  // merge_states) so far.
  return device_code_available(device);
}

bool device_code_available(const Device& device) {
  if (device.type == DeviceType::kCPU) return true;
#if defined(FASTATTN_WITH_CUDA)
  return cuda_backend_available(device.index);
#else
  return false;
#endif
}

}  // namespace fastattn
