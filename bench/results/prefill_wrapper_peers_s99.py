"""Session 99: fastattn.BatchPrefillWithPagedKVCacheWrapper against FlashInfer 0.5.3's
BatchPrefillWithPagedKVCacheWrapper (backends "fa2" and "fa3") on the same page pools, and
against fastattn.BatchDecodeWithPagedKVCacheWrapper(q_len_per_req=N) where the step is uniform
(our prefill wrapper's decode route runs that wrapper: the two should time alike). On the prefill
rows, the same step over packed keys and values: fastattn.BatchPrefillWithRaggedKVCacheWrapper
against FlashInfer's (fa2, fa3).

Rows (bf16, head_dim 128, GQA 32/8, pages of 16 in a random order, causal, NHD):
- uniform N rows per request at its last N keys (speculative decoding's verify step; our decode
  route): N = 4 and 8 at batch 8 / 32 / 128 and 1k / 8k keys;
- ragged prefill and append steps (our prefill-kernel route): batch 4 x 512 new rows over 4k keys,
  batch 1 x 2048 rows over 2048 keys, batch 16 x 128 rows over 2k keys, and a mixed batch (runs of
  1..300 rows over 100..6000 keys, seeded).

Correctness first: every implementation's output (NaN-poisoned before) against a float32
reference, max abs error <= 2e-2; a peer that fails is recorded, not timed.
Timing: the decode suite's interleaved per-call CUDA-event timing (gpu_decode.time_interleaved,
rounds queued behind a GPU sleep), run() only, plan() once beforehand; median per call.
KV bytes = sum of key lengths x Hkv x 128 x 2 x 2; FLOP = 4 x 128 x Hq x (attended (row, key)
pairs). TB/s and TFLOP/s from the median.

    python prefill_wrapper_peers_s99.py [--seed S] [--json PATH] [--rounds R]
"""
import argparse
import json
import math
import random
import time

import torch

import fastattn
from fastattn.bench import gpu_decode as G

D, HQ, HKV, PS = 128, 32, 8, 16
DEV = "cuda"
TOL = 2e-2


