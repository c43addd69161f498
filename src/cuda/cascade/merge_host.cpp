// Lowering of the merge ops (merge_state, merge_state_in_place, merge_states) to the CUDA merge
// kernels' parameters: the thread layout over head_dim, whether 16-byte vector access is allowed
// (alignment of every value tensor), element strides as 64-bit integers. Arguments arrive
// validated by src/core/ops.cpp (or by a CUDA caller building views over its workspace); nothing
// here reads device memory or synchronises, so the calls can be captured in a CUDA graph.
#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/cascade/merge_params.h"
#include "cuda/common/host_checks.h"
#include "cuda/cuda_backend.h"

namespace fastattn::cuda_cascade {
namespace {

using cuda_detail::as_int;

constexpr int kVecBytes = 16;  // one 16-byte load / store per chunk (LDG.128 / STG.128)

/// The device every tensor of the call is on (validated equal by the caller), checked to be one
/// this build has kernels for.
int device_of(const check::ArgChecker& c, const TensorView& t) {
  if (t.device.type != DeviceType::kCUDA || !cuda_backend_available(t.device.index))
    throw NotSupportedError(std::string(c.op()) + ": " + device_name(t.device) +
                            " is not a GPU this build has kernels for (sm_80 family or sm_90)");
  return t.device.index;
}

/// Threads over (S, H, D): 16-byte chunks of head_dim, `group` lanes per (row, head), up to 4
/// chunks per lane.
MergeLayout layout_for(const check::ArgChecker& c, DType dtype, std::int64_t rows, std::int64_t heads,
                       std::int64_t head_dim, const char* heads_arg, const char* dim_arg) {
  MergeLayout l;
  l.rows = rows;
  l.heads = as_int(c, heads, heads_arg, INT32_MAX);
  l.head_dim = as_int(c, head_dim, dim_arg, INT32_MAX);
  l.chunk_elems = kVecBytes / static_cast<int>(dtype_size(dtype));
  l.chunks = static_cast<int>((head_dim + l.chunk_elems - 1) / l.chunk_elems);
  // Up to 4 chunks per lane (the kernels' kLaneChunks: more bytes in flight per thread), so
  // group = the power of two >= min(ceil(chunks / 4), 32).
  const int lanes = (l.chunks + 3) / 4;
  l.group = 1;
  l.group_shift = 0;
  while (l.group < std::min(lanes, 32)) {
    l.group *= 2;
    ++l.group_shift;
  }
  l.iters = (l.chunks + l.group - 1) / l.group;
  return l;
}

/// merge_states of more than two states on a grid of under an eighth of a wave (4 CTAs of
/// kMergeThreads per SM): each lane's states are a chain of round trips, kStatesAhead at a time,
/// and too few lanes run to hide them (17 states of 32 rows x 32 heads took 8.7 us against 4.0 for
/// 5 states; bench/NOTES.md, session 69). There the lanes of a (row, head) widen to one chunk each
/// and load kDeepStatesAhead states at a time (MergeLayout::deep): 8.7 -> 6.4 us there, and 3.9 ->
/// 3.6 for 5 states; at 128 rows x 32 heads (a quarter wave) 5 states were 8% slower deep, hence
/// the eighth. The result is the same: every element is merged over the same states in order.
void deepen_small_merge(MergeLayout& l, int num_states, int device) {
  if (!l.vec || num_states <= 2 || l.chunks > 32) return;
  const std::int64_t wave = std::int64_t(cuda_detail::device_info(device).sm_count) * 4 * kMergeThreads;
  if (8 * l.rows * l.heads * l.group >= wave) return;
  while (l.group < l.chunks) {
    l.group *= 2;
    ++l.group_shift;
  }
  l.iters = (l.chunks + l.group - 1) / l.group;
  l.deep = true;
}

/// 16-byte vector access to `t` (its last dim contiguous): the data pointer 16-byte aligned and
/// the strides of every other dim (of size > 1) multiples of a chunk.
bool vector_aligned(const TensorView& t, int chunk_elems) {
  if (reinterpret_cast<std::uintptr_t>(t.data) % kVecBytes != 0) return false;
  for (int i = 0; i + 1 < t.ndim; ++i)
    if (t.size(i) > 1 && t.stride(i) % chunk_elems != 0) return false;
  return true;
}

/// merge_states of exactly two states as merge_state's parameters: state 0 is side a, state 1
/// side b (the same weights, MergeAccumulator's, so the same result up to rounding order).
MergeStateParams two_way_of(const MergeStatesParams& q) {
  MergeStateParams p;
  p.dtype = q.dtype;
  p.layout = q.layout;
  const std::size_t elem = dtype_size(q.dtype);
  p.v_a = q.v;
  p.v_b = static_cast<const char*>(q.v) + q.v_state * static_cast<std::int64_t>(elem);
  p.v_a_row = p.v_b_row = q.v_row;
  p.v_a_head = p.v_b_head = q.v_head;
  p.s_a = q.s;
  p.s_b = q.s + q.s_state;
  p.s_a_row = p.s_b_row = q.s_row;
  p.s_a_head = p.s_b_head = q.s_head;
  p.v_out = q.v_out;
  p.v_out_row = q.v_out_row;
  p.v_out_head = q.v_out_head;
  p.s_out = q.s_out;
  p.s_out_row = q.s_out_row;
  p.s_out_head = q.s_out_head;
  return p;
}

}  // namespace

void merge_state(check::ArgChecker& c, const TensorView& v_a, const TensorView& s_a, const TensorView& v_b,
                 const TensorView& s_b, const TensorView& v_out, const TensorView& s_out,
                 const TensorView* mask, const ExecConfig& exec) {
  const int device = device_of(c, v_out);
  MergeStateParams p;
  p.dtype = v_a.dtype;
  p.layout = layout_for(c, v_a.dtype, v_a.size(0), v_a.size(1), v_a.size(2), "heads (v dim 1)",
                        "head_dim (v dim 2)");
  MergeLayout& l = p.layout;
  l.vec = l.head_dim % l.chunk_elems == 0 && vector_aligned(v_a, l.chunk_elems) &&
          vector_aligned(v_b, l.chunk_elems) && vector_aligned(v_out, l.chunk_elems);
  p.v_a = v_a.data;
  p.v_a_row = v_a.stride(0);
  p.v_a_head = v_a.stride(1);
  p.v_b = v_b.data;
  p.v_b_row = v_b.stride(0);
  p.v_b_head = v_b.stride(1);
  p.v_out = v_out.data;
  p.v_out_row = v_out.stride(0);
  p.v_out_head = v_out.stride(1);
  p.s_a = static_cast<const float*>(s_a.data);
  p.s_a_row = s_a.stride(0);
  p.s_a_head = s_a.stride(1);
  p.s_b = static_cast<const float*>(s_b.data);
  p.s_b_row = s_b.stride(0);
  p.s_b_head = s_b.stride(1);
  p.s_out = static_cast<float*>(s_out.data);
  p.s_out_row = s_out.stride(0);
  p.s_out_head = s_out.stride(1);
  if (mask) {  // bool and uint8 are both one byte per row: non-zero selects the row
    p.mask = static_cast<const std::uint8_t*>(mask->data);
    p.mask_stride = mask->stride(0);
  }
  if (l.rows == 0 || l.heads == 0) return;
  cuda_detail::DeviceGuard guard(device);
  run_merge_state(p, exec.cuda_stream);
}

void merge_states(check::ArgChecker& c, const TensorView& v, const TensorView& s, const TensorView& v_out,
                  const TensorView& s_out, const ExecConfig& exec) {
  const int device = device_of(c, v_out);
  MergeStatesParams p;
  p.dtype = v.dtype;
  p.layout = layout_for(c, v.dtype, v.size(0), v.size(2), v.size(3), "heads (v dim 2)", "head_dim (v dim 3)");
  MergeLayout& l = p.layout;
  l.vec = l.head_dim % l.chunk_elems == 0 && vector_aligned(v, l.chunk_elems) &&
          vector_aligned(v_out, l.chunk_elems);
  p.num_states = as_int(c, v.size(1), "num_states (v dim 1)", INT32_MAX);
  p.v = v.data;
  p.v_row = v.stride(0);
  p.v_state = v.stride(1);
  p.v_head = v.stride(2);
  p.s = static_cast<const float*>(s.data);
  p.s_row = s.stride(0);
  p.s_state = s.stride(1);
  p.s_head = s.stride(2);
  p.v_out = v_out.data;
  p.v_out_row = v_out.stride(0);
  p.v_out_head = v_out.stride(1);
  p.s_out = static_cast<float*>(s_out.data);
  p.s_out_row = s_out.stride(0);
  p.s_out_head = s_out.stride(1);
  if (l.rows == 0 || l.heads == 0) return;
  deepen_small_merge(l, p.num_states, device);
  cuda_detail::DeviceGuard guard(device);
  if (p.num_states == 2) {
    // Two states are a two-way merge: the merge_state kernel, which holds twice the bytes in
    // flight per SM (4 CTAs at 64 registers; the running merge of N states needs 2 CTAs to avoid
    // spills) and ran merge_states N=2 fp16 at 70% of the copy bandwidth against 79%.
    run_merge_state(two_way_of(p), exec.cuda_stream);
    return;
  }
  run_merge_states(p, exec.cuda_stream);
}

}  // namespace fastattn::cuda_cascade
