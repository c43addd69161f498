"""Framework-neutral helpers: allocate outputs like an input, pick the CUDA stream, read index
arrays back for host-side planning.

fastattn's C++ ops never allocate the caller's tensors; this module allocates outputs in the
framework of the input (numpy, torch, cupy, jax) so a call returns what the caller passed in:

* numpy  -> numpy.empty
* torch  -> torch.empty on the input's device
* cupy   -> cupy.empty on the input's device
* jax    -> jax arrays are immutable: outputs are computed into numpy buffers (the inputs are read
            through DLPack without a copy) and returned as jax arrays on the input's device.

Nothing here computes attention: all math is done by the C++ library.
"""

from __future__ import annotations

import math
import operator
import sys
from typing import Any, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "framework",
    "host_ints",
    "dtype_name",
    "usable_workspace",
    "device_sm_count",
    "KV_LAYOUTS",
    "check_kv_layout",
    "paged_kv_pages",
    "on_device_of",
    "check_array",
    "prepare",
    "empty",
    "finalize",
    "exec_kwargs",
    "cuda_stream_of",
    "shape_or_zero",
    "transpose2d",
]


def framework(x: Any) -> Optional[str]:
    """"numpy", "torch", "cupy", "jax" or None for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__ or ""
    root = mod.split(".", 1)[0]
    if root == "torch":
        return "torch"
    if root == "cupy":
        return "cupy"
    if root in ("jax", "jaxlib"):
        return "jax"
    return None


def check_array(x: Any, name: str) -> None:
    """TypeError naming `name` unless `x` is an array object fastattn can read."""
    if _TORCH_DLPACK is not None and type(x) is _TORCH_DLPACK[0]:  # a torch.Tensor: decided at once
        return
    if framework(x) is None and not (hasattr(x, "__dlpack__") and hasattr(x, "shape")):
        raise TypeError(
            f"{name} must be an array (numpy.ndarray, torch.Tensor, cupy.ndarray or jax.Array), "
            f"got {type(x).__name__}"
        )


def prepare(x: Any) -> Any:
    """The object to hand to the binding: torch tensors that require grad are detached (DLPack
    refuses them; fastattn is forward-only, so no gradient is lost that could have been kept)."""
    if _TORCH_DLPACK is not None and type(x) is _TORCH_DLPACK[0]:
        return x.detach() if x.requires_grad else x
    if getattr(x, "requires_grad", False) and framework(x) == "torch":
        return x.detach()
    return x


def _capsule(t: Any, to_dlpack) -> Any:
    try:
        return to_dlpack(t)
    except Exception:  # requires grad, a conjugate bit, ...: the binding's own import and errors
        return t


# (torch.Tensor, torch.utils.dlpack.to_dlpack, whether torch.Tensor publishes DLPack's C exchange
# table) once torch is imported
_TORCH_DLPACK = None


def _torch_dlpack():
    """_TORCH_DLPACK, made once torch has been imported; None before."""
    global _TORCH_DLPACK
    if _TORCH_DLPACK is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return None
        import torch.utils.dlpack

        exchange = "__dlpack_c_exchange_api__" in torch.Tensor.__dict__
        _TORCH_DLPACK = (torch.Tensor, torch.utils.dlpack.to_dlpack, exchange)
    return _TORCH_DLPACK


def plain_torch_tensor_type() -> Optional[type]:
    """torch.Tensor once torch has been imported, else None: the type whose objects need no
    framework check (check_array) and only a detach where they require grad (prepare). A caller
    that takes many arrays tests `type(x) is` it once per array instead of calling both
    (bench/NOTES.md, session 98)."""
    info = _TORCH_DLPACK if _TORCH_DLPACK is not None else _torch_dlpack()
    return None if info is None else info[0]


def through_exchange_table(x: Any) -> bool:
    """Whether x is a torch.Tensor (not a subclass) of a torch that publishes DLPack's C exchange
    table (torch >= 2.10): the binding can then allocate arrays like x and read torch's current
    stream itself, without Python."""
    info = _TORCH_DLPACK if _TORCH_DLPACK is not None else _torch_dlpack()
    return info is not None and info[2] and type(x) is info[0]


def call_op(op, *args: Any, **kwargs: Any) -> Any:
    """op(*args, **kwargs), a binding function. From torch 2.10, torch.Tensor publishes DLPack's C
    exchange table (`__dlpack_c_exchange_api__`), through which the binding describes each tensor
    in one C call, and the arguments go as they are. Before that, every torch tensor argument is
    handed over as a DLPack capsule made by torch's C function (torch.utils.dlpack.to_dlpack): the
    binding imports it about 1 us faster, on an H200's host, than a torch tensor through its Python
    __dlpack__ method, and a decode run() passes up to 10 (bench/NOTES.md, sessions 70 and 95). A
    capsule is consumed by the call that imports it, so they are made here, for this call."""
    if _TORCH_DLPACK is None and _torch_dlpack() is None:  # no torch tensor can exist
        return op(*args, **kwargs)
    tensor, to, exchange = _TORCH_DLPACK
    if exchange:
        return op(*args, **kwargs)
    # A negation view stays a tensor: the binding refuses it by name, where to_dlpack would drop
    # its sign.
    try:
        args = [to(a) if type(a) is tensor and not a.is_neg() else a for a in args]
        kwargs = {k: to(v) if type(v) is tensor and not v.is_neg() else v for k, v in kwargs.items()}
    except Exception:  # one to_dlpack refuses: convert one by one, passing those as they are
        args = [_capsule(a, to) if type(a) is tensor and not a.is_neg() else a for a in args]
        kwargs = {k: _capsule(v, to) if type(v) is tensor and not v.is_neg() else v for k, v in kwargs.items()}
    return op(*args, **kwargs)


def _torch_dtype(torch, dtype):
    if dtype is None:
        return None
    return {"float32": torch.float32, "uint8": torch.uint8, "int32": torch.int32}[dtype]


def empty(like: Any, shape: Sequence[int], dtype: Optional[str] = None) -> Any:
    """An uninitialised array of `shape` in the framework and on the device of `like`, with
    `like`'s dtype or `dtype` ("float32", "int32" or "uint8")."""
    shape = tuple(map(int, shape))
    fw = framework(like)
    if fw == "torch":
        if dtype is None:
            return like.new_empty(shape)  # like's dtype and device; the fastest torch path
        import torch

        return like.new_empty(shape, dtype=_torch_dtype(torch, dtype))
    if fw == "cupy":
        import cupy

        with like.device:
            return cupy.empty(shape, dtype=dtype or like.dtype)
    if fw == "jax":
        if is_cuda(like):
            raise NotImplementedError(
                "jax arrays on a GPU are not supported yet (outputs are allocated on the host for "
                "jax); pass torch or cupy arrays, or jax arrays on the CPU"
            )
        return np.empty(shape, dtype=dtype or np.dtype(like.dtype))
    if fw == "numpy":
        return np.empty(shape, dtype=dtype or like.dtype)
    # Another DLPack producer: fall back to numpy buffers on the host.
    return np.empty(shape, dtype=dtype or np.dtype(str(like.dtype)))


