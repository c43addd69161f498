// Parameters of the CUDA prefill kernel: plain C++ (no CUDA types), filled on the host from the
// public args and passed by value to the kernel. Per-sequence lengths and page lists are read on
// the device from the index tensors, so a launch needs no host synchronisation.
#pragma once

#include <cstdint>

namespace fastattn::cuda_prefill {

/// Element type of q/k/v/out.
enum class Dtype : int { kFloat16, kBFloat16 };

/// Index-tensor contents are not validated on the host (that would need a synchronisation); the
/// kernels clamp lengths, offsets and page ids to the tensors they index, so inconsistent indices
/// give wrong rows (zeros where a page id is out of range) but never an out-of-bounds access.
struct PrefillParams {
  Dtype dtype = Dtype::kFloat16;
  int batch = 0, heads_q = 0, heads_kv = 0;
  int head_dim = 0;          ///< actual D (the kernel's compile-time dim may be larger)
  int max_seqlen_q = 0;      ///< query rows per sequence (batched) or their upper bound (varlen)
  int seqlen_k = 0;          ///< keys per sequence when no index tensor gives them

  // q (…, Hq, D), out likewise: element strides. Batched: row r of batch b at
  // b * q_batch_stride + r * q_row_stride; varlen: row cu_seqlens_q[b] + r (batch stride 0).
  const void* q = nullptr;
  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  void* out = nullptr;
  std::int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;  ///< optional; (B, Hq, Sq) or (Hq, total_q)
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;
  float* probs = nullptr;  ///< optional softmax matrix (B, Hq, max_seqlen_q, probs_cols), contiguous
  std::int64_t probs_cols = 0;

  // Keys/values. Dense: slot j of sequence b at k + b * k_batch_stride + (cu_seqlens_k[b] + j) *
  // k_row_stride. Paged: page = pages_b[j / page_size], k + page * k_page_stride +
  // (j % page_size) * k_row_stride. Add kv_head * k_head_stride.
  const void* k = nullptr;
  const void* v = nullptr;
  std::int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0, k_page_stride = 0;
  std::int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0, v_page_stride = 0;
  int page_size = 0;                       ///< 0: dense keys
  int page_shift = -1;                     ///< log2(page_size) when it is a power of two
  int num_pages = 0;                       ///< page ids outside [0, num_pages) read as zeros
  const std::int32_t* block_table = nullptr;  ///< (B, max_pages) rows
  std::int64_t block_table_stride = 0;
  const std::int32_t* page_indptr = nullptr;  ///< CSR alternative to block_table
  const std::int32_t* page_indices = nullptr;

  const std::int32_t* cu_seqlens_q = nullptr;  ///< varlen queries (B + 1)
  const std::int32_t* cu_seqlens_k = nullptr;  ///< packed keys (B + 1), or key lengths (paged)
  const std::int32_t* seqused_k = nullptr;     ///< (B) keys used, overrides the above
  /// (B) keys in each sequence's last page (paged only, used when neither of the above is
  /// given): len = (pages_b - 1) * page_size + last_page_len[b], pages_b from the CSR row or
  /// max_pages_per_seq with a block table.
  const std::int32_t* last_page_len = nullptr;
  int max_pages_per_seq = 0;
  std::int64_t total_q = 0;  ///< varlen: rows of q/out (also clears padding rows past cu_seqlens_q[B])
  std::int64_t total_k = 0;  ///< varlen with packed keys: rows of k/v
  std::int64_t num_page_indices = 0;  ///< CSR: entries of page_indices

  float scale = 1.0f;    ///< applied to q·k
  float softcap = 0.0f;  ///< 0: off
  int window_left = -1, window_right = -1;  ///< effective (causal folded in)
  const float* alibi = nullptr;  ///< slopes (Hq), batch b at alibi + b * alibi_batch_stride
  std::int64_t alibi_batch_stride = 0;

  // ---- shared-prefix (cascade) passes, src/cuda/cascade; defaults leave the kernels as they were
  /// Key splits (split-KV for prefill-shaped work; 1 = off). The grid's z then covers
  /// batch * key_splits: CTA z works on sequence z / key_splits, split z % key_splits, which owns
  /// keys [split * split_keys, (split + 1) * split_keys) (split_keys a multiple of 128, every
  /// kernel's key tile, so no tile straddles two splits) and writes its normalised partial output
  /// and natural-log LSE at out + split * out_split_stride and lse + split * lse_split_stride. A
  /// split that sees no key writes output 0 and LSE -inf, so the splits merge exactly.
  int key_splits = 1;
  int split_keys = 0;
  std::int64_t out_split_stride = 0, lse_split_stride = 0;
  /// (B) or null: shifts sequence b's query positions by q_pos_offset[b] (query row i sits at
  /// i + seqlen_k - seqlen_q + q_pos_offset[b], keys at 0 .. seqlen_k - 1), for the causal /
  /// window / ALiBi rules. The shared-prefix pass gives each request's suffix length, so its
  /// queries sit after prefix + suffix.
  const std::int32_t* q_pos_offset = nullptr;
  /// Host side only: run_prefill clears varlen rows past cu_seqlens_q[B] (output 0, LSE -inf).
  /// The shared-prefix passes turn it off (they manage those rows of their workspace).
  bool clear_padding_rows = true;

  /// Optional attention sinks (Hq) at stride sinks_stride: one more logit per head with a zero
  /// value row, merged into each row's output and LSE where the row is finished (the kernels'
  /// kWithSink instantiation), into the probs pass's normalisers and into varlen padding rows.
  /// Only with key_splits == 1 (a split's partial state has no sink).
  const float* sinks = nullptr;
  std::int64_t sinks_stride = 0;
};

/// Launches the prefill kernels on `stream` (cudaStream_t as void*): attention, then the
/// softmax-matrix pass when probs is set, and the clearing of varlen padding rows.
void run_prefill(const PrefillParams& p, void* stream);

/// Largest head_dim a compiled kernel serves (head_dim is rounded up to 32, 64, 96, 128, 192, 256).
constexpr int kMaxHeadDim = 256;

}  // namespace fastattn::cuda_prefill
