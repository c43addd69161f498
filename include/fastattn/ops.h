// fastattn: the attention operations. Every op validates all of its arguments before any work
// (throwing ValueError / TypeError / DeviceError / NotSupportedError that name the argument) and
// writes only into the outputs it is given: the C++ API never allocates tensors for the caller.
//
// Shapes below use: B = batch, Sq/Sk = query/key length, Hq/Hkv = query/key-value heads
// (Hq % Hkv == 0; query head h reads kv head h / (Hq / Hkv)), D = head_dim (8..256, multiple of 8).
// LSE outputs are float32 natural-log log-sum-exp of the final scores; a row that sees no key
// gets output 0 and LSE -inf (with attention sinks, the sink's logit: see KVCacheArgs::sinks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "fastattn/options.h"
#include "fastattn/tensor.h"

namespace fastattn {

/// A caller's allocator for an op's scratch, for callers that would rather not size the workspace
/// themselves (a framework binding with a stream-ordered caching allocator). The op calls
/// allocate(context, nbytes) at most once per call: after all of its checks and its split
/// heuristic, only when the call needs scratch and no `workspace` was given. It returns a uint8,
/// contiguous, 16-byte-aligned view of at least nbytes on the op's device that stays valid for the
/// work the op enqueues on its stream (a stream-ordered allocator may take it back once the op has
/// returned), or nullopt when it has none: the op then raises the ValueError of a missing
/// workspace (even where it could run without scratch). It may throw, and the op then has written
/// nothing. Under CUDA graph capture it must allocate from the
/// graph's memory (as torch's caching allocator does).
struct WorkspaceAllocator {
  std::optional<TensorView> (*allocate)(void* context, std::size_t nbytes) = nullptr;
  void* context = nullptr;
  explicit operator bool() const { return allocate != nullptr; }
};

/// Dense batched attention.
struct AttentionArgs {
  TensorView q;    ///< (B, Sq, Hq, D) float32 / float16 / bfloat16
  TensorView k;    ///< (B, Sk, Hkv, D), same dtype as q
  TensorView v;    ///< (B, Sk, Hkv, D), same dtype as q
  TensorView out;  ///< (B, Sq, Hq, D), same dtype as q; fully written
  std::optional<TensorView> lse;    ///< (B, Hq, Sq) float32
  std::optional<TensorView> probs;  ///< (B, Hq, Sq, Sk) float32 softmax matrix (testing aid)
  /// (Hq) float32 attention sinks, any stride, or none: as KVCacheArgs::sinks. probs then holds
  /// the keys' share of each softmax, which sums to less than 1.
  std::optional<TensorView> sinks;
  AttentionOptions options;
  ExecConfig exec;
};
void attention_forward(const AttentionArgs& args);

/// Keys and values in a paged cache. Pages are (page_size, Hkv, D) slabs of k_pages / v_pages;
/// sequence b's key j lives in page pages_b[j / page_size], slot j % page_size, where pages_b
/// is either row b of `block_table` or page_indices[page_indptr[b] : page_indptr[b+1]].
struct PagedKV {
  TensorView k_pages;  ///< (num_pages, page_size, Hkv, D)
  TensorView v_pages;  ///< (num_pages, page_size, Hkv, D)
  std::optional<TensorView> block_table;   ///< (B, max_pages_per_seq) int32
  std::optional<TensorView> page_indptr;   ///< (B + 1) int32, CSR row pointers
  std::optional<TensorView> page_indices;  ///< (page_indptr[B]) int32, CSR page ids
  /// (B) int32: keys in each sequence's last page (1..page_size), FlashInfer's way of giving
  /// lengths: len_b = (num_pages_b - 1) * page_size + last_page_len[b], 0 when it has no page.
  std::optional<TensorView> last_page_len;
};

/// Variable-length (packed) attention. Sequence b's queries are rows
/// cu_seqlens_q[b] .. cu_seqlens_q[b+1] of q. Keys are either packed rows
/// cu_seqlens_k[b] .. cu_seqlens_k[b+1] of k / v, or the paged cache `paged`, whose per-sequence
/// lengths come from `seqused_k`, else from cu_seqlens_k differences, else paged.last_page_len.
struct VarlenAttentionArgs {
  TensorView q;             ///< (total_q, Hq, D)
  TensorView cu_seqlens_q;  ///< (B + 1) int32, cu_seqlens_q[0] == 0, non-decreasing
  std::int64_t max_seqlen_q = 0;  ///< upper bound on every query length
  std::optional<TensorView> k;    ///< (total_k, Hkv, D) packed keys (absent when paged)
  std::optional<TensorView> v;    ///< (total_k, Hkv, D) packed values (absent when paged)
  std::optional<TensorView> cu_seqlens_k;  ///< (B + 1) int32
  std::optional<PagedKV> paged;            ///< paged keys/values instead of k / v
  std::optional<TensorView> seqused_k;     ///< (B) int32: keys used by each sequence
  std::int64_t max_seqlen_k = 0;           ///< upper bound on every key length
  TensorView out;                   ///< (total_q, Hq, D)
  std::optional<TensorView> lse;    ///< (Hq, total_q) float32, any strides
  std::optional<TensorView> probs;  ///< (B, Hq, max_seqlen_q, max_seqlen_k) float32, zero-padded
  /// (Hq) float32 attention sinks, any stride, or none: as KVCacheArgs::sinks. Rows past
  /// cu_seqlens_q[B] see no key, so with sinks they get output 0 and LSE sinks[h].
  std::optional<TensorView> sinks;
  /// Scratch for split-KV partial results (uint8, at least varlen_workspace_bytes(args)). Used on
  /// CUDA by decode-shaped calls (paged keys, max_seqlen_q == 1, total_q == B, no probs), which
  /// run the split-KV decode kernels; without it (and without workspace_allocator) they run with
  /// one split. Ignored otherwise.
  std::optional<TensorView> workspace;
  /// CUDA: asked for the scratch of a decode-shaped call when `workspace` is absent (see
  /// WorkspaceAllocator), so the call splits as it would with one. Ignored otherwise.
  WorkspaceAllocator workspace_allocator;
  AttentionOptions options;
  ExecConfig exec;
};
void varlen_attention_forward(const VarlenAttentionArgs& args);
/// Bytes of workspace varlen_attention_forward uses for `args` (0 when it uses none: the CPU,
/// and every call on CUDA that is not decode-shaped). Depends on shapes only, not on index
/// contents, so a workspace sized once serves every call of the same shapes.
std::size_t varlen_workspace_bytes(const VarlenAttentionArgs& args);

/// Attention over a KV cache with an optional in-place append (FlashAttention's
/// flash_attn_with_kvcache). For sequence b (cache row c = cache_batch_idx[b] or b):
///  1. k_new / v_new rows t = 0..Snew-1 are written (rotary applied to k) into cache slots
///     cache_seqlens[b] + t of cache row c. Nothing else in the cache is written.
///  2. q attends over slots [cache_leftpad[b], cache_seqlens[b] + Snew); token positions count
///     from cache_leftpad[b].
/// Rotary (needs k_new): k row t is rotated at position cache_seqlens[b] - leftpad[b] + t; q rows
/// likewise when causal or windowed, else every q row at position cache_seqlens[b] - leftpad[b].
struct KVCacheArgs {
  TensorView q;  ///< (B, Sq, Hq, D)
  /// Contiguous: (B_cache, S_cache, Hkv, D); paged (with block_table or page_indptr):
  /// (num_pages, page_size, Hkv, D).
  TensorView k_cache;
  TensorView v_cache;  ///< same shape and dtype as k_cache
  std::optional<TensorView> k_new;  ///< (B, Snew, Hkv, D) keys to append
  std::optional<TensorView> v_new;  ///< (B, Snew, Hkv, D) values to append
  std::optional<TensorView> rotary_cos;  ///< (S_rotary, rotary_dim / 2), q's dtype or float32
  std::optional<TensorView> rotary_sin;  ///< (S_rotary, rotary_dim / 2)
  /// true: rotate dims (0,1), (2,3), ...; false (GPT-NeoX): dims (i, i + rotary_dim / 2).
  bool rotary_interleaved = true;
  std::optional<TensorView> cache_seqlens;  ///< (B) int32 tokens already in the cache
  std::int64_t cache_seqlen = 0;            ///< used for every b when cache_seqlens is absent
  std::optional<TensorView> cache_batch_idx;  ///< (B) int32 cache row (or block-table row) of b
  std::optional<TensorView> cache_leftpad;    ///< (B) int32 first valid slot of b
  /// (B_table, max_pages) int32: paged cache. B_table >= B; with cache_batch_idx any B_table.
  std::optional<TensorView> block_table;
  std::optional<TensorView> page_indptr;      ///< (B_table + 1) int32: paged cache, CSR form
  std::optional<TensorView> page_indices;     ///< (page_indptr[B_table]) int32
  /// Key splits per sequence (split-KV); 0 picks by heuristic. A fixed value gives bitwise
  /// identical results for a sequence whatever the rest of the batch.
  int num_splits = 0;
  /// A split count per sequence, planned on the host from the key lengths (CUDA; num_splits
  /// must then be 0). (B + 1 + W) int32 on q's device, W work items (B <= W <= 65535):
  ///  - entries 0..B, split_indptr: sequence b is split into split_indptr[b + 1] - split_indptr[b]
  ///    parts (1..1024), its partial states at rows split_indptr[b] .. split_indptr[b + 1] - 1;
  ///    split_indptr[0] = 0, non-decreasing, split_indptr[B] <= W;
  ///  - then the W work items in launch order, item = b + 65536 * split (split < its count), each
  ///    split listed once, and W - split_indptr[B] items of -1 (padding: no work). Padding lets a
  ///    plan of one size W serve every step of a CUDA graph (the grid's size is captured).
  /// Part s of sequence b takes its s-th share of the key tiles, as num_splits splits do. On a GPU
  /// the contents are not read on the host: an entry out of range makes its work (or its
  /// sequence's merge) do nothing, with no access outside a tensor; the outputs of a sequence so
  /// described are left as they were, or undefined where only some of its parts are missing.
  /// Results for a sequence depend only on its own count (bitwise, the same as num_splits at that
  /// count). The CPU backend checks the contents too and then ignores the plan.
  std::optional<TensorView> split_plan;
  /// CUDA planning hint: the caller's bound on every sequence's cache_seqlens (keys already in
  /// the cache, before the append). Without a split_plan the split heuristic plans from a bound on
  /// a sequence's keys; it reads no index tensor, so its own bound is the capacity: the block
  /// table's width, the contiguous cache's slots, or with CSR page lists all of page_indices (as
  /// if one sequence held every page: too many splits for a batch). A hint below that bound is
  /// used instead. It only steers the heuristic: a wrong hint gives the same exact results, at
  /// another speed. 0 = none. The CPU backend ignores it.
  std::int64_t max_cache_seqlen = 0;
  TensorView out;                 ///< (B, Sq, Hq, D)
  std::optional<TensorView> lse;  ///< (B, Hq, Sq) float32, any strides
  /// (Hq) float32 attention sinks (gpt-oss, StreamingLLM), any stride, or none: sinks[h] joins
  /// every softmax of query head h as one more logit with a zero value row (in the units of the
  /// scaled, soft-capped scores), so out and lse are what merge_attention_sinks would make of the
  /// call's without them. A row with no keys gets out 0 and lse sinks[h].
  std::optional<TensorView> sinks;
  /// Scratch for split-KV partial results (uint8, at least kvcache_workspace_bytes(args)).
  /// When absent the CPU backend allocates its own.
  std::optional<TensorView> workspace;
  /// CUDA: asked for the scratch when `workspace` is absent and the call needs some (see
  /// WorkspaceAllocator): the same call as with a workspace of kvcache_workspace_bytes(args)
  /// bytes, without sizing it first. The CPU backend ignores it.
  WorkspaceAllocator workspace_allocator;
  AttentionOptions options;
  ExecConfig exec;
};
void kvcache_attention_forward(const KVCacheArgs& args);
/// Bytes of workspace kvcache_attention_forward needs for `args` (0 when it needs none).
std::size_t kvcache_workspace_bytes(const KVCacheArgs& args);

/// Shared-prefix (cascade) attention: every request attends over one dense prefix shared by the
/// batch followed by its own paged suffix. Computed as two passes merged exactly: all queries
/// against the prefix (read once for the batch), each request against its suffix.
/// Prefix keys have positions 0..P-1, suffix keys P..P+len_b-1, and request b's Sq_b query rows
/// are aligned bottom-right against its P + len_b keys (so the result equals attention over the
/// concatenated prefix and suffix with the same options). The suffix pages are given in CSR form
/// (suffix.page_indptr / page_indices) with suffix.last_page_len, as in FlashInfer.
struct SharedPrefixAttentionArgs {
  TensorView q;  ///< (total_q, Hq, D); decode: one row per request
  std::optional<TensorView> qo_indptr;  ///< (B + 1) int32; absent means one query per request
  TensorView k_shared;  ///< (P, Hkv, D)
  TensorView v_shared;  ///< (P, Hkv, D)
  PagedKV suffix;       ///< per-request suffix pages, lengths from last_page_len
  TensorView out;                 ///< (total_q, Hq, D)
  std::optional<TensorView> lse;  ///< (Hq, total_q) float32
  /// Scratch for the two passes' partial states (uint8, at least
  /// shared_prefix_workspace_bytes(args)). When absent the CPU backend allocates its own; the
  /// CUDA backend requires it (from the caller's allocator: no allocation inside the call).
  std::optional<TensorView> workspace;
  /// Planning hints for the CUDA backend, which never reads index tensors on the host (so a call
  /// neither synchronises nor depends on index contents: CUDA-graph safe). max_seqlen_q bounds
  /// every request's query rows (qo_indptr[b + 1] - qo_indptr[b]; like max_seqlen_q of
  /// varlen_attention_forward, rows past it are not computed), max_suffix_len every request's
  /// suffix keys (it only steers the split heuristic). 0 = unknown: the bounds from the tensor
  /// shapes are used (total_q rows; all pages of suffix.page_indices), which is always correct,
  /// only slower. The CPU backend ignores both.
  std::int64_t max_seqlen_q = 0;
  std::int64_t max_suffix_len = 0;
  /// CUDA: key splits of the prefix pass (0..1024; 0 = heuristic from the shapes). The CPU
  /// backend ignores it.
  int num_splits = 0;
  /// CUDA, decode (one query per request): key splits of every request's suffix in the suffix
  /// pass (0..1024; 0 = heuristic from max_suffix_len, which gives a long suffix among short ones
  /// few CTAs). A caller with the suffix lengths on the host can balance a ragged batch with it
  /// (the Python decode wrapper's begin_forward does). Ignored by prefill-shaped calls and by the
  /// CPU backend.
  int suffix_num_splits = 0;
  AttentionOptions options;
  ExecConfig exec;
};
void shared_prefix_attention_forward(const SharedPrefixAttentionArgs& args);
/// Bytes of workspace shared_prefix_attention_forward needs for `args`.
std::size_t shared_prefix_workspace_bytes(const SharedPrefixAttentionArgs& args);

/// Merge two attention states (output v, natural-log LSE s) of the same queries over disjoint
/// key sets into the state over their union:
///   s = log(exp(s_a) + exp(s_b)),  v = v_a * exp(s_a - s) + v_b * exp(s_b - s).
/// An empty state (s = -inf) is the identity. v_*: (S, H, D) float32/float16/bfloat16 (one dtype),
/// s_*: (S, H) float32. Outputs may alias inputs elementwise.
void merge_state(const TensorView& v_a, const TensorView& s_a, const TensorView& v_b,
                 const TensorView& s_b, const TensorView& v_out, const TensorView& s_out,
                 const ExecConfig& exec = {});
/// merge_state into (v, s) in place; rows whose `mask` (S, bool or uint8) is false are untouched.
void merge_state_in_place(const TensorView& v, const TensorView& s, const TensorView& v_other,
                          const TensorView& s_other, const std::optional<TensorView>& mask = {},
                          const ExecConfig& exec = {});
/// Attention sinks (gpt-oss, StreamingLLM) in place: merges into (v, s) the state of one extra
/// logit per head, sinks[h], whose value row is zero, as if each query's softmax had one more
/// key with score sinks[h] (in the units of the scaled, soft-capped scores) and a zero value:
///   s' = log(exp(s) + exp(sinks[h])),  v' = v * exp(s - s').
/// A row with no keys (s = -inf) keeps v = 0 and gets s' = sinks[h]. v (S, H, D)
/// float32/float16/bfloat16, s (S, H) float32, sinks (H) float32, all on one device.
void merge_attention_sinks(const TensorView& v, const TensorView& s, const TensorView& sinks,
                           const ExecConfig& exec = {});
/// Merge N states per row: v (S, N, H, D), s (S, N, H) -> v_out (S, H, D), s_out (S, H).
void merge_states(const TensorView& v, const TensorView& s, const TensorView& v_out,
                  const TensorView& s_out, const ExecConfig& exec = {});

/// A block table of CSR page lists, written on their device: row b of block_table gets the pages
/// page_indices[page_indptr[b] : page_indptr[b + 1]] in order, then 0 in the columns past them.
/// The kernels read a block table's page ids without first loading a row pointer, so on a GPU
/// a call over the table is a little faster than over the lists (bench/NOTES.md, session 68).
///   page_indptr (B + 1) int32, page_indices (nnz) int32, block_table (B, W) int32 (rows
///   contiguous), all on one device.
/// On the CPU the lists are checked (page_indptr from >= 0, non-decreasing, up to nnz; at most W
/// pages a row). On a GPU they are not read on the host (no synchronisation): row b's span is
/// clamped into [0, nnz] and cut at W columns, as the kernels clamp CSR lists.
void csr_to_block_table(const TensorView& page_indptr, const TensorView& page_indices,
                        const TensorView& block_table, const ExecConfig& exec = {});

/// dst = src from host memory, ordered on exec.cuda_stream without waiting for the work queued
/// on it. For a dst on a CUDA device, src's bytes go into a pinned staging block the library owns,
/// one cudaMemcpyAsync copies them, and an event hands the block back once the device has read
/// it: src may be changed or freed as soon as the call returns (a decode plan uploaded while the
/// GPU still runs the previous step; bench/NOTES.md, session 70). For a dst on the host, a plain
/// copy.
///   src: on the host, contiguous; dst: contiguous, with src's dtype and shape.
/// Refused on a stream that is being captured into a CUDA graph: the captured copy would read the
/// staging block, by then reused, at every replay.
void copy_host_to_device(const TensorView& src, const TensorView& dst, const ExecConfig& exec = {});

/// Library version string, "MAJOR.MINOR.PATCH".
const char* version();
/// True when attention runs on `device` in this build: the CPU always; a CUDA GPU the build was
/// compiled for (sm_80 family, sm_90), where attention_forward and varlen_attention_forward run
/// (fp16/bf16) and the other ops raise NotSupportedError until their kernels land.
bool backend_available(const Device& device);
/// True when this build carries device code for `device`: the CPU always; a CUDA device when the
/// CUDA backend was compiled (toolchain, CUTLASS, sm_80 / sm_90a) for its architecture, whether
/// or not the attention ops run there yet.
bool device_code_available(const Device& device);

}  // namespace fastattn