def finalize(like: Any, x: Any) -> Any:
    """Turn an output allocated by `empty(like, ...)` into what the caller expects back."""
    if x is None or framework(like) != "jax":
        return x
    import jax

    devices = like.devices() if hasattr(like, "devices") else None
    device = next(iter(devices)) if devices else None
    return jax.device_put(x, device)


def _torch_current_stream(torch, device) -> int:
    """The cudaStream_t of torch's current stream on `device`: through torch's raw accessor (the one
    Triton's launcher uses, ~1 us) where torch has it, else torch.cuda.current_stream (~8 us a call
    on an H200's host, which every op call paid; bench/NOTES.md, session 69)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device.index))
    return int(torch.cuda.current_stream(device).cuda_stream)


def cuda_stream_of(like: Any) -> int:
    """The caller's current stream for CUDA tensors (torch, cupy), 0 (the default stream; unused
    on the CPU) otherwise."""
    fw = framework(like)
    if fw == "torch" and like.is_cuda:
        import torch

        return _torch_current_stream(torch, like.device)
    if fw == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def exec_kwargs(like: Any) -> dict:
    """cuda_stream for the binding (cuda_stream_of) as a keyword argument."""
    return {"cuda_stream": cuda_stream_of(like)}


def is_cuda(x: Any) -> bool:
    fw = framework(x)
    if fw == "torch":
        return bool(x.is_cuda)
    if fw == "cupy":
        return True
    if fw == "jax":
        dev = next(iter(x.devices())) if hasattr(x, "devices") else None
        return dev is not None and dev.platform == "gpu"
    return False


def shape_or_zero(x: Any, ndim: int, dim: int) -> int:
    """x.shape[dim] when x has `ndim` dimensions, else 0. Used to size optional outputs before the
    C++ op validates the inputs: a wrong input shape then yields the op's own error message."""
    shape = tuple(x.shape)
    if len(shape) != ndim:
        return 0
    return int(shape[dim])


