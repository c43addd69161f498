"""fastattn: exact attention kernels for LLM inference.

The Python functions keep the names, arguments and defaults of ``flash_attn`` (FlashAttention 2)
and of FlashInfer's ``cascade``, ``decode`` and ``prefill`` modules, and accept numpy arrays, torch tensors, cupy arrays and
jax arrays (through DLPack, without copies). All computation is done by the C++ library
(``fastattn._C``); this package only maps arguments and allocates outputs.

Conventions: softmax LSE is float32 **natural-log** log-sum-exp (FlashInfer uses base 2; see
:func:`lse_base2_to_natural`); a query row that sees no key gives output 0 and LSE ``-inf``;
causal and sliding-window masks are aligned to the bottom-right corner.
"""

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only when the extension is missing or broken
    raise ImportError(
        "fastattn's compiled extension fastattn._C could not be imported "
        f"({e}). Build and install the package with `pip install .` from the repository root."
    ) from e

from .cascade import (
    BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
    BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
    lse_base2_to_natural,
    lse_natural_to_base2,
    merge_attention_sinks,
    merge_state,
    merge_state_in_place,
    merge_states,
    shared_prefix_attention,
)
from .decode import (
    BatchDecodeWithPagedKVCacheWrapper,
    decode_graph_plan_items,
    decode_graph_split_counts,
    decode_num_splits_for_lengths,
    decode_split_counts_for_lengths,
    decode_split_plan,
)
from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .prefill import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper
from .single_decode import single_decode_with_kv_cache

__version__ = _C.version()


def version() -> str:
    """The C++ library version, 'MAJOR.MINOR.PATCH'."""
    return _C.version()


def _parse_device(device) -> tuple:
    if not isinstance(device, str):
        device = str(device)  # torch.device / cupy Device
    kind, _, index = device.partition(":")
    return kind, int(index) if index else 0


def backend_available(device: str = "cpu") -> bool:
    """True when the attention ops run on `device` in this build: "cpu" (always) or "cuda" /
    "cuda:N" (once the CUDA attention kernels exist, on a GPU the build was compiled for)."""
    return bool(_C.backend_available(*_parse_device(device)))


def device_code_available(device: str = "cpu") -> bool:
    """True when this build carries code for `device`: "cpu" always; "cuda:N" when the CUDA
    backend was compiled (sm_80 family or sm_90a) for that GPU's architecture."""
    return bool(_C.device_code_available(*_parse_device(device)))


__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "BatchDecodeWithPagedKVCacheWrapper",
    "decode_graph_plan_items",
    "decode_graph_split_counts",
    "decode_num_splits_for_lengths",
    "decode_split_counts_for_lengths",
    "decode_split_plan",
    "single_decode_with_kv_cache",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "merge_state",
    "merge_state_in_place",
    "merge_attention_sinks",
    "merge_states",
    "lse_base2_to_natural",
    "lse_natural_to_base2",
    "shared_prefix_attention",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
    "backend_available",
    "device_code_available",
    "version",
    "__version__",
]
