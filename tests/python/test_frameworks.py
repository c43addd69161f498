"""Array frameworks and memory layouts: numpy, torch (CPU), jax (CPU) when importable; strided
and read-only inputs; outputs come back in the caller's framework."""

import numpy as np
import pytest

import fastattn
import reference as ref
from helpers import assert_close, int32, max_abs, randn, to64


def test_version_and_backends():
    assert fastattn.__version__ == fastattn.version()
    assert len(fastattn.__version__.split(".")) == 3
    assert fastattn.backend_available("cpu") is True
    assert isinstance(fastattn.backend_available("cuda"), bool)
    assert isinstance(fastattn.backend_available("cuda:0"), bool)
    with pytest.raises(ValueError, match="device_type"):
        fastattn.backend_available("tpu")


def test_numpy_strided_and_readonly_inputs(rng):
    """Only the last dimension must be contiguous: transposed / sliced views are read in place;
    read-only arrays are fine as inputs."""
    b, s, h, d = 2, 9, 4, 32
    base, base64 = randn(rng, (b, h, s, 2 * d), "float32")  # (b, h, s, 2d) storage
    q = base.transpose(0, 2, 1, 3)[..., :d]                   # (b, s, h, d), strided
    k = base.transpose(0, 2, 1, 3)[..., d:]
    v_store, v64 = randn(rng, (b, s, h, d), "float32")
    v = v_store.copy()
    v.setflags(write=False)
    assert not q.flags.c_contiguous
    out = fastattn.flash_attn_func(q, k, v, causal=True)
    q64 = base64.transpose(0, 2, 1, 3)[..., :d]
    k64 = base64.transpose(0, 2, 1, 3)[..., d:]
    o64, _, _ = ref.attention_batched(q64, k64, v64, causal=True)
    assert_close("out", out, o64, o64, "float32")


def test_strided_output(rng):
    """out= may be a strided view: only its rows are written."""
    q, q64 = randn(rng, (1, 5, 2, 16), "float32")
    big = np.full((1, 5, 2, 32), 3.0, np.float32)
    out = big[..., :16]
    fastattn.flash_attn_func(q, q, q, out=out)
    o64, _, _ = ref.attention_batched(q64, q64, q64)
    assert_close("out", out, o64, o64, "float32")
    assert np.all(big[..., 16:] == 3.0)


def _torch():
    return pytest.importorskip("torch")


def test_torch_cpu_tensors(rng):
    torch = _torch()
    q, q64 = randn(rng, (2, 7, 4, 32), "float32")
    tq = torch.from_numpy(q.copy()).requires_grad_(True)  # detached internally (forward only)
    out, lse = fastattn.flash_attn_func(tq, tq, tq, causal=True, return_softmax_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert isinstance(lse, torch.Tensor) and lse.shape == (2, 4, 7)
    o64, _, _ = ref.attention_batched(q64, q64, q64, causal=True)
    assert_close("out", out, o64, o64, "float32")


def test_torch_strided_views(rng):
    torch = _torch()
    qkv = torch.randn(2, 11, 3, 4, 32, dtype=torch.float16)
    q, k, v = qkv.unbind(2)
    out = fastattn.flash_attn_func(q, k, v)
    packed = fastattn.flash_attn_qkvpacked_func(qkv)
    assert torch.equal(out, packed)
    ref64, _, _ = ref.attention_batched(to64(q), to64(k), to64(v))
    naive, _, _ = ref.attention_batched(to64(q), to64(k), to64(v), rnd=ref.rounder("float16"))
    assert_close("out", out, ref64, naive, "float16")


def test_torch_varlen_and_kvcache_int32_tensors(rng):
    torch = _torch()
    lens = [3, 0, 6]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    q = torch.randn(9, 4, 16)
    out = fastattn.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, causal=True)
    assert isinstance(out, torch.Tensor)
    o64, _, _ = ref.attention_varlen(to64(q), cu.numpy(), to64(q), to64(q), cu.numpy(),
                                     causal=True)
    assert_close("out", out, o64, o64, "float32")
    kc = torch.zeros(3, 8, 2, 16)
    vc = torch.zeros(3, 8, 2, 16)
    k = torch.randn(3, 1, 2, 16)
    seqlens = torch.tensor([0, 2, 7], dtype=torch.int32)
    fastattn.flash_attn_with_kvcache(torch.randn(3, 1, 4, 16), kc, vc, k, k.clone(),
                                     cache_seqlens=seqlens)
    for b, s in enumerate([0, 2, 7]):
        assert torch.equal(kc[b, s], k[b, 0])