def transpose2d(x: Any) -> Any:
    """The (n, m) -> (m, n) transpose as a view, in any framework."""
    return x.T


def window_pair(window_size: Any) -> Tuple[int, int]:
    """(left, right) from flash_attn's window_size, checking only the Python types."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(
            f"window_size must be a pair (left, right) of ints, got {window_size!r}"
        ) from None
    try:
        return as_int(left, "window_size[0]"), as_int(right, "window_size[1]")
    except TypeError:
        raise TypeError(
            f"window_size must be a pair (left, right) of ints, got {window_size!r}"
        ) from None


def optional_float(value: Any, name: str) -> Optional[float]:
    return None if value is None else as_float(value, name)


def as_float(value: Any, name: str) -> float:
    """A Python float from a number (int, float, numpy scalar, 0-d tensor); TypeError otherwise."""
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def as_int(value: Any, name: str) -> int:
    """A Python int from an integer (int, numpy integer, integer 0-d tensor); TypeError otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


# ---- for planning on the host: index arrays read back, dtype names, devices, workspaces ------


def host_ints(x) -> np.ndarray:
    """An int64 numpy copy of an index array (torch / cupy on a GPU: a device-to-host copy)."""
    fw = framework(x)
    if fw == "torch":
        return x.detach().cpu().numpy().astype(np.int64)
    if fw == "cupy":
        return x.get().astype(np.int64)
    return np.asarray(x).astype(np.int64)


def _upload(host: np.ndarray, dst: Any) -> None:
    """dst (a torch or cupy GPU array of host's shape, int32) = host, ordered on the caller's
    current stream without waiting for it (fastattn::copy_host_to_device: staged in the library's
    pinned memory, so `host` may change as soon as this returns). torch's and cupy's own copies
    from pageable memory wait for the stream: plan() would wait for the GPU's queued work."""
    from . import _C

    call_op(_C.copy_host_to_device, np.ascontiguousarray(host, dtype=np.int32), dst, **exec_kwargs(dst))


def write_ints(dst: Any, host: np.ndarray) -> None:
    """Copy the int32 numpy array `host` into dst[:host.size] in place: for torch and cupy on a
    GPU, a host-to-device copy ordered on the caller's current stream that does not wait for it."""
    fw = framework(dst)
    n = int(host.size)
    if fw in ("torch", "cupy") and is_cuda(dst):
        _upload(host, dst[:n])
    elif fw == "torch":
        dst[:n] = _torch_from_host(host)
    elif fw == "numpy":
        dst[:n] = host
    else:
        raise TypeError(f"cannot write into a {type(dst).__name__} in place (torch, cupy or numpy)")


def can_copy_on_device(dst: Any, src: Any) -> bool:
    """Whether copy_on_device(dst, src, ...) copies: both GPU arrays of one framework (torch or
    cupy)."""
    fw = framework(dst)
    return fw in ("torch", "cupy") and framework(src) == fw and is_cuda(dst) and is_cuda(src)


def copy_on_device(dst: Any, src: Any, start: int, n: int) -> bool:
    """dst[:n] = src[start:start + n] without a trip through the host, ordered on the caller's
    current stream, when both are GPU arrays of one framework (torch or cupy). Returns False (and
    copies nothing) otherwise."""
    if not can_copy_on_device(dst, src):
        return False
    fw = framework(dst)
    if fw == "torch":
        dst[:n].copy_(src.reshape(-1)[start:start + n])
    else:
        dst[:n] = src.reshape(-1)[start:start + n]
    return True


def device_int32_vector(x: Any, like: Any) -> bool:
    """Whether a kernel on like's GPU can read x in place: a contiguous 1-D int32 array of like's
    framework (torch or cupy) on like's device."""
    fw = framework(like)
    if fw == "torch":  # torch's own attributes: ~0.5 us where the generic checks took ~1.7
        import torch

        return (framework(x) == "torch" and x.is_cuda and like.is_cuda and x.dim() == 1
                and x.dtype == torch.int32 and x.is_contiguous()
                and x.get_device() == like.get_device())
    if fw != "cupy" or framework(x) != fw:
        return False
    if len(x.shape) != 1 or dtype_name(x.dtype) != "int32":
        return False
    return bool(x.flags.c_contiguous) and x.device.id == like.device.id