class Step:
    def __init__(self, rng, qo_lens, kv_lens):
        self.qo_lens, self.kv_lens = qo_lens, kv_lens
        need = [-(-n // PS) for n in kv_lens]
        num_pages = sum(need) + 8
        perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        self.lists, pos = [], 0
        for n in need:
            self.lists.append(perm[pos:pos + n].tolist())
            pos += n
        cum = lambda xs: torch.tensor([0] + list(torch.tensor(xs).cumsum(0).tolist()), dtype=torch.int32)
        self.qo_indptr = cum(qo_lens).to(DEV)
        self.indptr = cum([len(p) for p in self.lists]).to(DEV)
        self.indices = torch.tensor([p for ps in self.lists for p in ps], dtype=torch.int32, device=DEV)
        self.last = torch.tensor([n - (m - 1) * PS if m else 0 for n, m in zip(kv_lens, need)],
                                 dtype=torch.int32, device=DEV)
        self.kv = torch.randn(num_pages, 2, PS, HKV, D, dtype=torch.bfloat16, device=DEV)
        self.q = torch.randn(sum(qo_lens), HQ, D, dtype=torch.bfloat16, device=DEV)

    def reference(self):
        out = torch.zeros(self.q.shape, dtype=torch.float32, device=DEV)
        r0 = 0
        for nq, nk, pages in zip(self.qo_lens, self.kv_lens, self.lists):
            if nq == 0:
                continue
            idx = torch.arange(nk, device=DEV)
            ids = torch.tensor(pages, device=DEV, dtype=torch.long)[idx // PS]
            k = self.kv[ids, 0, idx % PS].float().repeat_interleave(HQ // HKV, 1)
            v = self.kv[ids, 1, idx % PS].float().repeat_interleave(HQ // HKV, 1)
            q = self.q[r0:r0 + nq].float()
            s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
            qpos = nk - nq + torch.arange(nq, device=DEV)
            s = s.masked_fill(idx[None, None, :] > qpos[None, :, None], float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            out[r0:r0 + nq] = torch.einsum("hqk,khd->qhd", p, v)
            r0 += nq
        return out

    def work(self):
        pairs = sum(sum(min(nk, nk - nq + i + 1) for i in range(nq)) for nq, nk in zip(self.qo_lens, self.kv_lens))
        return sum(self.kv_lens) * HKV * D * 2 * 2, 4 * D * HQ * pairs


def ours_prefill(step, ws):
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(ws)
    w.plan(step.qo_indptr, step.indptr, step.indices, step.last, HQ, HKV, D, PS, causal=True,
           q_data_type=torch.bfloat16)
    out = torch.empty_like(step.q)
    return (lambda: w.run(step.q, step.kv, out=out)), out, w._plan["route"]


def packed_kv(step):
    """Each request's keys and values gathered from its pages and packed: (k, v, kv_indptr)."""
    ks, vs = [], []
    for nk, pages in zip(step.kv_lens, step.lists):
        idx = torch.arange(nk, device=DEV)
        ids = torch.tensor(pages, device=DEV, dtype=torch.long)[idx // PS]
        ks.append(step.kv[ids, 0, idx % PS])
        vs.append(step.kv[ids, 1, idx % PS])
    kv_indptr = torch.tensor([0] + list(torch.tensor(step.kv_lens).cumsum(0).tolist()),
                             dtype=torch.int32, device=DEV)
    return torch.cat(ks).contiguous(), torch.cat(vs).contiguous(), kv_indptr


def ours_ragged(step, ws, packed):
    k, v, kv_indptr = packed
    w = fastattn.BatchPrefillWithRaggedKVCacheWrapper(ws)
    w.plan(step.qo_indptr, kv_indptr, HQ, HKV, D, causal=True, q_data_type=torch.bfloat16)
    out = torch.empty_like(step.q)
    return (lambda: w.run(step.q, k, v, out=out)), out, "ragged"


def flashinfer_ragged(fi, step, ws, backend, packed):
    k, v, kv_indptr = packed
    w = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
    w.plan(step.qo_indptr.clone(), kv_indptr.clone(), HQ, HKV, D, causal=True,
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    out = torch.empty_like(step.q)
    return (lambda: w.run(step.q, k, v, out=out)), out, backend + " ragged"


def ours_decode(step, ws, n):
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(ws)
    w.plan(step.indptr, step.indices, step.last, HQ, HKV, D, PS, q_data_type=torch.bfloat16,
           q_len_per_req=n)
    out = torch.empty_like(step.q)
    return (lambda: w.run(step.q, step.kv, out=out)), out, "decode wrapper"


def flashinfer(fi, step, ws, backend):
    w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    w.plan(qo_indptr=step.qo_indptr.clone(), paged_kv_indptr=step.indptr.clone(),
           paged_kv_indices=step.indices.clone(), paged_kv_last_page_len=step.last.clone(),
           num_qo_heads=HQ, num_kv_heads=HKV, head_dim_qk=D, page_size=PS, causal=True,
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    out = torch.empty_like(step.q)
    return (lambda: w.run(step.q, step.kv, out=out)), out, backend


def rows(rng):
    for n in (4, 8):
        for b in (8, 32, 128):
            for L in (1024, 8192):
                yield "uniform N=%d b%d L%d" % (n, b, L), [n] * b, [L] * b, n
    yield "prefill b4 512 rows / 4k keys", [512] * 4, [4096] * 4, 0
    yield "prefill b1 2048 / 2048", [2048], [2048], 0
    yield "prefill b16 128 / 2k", [128] * 16, [2048] * 16, 0
    qo = [rng.randint(1, 300) for _ in range(24)]
    yield "mixed b24 (1..300 / 100..6000)", qo, [q + rng.randint(100, 6000) for q in qo], 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    try:
        import flashinfer as fi
        fi_version = getattr(fi, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        fi, fi_version = None, "unavailable: %s" % e
    settings = G.Settings(rounds=args.rounds, budget_s=0.3)
    sleeper = G.make_sleeper(torch)
    ws_ours = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    ws_fi = torch.empty(512 << 20, dtype=torch.uint8, device=DEV)
    print("%s, torch %s, flashinfer %s, seed %d" % (torch.cuda.get_device_name(), torch.__version__,
                                                     fi_version, args.seed), flush=True)
    records, t0 = [], time.time()
    for name, qo, kv, n in rows(rng):
        step = Step(rng, qo, kv)
        ref = step.reference()
        fns, errs, notes = {}, {}, {}
        makers = [("ours", lambda: ours_prefill(step, ws_ours))]
        if n:
            makers.append(("ours decode wrapper", lambda: ours_decode(step, ws_ours, n)))
        if fi is not None:
            for backend in ("fa2", "fa3"):
                makers.append((backend, lambda b=backend: flashinfer(fi, step, ws_fi, b)))
        if not n:  # the same step over packed keys and values: the ragged wrappers
            packed = packed_kv(step)
            makers.append(("ours ragged", lambda: ours_ragged(step, ws_ours, packed)))
            if fi is not None:
                for backend in ("fa2", "fa3"):
                    makers.append((backend + " ragged",
                                   lambda b=backend: flashinfer_ragged(fi, step, ws_fi, b, packed)))
        for label, make in makers:
            try:
                fn, out, note = make()
                out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                err = float((out.float() - ref).abs().max()) if torch.isfinite(out).all() else math.inf
                errs[label], notes[label] = err, note
                if err <= TOL:
                    fns[label] = fn
                elif label == "ours":
                    raise AssertionError("%s: ours off the reference by %g" % (name, err))
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001
                errs[label] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        stats = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        kv_bytes, flop = step.work()
        rec = {"row": name, "route": notes.get("ours"), "kv_bytes": kv_bytes, "flop": flop,
               "us": {k: v["s"] * 1e6 for k, v in stats.items()},
               "spread": {k: v["spread"] for k, v in stats.items()}, "err": errs}
        records.append(rec)
        us = rec["us"]
        parts = ["%-34s %-7s ours %8.1f us %5.2f TB/s %6.1f TFLOP/s" % (
            name, rec["route"], us["ours"], kv_bytes / us["ours"] * 1e-6, flop / us["ours"] * 1e-6)]
        for k in ("ours decode wrapper", "fa2", "fa3", "ours ragged", "fa2 ragged", "fa3 ragged"):
            base = us.get("ours ragged") if k in ("fa2 ragged", "fa3 ragged") else us["ours"]
            if k in us and base:
                parts.append("%s %8.1f (%.3f)" % (k, us[k], us[k] / base))
            elif k in errs:
                parts.append("%s failed: %s" % (k, errs[k]))
        parts.append("err " + " ".join("%s %.1e" % (k, v) for k, v in errs.items() if isinstance(v, float)))
        print("  ".join(parts), flush=True)
    print("(x) = time / ours (the ragged peers: / ours ragged): > 1 ours faster. %.0f s" % (time.time() - t0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "flashinfer": fi_version,
                       "seed": args.seed, "rows": records}, f, indent=1)


if __name__ == "__main__":
    main()
