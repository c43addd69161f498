// CPU backend: shared-prefix (cascade) attention as two attention passes merged exactly.
//   pass 1: every request's queries against the shared prefix (one dense K/V for the batch)
//   pass 2: each request's queries against its own paged suffix
//   merge:  the two float32 partial states per (row, head) -> out, lse
#include <omp.h>

#include <string>
#include <vector>

#include "common/softmax_state.h"
#include "cpu/attention_problem.h"
#include "cpu/convert.h"
#include "cpu/cpu_backend.h"
#include "cpu/index_data.h"

namespace fastattn::cpu {
namespace {

struct CascadePlan {
  AttnProblem prefix, suffix;
  std::int64_t rows = 0;  ///< total_q * Hq partial states per pass
  std::size_t bytes = 0;  ///< two passes x (output + LSE) in float32
};

CascadePlan plan_cascade(check::ArgChecker& c, const SharedPrefixAttentionArgs& args,
                         const core::SharedPrefixDims& d) {
  const auto o = core::validate_options(c, args.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  const PagedKV& sfx = args.suffix;
  if (sfx.block_table)
    c.fail_value("suffix.block_table", "is not supported here: give the suffix pages as "
                                       "suffix.page_indptr / page_indices (FlashInfer's layout)");
  check_cumulative(c, *sfx.page_indptr, "suffix.page_indptr", sfx.page_indices->size(0),
                   "suffix.page_indices", -1, "");
  if (args.qo_indptr) check_cumulative(c, *args.qo_indptr, "qo_indptr", d.total_q, "q (dim 0)", -1, "", true);
  const std::int32_t* qo = args.qo_indptr ? ints(*args.qo_indptr) : nullptr;
  const std::int32_t* ip = ints(*sfx.page_indptr);
  const std::int32_t* idx = ints(*sfx.page_indices);
  const std::int32_t* last = ints(*sfx.last_page_len);
  const std::int64_t ps = d.paged.page_size, hq = d.a.heads_q, dim = d.a.head_dim;

  CascadePlan plan;
  plan.rows = d.total_q * hq;
  plan.bytes = static_cast<std::size_t>(2 * plan.rows * (dim + 1)) * sizeof(float);
  for (AttnProblem* p : {&plan.prefix, &plan.suffix}) {
    p->dtype = args.q.dtype;
    p->out_dtype = DType::kFloat32;
    p->heads_q = hq;
    p->heads_kv = d.a.heads_kv;
    p->head_dim = dim;
    p->q = args.q.data;
    p->q_row_stride = args.q.stride(0);
    p->q_head_stride = args.q.stride(1);
    p->out_row_stride = hq * dim;  // partials: contiguous (total_q, Hq, D)
    p->out_head_stride = dim;
    p->lse_row_stride = hq;        // partial LSE: contiguous (total_q, Hq)
    p->lse_head_stride = 1;
    p->scale = o.scale;
    p->softcap = o.softcap;
    p->window_left = o.window_left;
    p->window_right = o.window_right;
  }
  AttnProblem& pre = plan.prefix;
  pre.kv.k = args.k_shared.data;
  pre.kv.v = args.v_shared.data;
  pre.kv.k_slot_stride = args.k_shared.stride(0);
  pre.kv.v_slot_stride = args.v_shared.stride(0);
  pre.kv.k_head_stride = args.k_shared.stride(1);
  pre.kv.v_head_stride = args.v_shared.stride(1);
  AttnProblem& suf = plan.suffix;
  suf.kv.k = sfx.k_pages.data;
  suf.kv.v = sfx.v_pages.data;
  suf.kv.k_slot_stride = sfx.k_pages.stride(1);
  suf.kv.v_slot_stride = sfx.v_pages.stride(1);
  suf.kv.k_head_stride = sfx.k_pages.stride(2);
  suf.kv.v_head_stride = sfx.v_pages.stride(2);
  suf.kv.page_size = ps;
  suf.kv.k_page_stride = sfx.k_pages.stride(0);
  suf.kv.v_page_stride = sfx.v_pages.stride(0);

  const std::int64_t prefix_len = d.a.seqlen_k;
  // When every query sees the whole prefix (no left window, no ALiBi, and the causal/right
  // bound of each request's first query reaches the last prefix key), pass 1 is one
  // multi-query pass: all requests' rows stacked against the prefix, so each prefix tile is
  // loaded once per kv head for the whole batch rather than once per request.
  bool stack_prefix = o.window_left < 0 && o.alibi == nullptr;
  for (std::int64_t b = 0; b < d.a.batch; ++b) {
    const std::string bs = "[" + std::to_string(b) + "]";
    const std::int64_t npages = ip[b + 1] - ip[b];
    if ((npages > 0 && (last[b] < 1 || last[b] > ps)) || (npages == 0 && (last[b] < 0 || last[b] > ps)))
      c.fail_value("suffix.last_page_len", bs + " = " + std::to_string(last[b]) +
                                               " must be in [1, page_size = " + std::to_string(ps) + "]");
    const std::int64_t len = npages > 0 ? (npages - 1) * ps + last[b] : 0;
    for (std::int64_t i = 0; i < npages; ++i)
      if (idx[ip[b] + i] < 0 || idx[ip[b] + i] >= d.paged.num_pages)
        c.fail_value("suffix.page_indices", "has page id " + std::to_string(idx[ip[b] + i]) +
                                                " for request " + std::to_string(b) + " outside [0, " +
                                                std::to_string(d.paged.num_pages) + ")");
    SeqDesc s;
    const std::int64_t q0 = qo ? qo[b] : b;
    s.seqlen_q = qo ? qo[b + 1] - qo[b] : 1;
    s.q_off = q0 * args.q.stride(0);
    s.out_off = q0 * hq * dim;
    s.lse_off = q0 * hq;
    s.ws_row0 = q0;
    s.q_pos0 = prefix_len + len - s.seqlen_q;  // bottom-right against prefix + suffix
    s.alibi = o.alibi ? o.alibi + b * o.alibi_batch_stride : nullptr;
    SeqDesc sp = s, ss = s;
    sp.seqlen_k = prefix_len;
    sp.k_pos0 = 0;
    ss.seqlen_k = len;
    ss.k_pos0 = prefix_len;
    ss.pages = idx + ip[b];
    pre.seqs.push_back(sp);
    suf.seqs.push_back(ss);
    if (o.window_right >= 0 && s.seqlen_q > 0 && s.q_pos0 + o.window_right < prefix_len - 1)
      stack_prefix = false;
  }
  if (stack_prefix) {
    SeqDesc all;  // rows 0 .. owned_q - 1 of q, every one seeing prefix keys 0 .. P-1
    all.seqlen_q = qo ? qo[d.a.batch] : d.total_q;
    all.seqlen_k = prefix_len;
    all.q_pos0 = prefix_len - 1;  // row 0 already sees the last prefix key under causal
    pre.seqs.assign(1, all);
  }
  return plan;
}

}  // namespace

std::size_t shared_prefix_workspace_bytes(check::ArgChecker& c,
                                          const SharedPrefixAttentionArgs& args,
                                          const core::SharedPrefixDims& d) {
  return plan_cascade(c, args, d).bytes;
}

void shared_prefix_attention_forward(check::ArgChecker& c, const SharedPrefixAttentionArgs& args,
                                     const core::SharedPrefixDims& d) {
  CascadePlan plan = plan_cascade(c, args, d);
  if (args.workspace && static_cast<std::size_t>(args.workspace->numel()) < plan.bytes)
    c.fail_value("workspace", "must hold at least " + std::to_string(plan.bytes) + " bytes, got " +
                                  std::to_string(args.workspace->numel()));
  std::vector<float> own;
  float* ws;
  if (args.workspace) {
    ws = static_cast<float*>(args.workspace->data);
  } else {
    own.resize(plan.bytes / sizeof(float));
    ws = own.data();
  }
  const std::int64_t rows = plan.rows, dim = d.a.head_dim;
  float* o_pre = ws;
  float* o_suf = o_pre + rows * dim;
  float* lse_pre = o_suf + rows * dim;
  float* lse_suf = lse_pre + rows;
  plan.prefix.out = o_pre;
  plan.prefix.lse = lse_pre;
  plan.suffix.out = o_suf;
  plan.suffix.lse = lse_suf;
  const int nt = args.exec.num_threads > 0 ? args.exec.num_threads : omp_get_max_threads();
  run_attention(plan.prefix, nullptr, nt);
  run_attention(plan.suffix, nullptr, nt);

  // Merge the two states of every (row, head) with the shared merge primitive.
  const std::int64_t hq = d.a.heads_q;
  const TensorView& out = args.out;
  const std::int64_t owned_q = args.qo_indptr ? ints(*args.qo_indptr)[d.a.batch] : d.total_q;
#pragma omp parallel for num_threads(nt)
  for (std::int64_t i = 0; i < owned_q * hq; ++i) {
    const std::int64_t r = i / hq, h = i % hq;
    const MergeWeights w = merge_weights(lse_pre[i], lse_suf[i]);
    float row[256];
    for (std::int64_t cc = 0; cc < dim; ++cc)
      row[cc] = w.w_a * o_pre[i * dim + cc] + w.w_b * o_suf[i * dim + cc];
    store_row(out.dtype, row, dim, 1.0f,
              elem_ptr(out.data, out.dtype, r * out.stride(0) + h * out.stride(1)));
    if (args.lse) static_cast<float*>(args.lse->data)[h * args.lse->stride(0) + r * args.lse->stride(1)] = w.lse;
  }
  clear_unowned_rows(out, args.lse, owned_q, d.total_q);
}

}  // namespace fastattn::cpu
