// The CPU backend's lowered form of every attention op: one list of sequences, each with its
// query rows, its keys (dense or paged) and the token positions masks and ALiBi are computed
// from. Batched, varlen, paged, KV-cache and both cascade passes all become an AttnProblem, so
// one tiled kernel serves them all.
#pragma once

#include <cstdint>
#include <vector>

#include "fastattn/tensor.h"

namespace fastattn::cpu {

/// Where key/value slot `s` of a sequence lives. Dense: k + seq.k_off + s * slot_stride.
/// Paged: page = seq.pages[s / page_size], k + page * page_stride + (s % page_size) * slot_stride.
/// Add head * head_stride for the kv head. All strides in elements.
struct KvAddressing {
  const void* k = nullptr;
  const void* v = nullptr;
  std::int64_t k_slot_stride = 0, v_slot_stride = 0;
  std::int64_t k_head_stride = 0, v_head_stride = 0;
  std::int64_t page_size = 0;  ///< 0 for a dense layout
  std::int64_t k_page_stride = 0, v_page_stride = 0;
};

/// One sequence, resolved once on the host.
struct SeqDesc {
  std::int64_t seqlen_q = 0;
  std::int64_t seqlen_k = 0;      ///< keys attended: slots slot0 .. slot0 + seqlen_k - 1
  std::int64_t q_off = 0;         ///< element offset of (row 0, head 0) in q
  std::int64_t out_off = 0;       ///< element offset of (row 0, head 0) in out
  std::int64_t lse_off = 0;       ///< element offset of (head 0, row 0) in lse
  std::int64_t probs_off = 0;     ///< element offset of (head 0, row 0, key 0) in probs
  std::int64_t ws_row0 = 0;       ///< first row of this sequence in the split-KV workspace
  std::int64_t k_off = 0, v_off = 0;  ///< dense keys: element offset of slot 0
  const std::int32_t* pages = nullptr;  ///< paged keys: this sequence's page ids
  std::int64_t slot0 = 0;         ///< first attended slot (cache_leftpad)
  std::int64_t q_pos0 = 0;        ///< token position of query row 0
  std::int64_t k_pos0 = 0;        ///< token position of key 0 (slot slot0)
  const float* alibi = nullptr;   ///< (Hq) slopes of this sequence, or none
};

struct AttnProblem {
  DType dtype = DType::kFloat32;      ///< q, k and v
  DType out_dtype = DType::kFloat32;  ///< out (float32 for cascade partials)
  std::int64_t heads_q = 0, heads_kv = 0, head_dim = 0;

  const void* q = nullptr;
  std::int64_t q_row_stride = 0, q_head_stride = 0;
  void* out = nullptr;
  std::int64_t out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;  ///< optional
  std::int64_t lse_row_stride = 0, lse_head_stride = 0;
  /// Optional attention sinks (heads_q) at stride sinks_stride: one more logit per head with a
  /// zero value row, folded into every finished row and into probs (the ops' `sinks`).
  const float* sinks = nullptr;
  std::int64_t sinks_stride = 0;
  float* probs = nullptr;  ///< optional softmax matrix, rows of stride probs_row_stride
  std::int64_t probs_head_stride = 0, probs_row_stride = 0;

  KvAddressing kv;

  float scale = 1.0f;    ///< applied to q·k
  float softcap = 0.0f;  ///< 0: off
  std::int64_t window_left = -1, window_right = -1;  ///< effective (causal folded in)

  int num_splits = 1;  ///< key splits per sequence, each a partial state merged at the end
  std::vector<SeqDesc> seqs;

  std::int64_t total_q_rows() const {
    std::int64_t n = 0;
    for (const auto& s : seqs) n += s.seqlen_q;
    return n;
  }
};

/// Float32 scratch the kernel needs for split-KV partials (0 when num_splits == 1).
std::size_t attention_workspace_bytes(const AttnProblem& p);

/// Runs the problem: writes out (and lse, probs when set) for every row of every sequence.
/// `workspace` must hold attention_workspace_bytes(p) bytes (nullptr when that is 0).
void run_attention(const AttnProblem& p, void* workspace, int num_threads);

/// Keys per split: ceil(seqlen_k / num_splits) rounded up to whole key tiles, so a sequence's
/// split boundaries depend only on its own length and num_splits.
std::int64_t split_chunk(std::int64_t seqlen_k, int num_splits);

}  // namespace fastattn::cpu