def usable_workspace(ws, like) -> bool:
    """A caller's buffer the GPU op can use as scratch: a contiguous uint8 array on like's device."""
    if framework(ws) != framework(like) or not is_cuda(ws):
        return False
    if "uint8" not in str(ws.dtype):
        return False
    if framework(ws) == "torch":
        return ws.is_contiguous() and ws.device == like.device
    return bool(getattr(ws, "flags", None) is not None and ws.flags.c_contiguous)


def dtype_name(dtype: Any) -> str:
    """'float16' from torch.float16, numpy.float16, numpy.dtype('float16'), 'float16',
    'torch.float16', 'half', ..."""
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        return np.dtype(dtype).name  # a numpy scalar type: str() gives "<class 'numpy.float16'>"
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    return {"half": "float16", "float": "float32", "bfloat": "bfloat16"}.get(name, name)


# FlashInfer's page layouts: a page (page_size, num_kv_heads, head_dim) ("NHD") or
# (num_kv_heads, page_size, head_dim) ("HND").
KV_LAYOUTS = ("NHD", "HND")


def check_kv_layout(kv_layout: Any) -> str:
    """kv_layout if it is "NHD" or "HND", else a ValueError naming it."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be 'NHD' (pages (max_num_pages, 2, page_size, "
                         f"num_kv_heads, head_dim)) or 'HND' (pages (max_num_pages, 2, num_kv_heads, "
                         f"page_size, head_dim)), got {kv_layout!r}")
    return kv_layout


def paged_kv_pages(cache: Any, name: str, kv_layout: str = "NHD") -> Tuple[Any, Any]:
    """(k_pages, v_pages) of FlashInfer's paged cache `cache` in its layout: a tuple of two
    arrays, or one (max_num_pages, 2, page_size, num_kv_heads, head_dim) array (NHD; HND: (...,
    2, num_kv_heads, page_size, head_dim)) split into strided views (no copy), in the same
    layout. Errors name `name`; the pages' own shapes are checked by the caller or the op."""
    if isinstance(cache, (tuple, list)):
        if len(cache) != 2:
            raise ValueError(f"{name} given as a tuple must be (k_pages, v_pages), got "
                             f"{len(cache)} items")
        k_pages, v_pages = cache
        check_array(k_pages, f"{name}[0]")
        check_array(v_pages, f"{name}[1]")
        return k_pages, v_pages
    check_array(cache, name)
    shape = tuple(cache.shape)
    if len(shape) != 5 or shape[1] != 2:
        dims = "page_size, num_kv_heads" if kv_layout == "NHD" else "num_kv_heads, page_size"
        raise ValueError(f"{name} must have shape (max_num_pages, 2, {dims}, head_dim) "
                         f"({kv_layout}), got {shape}")
    return cache[:, 0], cache[:, 1]


_SM_COUNTS: dict = {}  # (framework, device index) -> SMs: asked once (a few us each time)


def device_sm_count(like: Any) -> int:
    """SMs of the CUDA device `like` lives on (torch or cupy)."""
    fw = framework(like)
    if fw in ("torch", "cupy"):
        key = (fw, like.device.index if fw == "torch" else like.device.id)
        if key not in _SM_COUNTS:
            if fw == "torch":
                import torch

                count = torch.cuda.get_device_properties(like.device).multi_processor_count
            else:
                import cupy

                count = cupy.cuda.Device(like.device.id).attributes["MultiProcessorCount"]
            _SM_COUNTS[key] = int(count)
        return _SM_COUNTS[key]
    raise TypeError(f"no CUDA device for a {type(like).__name__}")


def _torch_from_host(host: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(host, dtype=np.int32))


def on_device_of(like: Any, host: np.ndarray) -> Any:
    """The int32 numpy array `host` copied into the framework and onto the device of `like`; to a
    GPU without waiting for the caller's stream (see _upload)."""
    fw = framework(like)
    if fw in ("torch", "cupy") and is_cuda(like):
        out = empty(like, host.shape, "int32")
        _upload(host, out)
        return out
    if fw == "torch":
        return _torch_from_host(host)
    return host


LN2 = math.log(2.0)
