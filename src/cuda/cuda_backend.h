// fastattn: the CUDA backend's entry points as seen from backend-neutral code (src/core).
//
// Only compiled and only called when the build has the CUDA backend (FASTATTN_WITH_CUDA is
// defined). Plain C++ types only: no CUDA header is needed to include this file, so src/core and
// the CPU backend stay host-compiler code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/check.h"
#include "core/validate.h"
#include "fastattn/ops.h"

namespace fastattn {

/// Number of CUDA devices this process can see; 0 when there is no driver or no GPU
/// (never throws: a machine without a GPU is a normal case).
int cuda_device_count();

/// True when `device` exists and this build carries kernel code that runs on it (sm_80 family or
/// sm_90a); false for a missing device, no driver, or an architecture the build was not compiled
/// for. Never throws.
bool cuda_backend_available(int device);

namespace cuda_prefill {
/// Prefill on the GPU (fp16/bf16): dense batched attention. Arguments already validated by core.
void attention_forward(check::ArgChecker& c, const AttentionArgs& args, const core::AttentionDims& d);
/// Prefill on the GPU: varlen with packed keys or a paged cache (block table or CSR). Calls with
/// one query per sequence over a paged cache go to cuda_decode::try_varlen_decode instead.
void varlen_attention_forward(check::ArgChecker& c, const VarlenAttentionArgs& args,
                              const core::VarlenDims& d);
}  // namespace cuda_prefill

namespace cuda_decode {
/// flash_attn_with_kvcache on the GPU (fp16/bf16): in-place append, rotary, split-KV attention.
/// The workspace (args.workspace) must hold kvcache_workspace_bytes() bytes when that is > 0.
void kvcache_attention_forward(check::ArgChecker& c, const KVCacheArgs& args, const core::KVCacheDims& d);
std::size_t kvcache_workspace_bytes(check::ArgChecker& c, const KVCacheArgs& args, const core::KVCacheDims& d);
/// Varlen decode (varlen_decode_host.cpp): varlen_attention_forward over paged keys with
/// max_seqlen_q == 1 and total_q == B (and no probs) runs the split-KV decode kernels. Returns
/// false, having done nothing, when the call does not take that route (the prefill kernel serves
/// it). Split-KV when args.workspace is given (at least varlen_workspace_bytes() bytes), else one
/// split.
bool try_varlen_decode(check::ArgChecker& c, const VarlenAttentionArgs& args, const core::VarlenDims& d);
/// Workspace bytes try_varlen_decode uses for split-KV (0 when the call is not routed to it).
std::size_t varlen_workspace_bytes(check::ArgChecker& c, const VarlenAttentionArgs& args, const core::VarlenDims& d);
/// csr_to_block_table on the GPU (page_table.cu): one launch on exec.cuda_stream, the lists not
/// read on the host.
void csr_to_block_table(check::ArgChecker& c, const TensorView& page_indptr, const TensorView& page_indices,
                        const TensorView& block_table, const ExecConfig& exec);
}  // namespace cuda_decode

namespace cuda_memory {
/// copy_host_to_device to a CUDA device (host_staging.cpp): src's bytes staged in pinned memory,
/// one cudaMemcpyAsync on exec.cuda_stream, no wait for the stream. Arguments already validated.
void copy_host_to_device(check::ArgChecker& c, const TensorView& src, const TensorView& dst,
                         const ExecConfig& exec);
}  // namespace cuda_memory

namespace cuda_cascade {
/// merge_state / merge_state_in_place on the GPU (float32 / float16 / bfloat16 values): v_* (S, H, D)
/// with any strides but a contiguous last dim, s_* (S, H) float32 with any strides; outputs may
/// alias inputs element for element; rows whose `mask` (S, bool / uint8) byte is 0 are left
/// untouched (mask null: every row). Arguments already validated (shapes, dtypes, one device);
/// runs on exec.cuda_stream with no allocation and no host synchronisation.
void merge_state(check::ArgChecker& c, const TensorView& v_a, const TensorView& s_a, const TensorView& v_b,
                 const TensorView& s_b, const TensorView& v_out, const TensorView& s_out,
                 const TensorView* mask, const ExecConfig& exec);
/// merge_states on the GPU: v (S, N, H, D), s (S, N, H) -> v_out (S, H, D), s_out (S, H); strides
/// as merge_state.
void merge_states(check::ArgChecker& c, const TensorView& v, const TensorView& s, const TensorView& v_out,
                  const TensorView& s_out, const ExecConfig& exec);
/// Shared-prefix (cascade) attention on the GPU (fp16 / bf16; shared_prefix_host.cpp): a prefix
/// pass over all requests' queries (the prefix read once, split over the GPU), a suffix pass over
/// each request's pages, and merge_states. Arguments validated by core; the workspace
/// (args.workspace) must hold shared_prefix_workspace_bytes() bytes when that is > 0. No host
/// synchronisation, no allocation.
void shared_prefix_attention_forward(check::ArgChecker& c, const SharedPrefixAttentionArgs& args,
                                     const core::SharedPrefixDims& d);
std::size_t shared_prefix_workspace_bytes(check::ArgChecker& c, const SharedPrefixAttentionArgs& args,
                                          const core::SharedPrefixDims& d);
}  // namespace cuda_cascade

}  // namespace fastattn
