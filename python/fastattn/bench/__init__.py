"""fastattn's benchmark (the main job): ``python -m fastattn.bench``.

Times prefill (batched, causal and not, head_dim 64/128), paged decode (flash_attn_with_kvcache,
page 16, GQA 32/8) and cascade (shared-prefix) shapes on the best device present, through the
public Python API only, against a naive float64 numpy reference run on the same shapes and
against PyTorch's attention when torch is importable (SDPA on the CPU; SDPA's flash and cuDNN
backends on the GPU). Prints a table and saves JSON (date, machine, command) and a PNG plot.

    python -m fastattn.bench [--quick] [--device auto|cpu|cuda] [--out DIR]
                             [--suite prefill,decode,cascade]
"""
from .runner import main

__all__ = ["main"]
