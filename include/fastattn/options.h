// fastattn: options shared by every attention op, and the execution context.
#pragma once

#include <cstdint>
#include <optional>

#include "fastattn/tensor.h"

namespace fastattn {

/// Score modifiers common to every attention op. Scores are
///   s = q·k * softmax_scale;  if softcap > 0: s = softcap * tanh(s / softcap);
///   with ALiBi: s -= slope[h] * |qpos - kpos|
/// and query row i may see key j when  qpos - window_left <= kpos <= qpos + window_right,
/// where positions are aligned to the bottom-right corner (qpos = i + seqlen_k - seqlen_q, kpos = j).
struct AttentionOptions {
  /// Scale applied to q·k; unset means 1/sqrt(head_dim).
  std::optional<float> softmax_scale;
  /// Causal mask aligned bottom-right; sets window_right to 0 (FlashAttention's rule).
  bool causal = false;
  /// Sliding window (left, right); -1 means unbounded on that side.
  std::int64_t window_left = -1;
  std::int64_t window_right = -1;
  /// Tanh soft-capping of scores; 0 disables it.
  float softcap = 0.0f;
  /// ALiBi slopes, float32, shape (heads_q) or (batch, heads_q).
  std::optional<TensorView> alibi_slopes;
};

/// Where and how an op runs. The CUDA backend launches on `cuda_stream` (a cudaStream_t passed
/// as void*, nullptr = the default stream); the CPU backend uses `num_threads` threads
/// (0 = all available).
struct ExecConfig {
  void* cuda_stream = nullptr;
  int num_threads = 0;
};

}  // namespace fastattn
