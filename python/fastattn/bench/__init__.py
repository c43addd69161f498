"""fastattn's benchmark (the main job): ``python -m fastattn.bench``.

Times prefill (batched, causal and not, head_dim 64/128), paged decode (flash_attn_with_kvcache,
page 16, GQA 32/8) and cascade (shared-prefix) shapes on the best device present, through the
public Python API only, against a naive float64 numpy reference run on the same shapes and
against PyTorch's attention when torch is importable (SDPA on the CPU; SDPA's flash and cuDNN
backends on the GPU). Prints a table and saves JSON (date, machine, command) and a PNG plot.

On the GPU, the prefill suite is issue 3's table (gpu_prefill.py): 16384 tokens per call, hidden
2048, seqlen 512..16384, causal and not, fp16/bf16, head_dim 64/128/256, each shape as dense,
varlen and paged (page 16 and 256) calls, against SDPA flash and cuDNN; it ends with a summary
block of the acceptance figures. --quick keeps 8 shapes (a few seconds, run by
scripts/gpu_check.sh); the full suite takes about 3 minutes on an H200 (at most --time-limit, 330 s).
The GPU decode suite (gpu_decode.py) is the KV-cache decode issue's table: bf16, head_dim 128,
32/8 and 32/32 heads, batch 1..128, cache 1024..32768, one query row, fastattn on a paged (page 16)
and a contiguous cache against SDPA flash and cuDNN and the copy bandwidth measured in the same run,
with a summary of the acceptance checks (--quick: 4 GQA shapes; full: about a minute, at most 150 s).
The GPU cascade suite (gpu_cascade.py) is the cascade issue's table: fp16, head_dim 128, 32/32
heads, page 16, shared prefix 1k/8k/32k, batch 16/64/128 decode requests with 256-token unique
suffixes; BatchDecodeWithSharedPrefixPagedKVCacheWrapper.forward against fastattn's own paged
decode of the same batch with the prefix duplicated into every request's pages, and the speedup
(acceptance: >= 20x at prefix 32k, batch 128; --quick: 1k/8k x 16/64).
The GPU merge suite (gpu_merge.py) times the CUDA merge kernels: merge_state and merge_states
(N = 2 and 8), fp16 and fp32, 32 heads x 128, S = 4096 and 65536, in TB/s (every read and write
once) and as a fraction of the copy bandwidth measured in the same run (acceptance: >= 80% on rows
moving >= 64 MiB; --quick: fp16 only; full: about 20 s, at most 60 s).

    python -m fastattn.bench [--quick] [--full] [--device auto|cpu|cuda] [--out DIR]
                             [--suite prefill,decode,merge,cascade] [--table-file FILE]
                             [--seqlens ...] [--head-dims ...] [--dtypes ...] [--variants ...]
                             [--tokens N] [--hidden N] [--time-limit S]
                             [--batches ...] [--cache-lens ...] [--kv-heads ...]
                             [--prefixes ...] [--cascade-batches ...]

    python -m fastattn.bench --device cuda --suite prefill --out DIR     # the full GPU prefill suite
    python -m fastattn.bench --device cuda --suite decode --out DIR      # the full GPU decode suite
    python -m fastattn.bench --device cuda --suite merge --out DIR       # the GPU merge suite
    python -m fastattn.bench --device cuda --suite cascade --out DIR     # the GPU cascade suite
"""
from .runner import main

__all__ = ["main"]