def test_torch_tensors_that_require_grad_in_every_call(rng):
    """Tensors that require grad are read detached (forward only) by flash_attn_varlen_func and
    flash_attn_with_kvcache too, whose torch tensors skip the generic array checks; called twice,
    so the second call takes that path with torch already known. The caches appended into keep
    their requires_grad and get the new key."""
    torch = _torch()
    lens = [4, 1, 5]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    q64 = rng.standard_normal((10, 4, 16))
    kv64 = rng.standard_normal((10, 2, 16))
    q = torch.from_numpy(q64).float().requires_grad_(True)
    kv = torch.from_numpy(kv64).float().requires_grad_(True)
    o64, _, _ = ref.attention_varlen(q.detach().double().numpy(), cu.numpy(), kv.detach().double().numpy(),
                                     kv.detach().double().numpy(), cu.numpy(), causal=True)
    for _ in range(2):
        out = fastattn.flash_attn_varlen_func(q, kv, kv, cu, cu, 5, 5, causal=True)
        assert type(out) is torch.Tensor and not out.requires_grad
        assert_close("varlen out", out, o64, o64, "float32")
    cache = torch.from_numpy(rng.standard_normal((2, 8, 2, 16))).float()
    k_new = torch.from_numpy(rng.standard_normal((2, 1, 2, 16))).float()
    q_dec = torch.from_numpy(rng.standard_normal((2, 1, 4, 16))).float().requires_grad_(True)
    seqlens = torch.tensor([2, 6], dtype=torch.int32)
    for _ in range(2):
        kc, vc = cache.clone().requires_grad_(True), cache.clone().requires_grad_(True)
        out = fastattn.flash_attn_with_kvcache(q_dec, kc, vc, k_new, k_new, cache_seqlens=seqlens)
        assert kc.requires_grad and torch.equal(kc[0, 2], k_new[0, 0]) and torch.equal(vc[1, 6], k_new[1, 0])
        for b, n in enumerate((3, 7)):
            keys = kc.detach()[b : b + 1, :n].double().numpy()
            o_ref, _, _ = ref.attention_batched(q_dec.detach()[b : b + 1].double().numpy(), keys, keys)
            assert_close(f"kvcache out[{b}]", out[b : b + 1], o_ref, o_ref, "float32")


def test_torch_int64_cache_seqlens_rejected():
    torch = _torch()
    q = torch.randn(1, 1, 2, 16)
    kc = torch.zeros(1, 4, 2, 16)
    with pytest.raises(TypeError, match="cache_seqlens"):
        fastattn.flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=torch.tensor([1]))


def test_mixed_numpy_indices_with_torch_data(rng):
    torch = _torch()
    q = torch.randn(5, 2, 16)
    cu = int32([0, 2, 5])
    out = fastattn.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3)
    assert isinstance(out, torch.Tensor)


def test_jax_cpu_arrays(rng):
    """jax arrays on the CPU, placed there explicitly: where jax has a GPU, its default device is
    that GPU, and fastattn does not take jax arrays on a GPU yet."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    with jax.default_device(jax.devices("cpu")[0]):
        check_jax_cpu_arrays(rng, jax, jnp)


def check_jax_cpu_arrays(rng, jax, jnp):
    q, q64 = randn(rng, (1, 6, 2, 16), "float32")
    jq = jnp.asarray(q)
    out, lse = fastattn.flash_attn_func(jq, jq, jq, return_softmax_lse=True)
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    o64, _, _ = ref.attention_batched(q64, q64, q64)
    assert max_abs(np.asarray(out), o64) <= 1e-5
    with pytest.raises(TypeError, match="k_cache"):
        kc = jnp.zeros((1, 8, 2, 16), jnp.float32)
        fastattn.flash_attn_with_kvcache(jq[:, :1], kc, kc, jq[:, :1], jq[:, :1],
                                         cache_seqlens=0)
    # FlashInfer's single decode, HND keys as a swapped view of a jax array, v_scale on the host copy
    jk = jnp.asarray(np.ascontiguousarray(q[0].swapaxes(0, 1)))  # (2, 6, 16): HND
    out, lse = fastattn.single_decode_with_kv_cache(jq[0, 5], jk, jk, kv_layout="HND", v_scale=2.0,
                                                    return_lse=True)
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    o64, l64, _ = ref.attention_rows(q64[0, 5:], q64[0], q64[0], np.array([5]), np.arange(6),
                                     ref.default_scale(16, None))
    assert max_abs(np.asarray(out), 2.0 * o64[0]) <= 1e-5 and max_abs(np.asarray(lse), l64[:, 0]) <= 1e-5


def test_cuda_tensors_without_kernels():
    """CUDA tensors reach the C++ op (with the current stream); in a build without kernels the
    op answers NotImplementedError."""
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if fastattn.backend_available("cuda"):
        pytest.skip("this build has CUDA kernels (tests/gpu covers them)")
    q = torch.randn(1, 4, 2, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(NotImplementedError):
        fastattn.flash_attn_func(q, q, q)
