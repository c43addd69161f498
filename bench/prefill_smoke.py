"""Quick GPU prefill check used while tuning (bench/NOTES.md tables): correctness of
fastattn.flash_attn_func / flash_attn_varlen_func (paged) against a torch float32 reference with
FlashAttention's 2x rule over head dims, dtypes and options, then fastattn vs PyTorch SDPA flash
speed (CUDA events, median of 20 after 3 warm-ups, 16k tokens, hidden 2048).

Usage on the GPU machine, after scripts/gpu_check.sh installed the package:
    python bench/prefill_smoke.py
"""
import math, time, sys
import torch, fastattn
torch.manual_seed(0)
dev = "cuda"

def ref(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None, dtype=torch.float32):
    # q (B,Sq,H,D), k/v (B,Sk,Hk,D) -> out (B,Sq,H,D), lse (B,H,Sq); computed in `dtype`
    B, Sq, H, D = q.shape; Sk, Hk = k.shape[1], k.shape[2]
    g = H // Hk
    qq = q.to(dtype).transpose(1, 2); kk = k.to(dtype).transpose(1, 2).repeat_interleave(g, 1); vv = v.to(dtype).transpose(1, 2).repeat_interleave(g, 1)
    s = (qq @ kk.transpose(-1, -2)).float() / math.sqrt(D)
    if softcap > 0: s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=dev)[:, None] + Sk - Sq; j = torch.arange(Sk, device=dev)[None, :]
    if alibi is not None: s = s - alibi.view(1, H, 1, 1) * (i - j).abs()
    left, right = window
    if causal: right = 0
    vis = torch.ones(Sq, Sk, dtype=torch.bool, device=dev)
    if left >= 0: vis &= j >= i - left
    if right >= 0: vis &= j <= i + right
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = (p.to(dtype) @ vv).float()
    return o.transpose(1, 2), lse

fails = 0
for dtype in (torch.float16, torch.bfloat16):
    for D in (32, 40, 64, 96, 128, 192, 256):
        for (causal, window, softcap, use_alibi) in ((False, (-1,-1), 0.0, False), (True, (-1,-1), 0.0, False), (True, (50, -1), 5.0, True), (False, (30, 20), 0.0, False)):
            B, Sq, Sk, H, Hk = 2, 300, 517, 8, 2
            q = torch.randn(B, Sq, H, D, device=dev, dtype=dtype); k = torch.randn(B, Sk, Hk, D, device=dev, dtype=dtype); v = torch.randn(B, Sk, Hk, D, device=dev, dtype=dtype)
            alibi = torch.rand(H, device=dev) * 0.1 if use_alibi else None
            out = torch.full_like(q, float("nan"))
            o, lse = fastattn.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi, return_softmax_lse=True, out=out)
            torch.cuda.synchronize()
            r32, lse32 = ref(q, k, v, causal, window, softcap, alibi)
            rlo, _ = ref(q, k, v, causal, window, softcap, alibi, dtype=dtype)
            err = (o.float() - r32).abs().max().item(); base = (rlo.float() - r32).abs().max().item()
            lerr = (lse - lse32).abs().nan_to_num(0).max().item()
            ok = err <= 2 * base + 1e-5 and lerr < 1e-3 and not torch.isnan(o).any()
            fails += not ok
            print(f"{'ok ' if ok else 'BAD'} {str(dtype)[6:]:8s} D={D:3d} causal={causal:d} win={window} cap={softcap} alibi={use_alibi:d} err={err:.2e} base={base:.2e} lse_err={lerr:.2e}")
# varlen + paged
for dtype in (torch.float16,):
    for page in (1, 5, 16, 256):
        lens_q = [0, 1, 17, 113, 300]; lens_k = [5, 1, 40, 113, 799]
        H, Hk, D = 8, 2, 128
        cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=dev)
        q = torch.randn(int(cu_q[-1]), H, D, device=dev, dtype=dtype)
        npg = [(l + page - 1) // page for l in lens_k]; maxp = max(npg)
        num_pages = sum(npg) + 3
        kp = torch.randn(num_pages, page, Hk, D, device=dev, dtype=dtype); vp = torch.randn_like(kp)
        perm = torch.randperm(num_pages, device=dev).int()
        bt = torch.zeros(len(lens_k), maxp, dtype=torch.int32, device=dev); pos = 0
        for b, n in enumerate(npg): bt[b, :n] = perm[pos:pos + n]; pos += n
        out = torch.full_like(q, float("nan"))
        o = fastattn.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, block_table=bt, out=out)
        torch.cuda.synchronize()
        worst = 0.0; ok = not torch.isnan(o).any().item()
        for b in range(len(lens_q)):
            if lens_q[b] == 0: continue
            kk = kp[bt[b, :npg[b]].long()].reshape(-1, Hk, D)[:lens_k[b]]; vv = vp[bt[b, :npg[b]].long()].reshape(-1, Hk, D)[:lens_k[b]]
            qq = q[cu_q[b]:cu_q[b + 1]]
            r32, _ = ref(qq[None], kk[None], vv[None], True); rlo, _ = ref(qq[None], kk[None], vv[None], True, dtype=dtype)
            err = (o[cu_q[b]:cu_q[b + 1]].float() - r32[0]).abs().max().item(); base = (rlo.float() - r32).abs().max().item()
            ok = ok and err <= 2 * base + 1e-5; worst = max(worst, err)
        fails += not ok
        print(f"{'ok ' if ok else 'BAD'} varlen paged page={page} err={worst:.2e}")
# speed
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F
for D, causal in ((32, False), (64, False), (64, True), (128, False), (128, True), (256, False), (256, True)):
    S = 4096; H = 2048 // D if D < 256 else 8; B = 16384 // S
    q = torch.randn(B, S, H, D, device=dev, dtype=torch.float16); k = torch.randn_like(q); v = torch.randn_like(q)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    def bench(fn, n=20):
        for _ in range(3): fn()
        st = torch.cuda.Event(enable_timing=True); en = torch.cuda.Event(enable_timing=True); ts = []
        for _ in range(n):
            st.record(); fn(); en.record(); torch.cuda.synchronize(); ts.append(st.elapsed_time(en))
        return sorted(ts)[n // 2]
    t_ours = bench(lambda: fastattn.flash_attn_func(q, k, v, causal=causal))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t_fl = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
    fl = 4 * B * H * S * S * D * (0.5 if causal else 1)
    print(f"speed D={D} causal={causal}: fastattn {fl/t_ours/1e9:.1f} TFLOP/s ({t_ours:.3f} ms), sdpa-flash {fl/t_fl/1e9:.1f} TFLOP/s ({t_fl:.3f} ms), ratio {t_fl/t_ours:.2f}")
print("FAILS", fails)
