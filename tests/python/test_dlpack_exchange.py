"""The binding's import of arrays through DLPack's C exchange table (`__dlpack_c_exchange_api__`,
DLPack 1.3; torch.Tensor has one from torch 2.10).

A test producer, ExchangeArray, wraps a numpy array and publishes a table of C functions made
with ctypes, so the path runs on the CPU with any torch or none. Each test calls the binding's
ops directly with such arrays and checks the answer against a float64 reference, what the
producer exported and released, and the errors that name the argument. A producer may also
allocate: then the kvcache, varlen and dense ops, the decode runner and the merge ops take their
outputs from it when none is given. The negation-view refusal is checked with torch's own tensors."""

import ctypes

import numpy as np
import pytest

from fastattn import _C

import reference as ref


# ---- DLPack 1.x structs (the ABI the binding reads) -------------------------------------------


class Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", Device),
        ("ndim", ctypes.c_int32),
        ("dtype", DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class ManagedTensor(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(ManagedTensor))
ManagedTensor._fields_ = [
    ("version", Version),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", DELETER),
    ("flags", ctypes.c_uint64),
    ("dl_tensor", DLTensor),
]


class Header(ctypes.Structure):
    pass


Header._fields_ = [("version", Version), ("prev_api", ctypes.POINTER(Header))]

SET_ERROR = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p)
ALLOCATOR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(DLTensor), ctypes.POINTER(ctypes.POINTER(ManagedTensor)),
                             ctypes.c_void_p, SET_ERROR)
MANAGED_FROM = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(ManagedTensor)))
TO_OBJECT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
DLTENSOR_FROM = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(DLTensor))
WORK_STREAM = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p)


class ExchangeApi(ctypes.Structure):
    _fields_ = [
        ("header", Header),
        ("managed_tensor_allocator", ALLOCATOR),
        ("managed_tensor_from_py_object_no_sync", MANAGED_FROM),
        ("managed_tensor_to_py_object_no_sync", TO_OBJECT),
        ("dltensor_from_py_object_no_sync", DLTENSOR_FROM),
        ("current_work_stream", WORK_STREAM),
    ]


_DTYPE_CODES = {np.dtype(np.float32): (2, 32), np.dtype(np.float16): (2, 16), np.dtype(np.int32): (0, 32)}

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _fill(dl: DLTensor, array) -> None:
    a = array.values
    code, bits = _DTYPE_CODES[a.dtype]
    dl.data = a.ctypes.data
    dl.device = Device(1, 0)  # kDLCPU
    dl.ndim = a.ndim
    dl.dtype = DataType(code, bits, 1)
    dl.shape = ctypes.cast(array._shape, ctypes.POINTER(ctypes.c_int64))
    dl.strides = ctypes.cast(array._strides, ctypes.POINTER(ctypes.c_int64))
    dl.byte_offset = 0


class Producer:
    """One exchange table and what it did: the exports of each kind, the deleters called, and
    (with allocates=True) the arrays it allocated (poisoned with NaN) and wrapped as its own type's
    objects. fail_allocation: the allocator fails (as a failing export, without a message)."""

    def __init__(self, *, non_owning=True, major=1, fail=False, older=None, allocates=False,
                 fail_allocation=False):
        self.non_owning_exports = 0
        self.owning_exports = 0
        self.deleted = 0
        self.allocated = 0
        self.wrapped = 0
        self.array_type = None  # set by exchange_type: what the allocator and the wrapper make
        self._live = {}  # address -> ManagedTensor, alive until its deleter runs

        def arr(ptr):
            return ctypes.cast(ptr, ctypes.py_object).value

        # A failing export returns -1 without a Python exception: ctypes would report one raised in
        # a callback and clear it. torch's refusals, with their messages, are tested on the GPU.
        def dltensor_from(obj, out):
            if fail:
                return -1
            _fill(out.contents, arr(obj))
            self.non_owning_exports += 1
            return 0

        def deleter(m):
            self.deleted += 1
            del self._live[ctypes.addressof(m.contents)]

        def managed_from(obj, out):
            if fail:
                return -1
            a = arr(obj)
            m = ManagedTensor()
            m.version = Version(major, 3)
            m.deleter = self._deleter
            m.flags = 1 if a.read_only else 0
            _fill(m.dl_tensor, a)
            self._live[ctypes.addressof(m)] = (m, a)  # the array too: the view must outlive the call
            out[0] = ctypes.pointer(m)
            self.owning_exports += 1
            return 0

        def allocate(prototype, out, error_ctx, set_error):
            if fail_allocation:  # without set_error: a ctypes call releases the GIL it needs
                return -1
            p = prototype.contents
            dtype = next(dt for dt, (code, bits) in _DTYPE_CODES.items()
                         if (code, bits) == (p.dtype.code, p.dtype.bits))
            a = self.array_type(np.full([p.shape[i] for i in range(p.ndim)], np.nan, dtype))
            m = ManagedTensor()
            m.version = Version(major, 3)
            m.deleter = self._deleter
            _fill(m.dl_tensor, a)
            self._live[ctypes.addressof(m)] = (m, a)
            out[0] = ctypes.pointer(m)
            self.allocated += 1
            return 0

        def to_object(m, out):
            # The new object owns the tensor: it leaves the live set, and holds the memory.
            _, a = self._live.pop(m)
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(a))  # the new reference the caller takes
            ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = id(a)
            self.wrapped += 1
            return 0

        self._deleter = DELETER(deleter)
        self._callbacks = (DLTENSOR_FROM(dltensor_from), MANAGED_FROM(managed_from), ALLOCATOR(allocate),
                           TO_OBJECT(to_object))
        self.api = ExchangeApi()
        self.api.header.version = Version(major, 3)
        if older is not None:
            self.api.header.prev_api = ctypes.cast(ctypes.pointer(older.api), ctypes.POINTER(Header))
        self._older = older
        self.api.managed_tensor_from_py_object_no_sync = self._callbacks[1]
        if non_owning:
            self.api.dltensor_from_py_object_no_sync = self._callbacks[0]
        if allocates:
            self.api.managed_tensor_allocator = self._callbacks[2]
            self.api.managed_tensor_to_py_object_no_sync = self._callbacks[3]
        self.capsule = _PyCapsule_New(ctypes.addressof(self.api), b"dlpack_exchange_api", None)

    def live(self):
        return len(self._live)


def exchange_type(producer: Producer):
    """A new array type whose own dictionary holds `producer`'s table. `__dlpack__` is there for
    the types that do not use the table (subclasses): numpy's."""

    class ExchangeArray:
        __dlpack_c_exchange_api__ = producer.capsule

        def __init__(self, values, read_only=False):
            self.values = values
            self.read_only = read_only
            itemsize = self.values.itemsize
            self._shape = (ctypes.c_int64 * values.ndim)(*values.shape)
            self._strides = (ctypes.c_int64 * values.ndim)(*(s // itemsize for s in values.strides))

        @property
        def shape(self):
            return self.values.shape

        def __dlpack__(self, **kwargs):
            return self.values.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.values.__dlpack_device__()

    producer.array_type = ExchangeArray
    return ExchangeArray


# ---- inputs and the float64 reference (tests/python/reference.py) -------------------------------


def draw(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def check_small_call(rng, wrap, wrap_out=None):
    """attention_forward on small fresh inputs, q, k and v handed over as wrap(array) and out as
    wrap_out(array) (the numpy array itself when None), against the float64 reference."""
    q, k, v = draw(rng, 1, 2, 2, 16), draw(rng, 1, 9, 2, 16), draw(rng, 1, 9, 2, 16)
    out = np.full(q.shape, np.nan, np.float32)
    _C.attention_forward(wrap(q), wrap(k), wrap(v), wrap_out(out) if wrap_out else out)
    np.testing.assert_allclose(out, ref.attention_batched(q, k, v)[0], atol=2e-5, rtol=2e-5)


def test_inputs_take_the_non_owning_export_and_outputs_the_owning_one(rng):
    producer = Producer()
    A = exchange_type(producer)
    b, sq, sk, hq, hkv, d = 2, int(rng.integers(1, 5)), int(rng.integers(1, 40)), 4, 2, 32
    q, k, v = draw(rng, b, sq, hq, d), draw(rng, b, sk, hkv, d), draw(rng, b, sk, hkv, d)
    out = np.full((b, sq, hq, d), np.nan, np.float32)
    _C.attention_forward(A(q), A(k), A(v), A(out))
    np.testing.assert_allclose(out, ref.attention_batched(q, k, v)[0], atol=2e-5, rtol=2e-5)
    assert producer.non_owning_exports == 3  # q, k, v
    assert producer.owning_exports == 1  # out: its flags say whether it may be written
    assert producer.deleted == 1 and producer.live() == 0  # released when the call returns


def test_strided_views_keep_their_strides(rng):
    producer = Producer()
    A = exchange_type(producer)
    b, sq, sk, h, d = 2, 3, 17, 2, 32
    wide_q = draw(rng, b, sq, 2 * h, d)
    q = wide_q[:, :, ::2]  # every other head: a stride of 2 heads
    kv = draw(rng, b, sk, 2, h, d)  # k and v interleaved
    k, v = kv[:, :, 0], kv[:, :, 1]
    out = np.full((b, sq, h, d), np.nan, np.float32)
    _C.attention_forward(A(q), A(k), A(v), A(out))
    np.testing.assert_allclose(out, ref.attention_batched(q, k, v)[0], atol=2e-5, rtol=2e-5)
    assert producer.non_owning_exports == 3


def test_a_table_without_the_non_owning_export_uses_the_owning_one_for_inputs(rng):
    producer = Producer(non_owning=False)
    A = exchange_type(producer)
    check_small_call(rng, A, A)
    assert (producer.non_owning_exports, producer.owning_exports) == (0, 4)
    assert producer.deleted == 4 and producer.live() == 0


def test_a_read_only_output_is_refused_by_name_and_left_unchanged(rng):
    producer = Producer()
    A = exchange_type(producer)
    q, k, v = draw(rng, 1, 2, 2, 16), draw(rng, 1, 9, 2, 16), draw(rng, 1, 9, 2, 16)
    out = np.full(q.shape, 7.0, np.float32)
    with pytest.raises(ValueError, match=r"argument 'out': the array is read-only"):
        _C.attention_forward(A(q), A(k), A(v), A(out, read_only=True))
    assert np.all(out == 7.0)
    assert producer.live() == 0  # every export released, on the error path too


@pytest.mark.parametrize("non_owning", [True, False])
def test_a_failed_export_names_the_argument_and_leaves_the_output(rng, non_owning):
    producer = Producer(fail=True, non_owning=non_owning)
    A = exchange_type(producer)
    q, k, v = draw(rng, 1, 2, 2, 16), draw(rng, 1, 9, 2, 16), draw(rng, 1, 9, 2, 16)
    out = np.full(q.shape, 7.0, np.float32)
    with pytest.raises(TypeError, match=r"argument 'k': \S*ExchangeArray could not be described "
                                        r"through DLPack: no reason given"):
        _C.attention_forward(q, A(k), v, out)
    assert np.all(out == 7.0)


def test_the_cache_append_writes_only_its_slots(rng):
    """kvcache_attention_forward with every array from the producer: the caches are outputs
    (written in place), the new keys and the lengths inputs."""
    producer = Producer()
    A = exchange_type(producer)
    b, cap, hkv, hq, d = 3, 24, 2, 4, 16
    lens = rng.integers(0, cap - 2, size=b).astype(np.int32)
    k_cache, v_cache = draw(rng, b, cap, hkv, d), draw(rng, b, cap, hkv, d)
    k_before, v_before = k_cache.copy(), v_cache.copy()
    q, k_new, v_new = draw(rng, b, 1, hq, d), draw(rng, b, 1, hkv, d), draw(rng, b, 1, hkv, d)
    out = np.full((b, 1, hq, d), np.nan, np.float32)
    _C.kvcache_attention_forward(A(q), A(k_cache), A(v_cache), k=A(k_new), v=A(v_new),
                                 cache_seqlens=A(lens), out=A(out))
    for i in range(b):
        n = lens[i]
        expect_k, expect_v = k_before[i].copy(), v_before[i].copy()
        expect_k[n], expect_v[n] = k_new[i, 0], v_new[i, 0]
        assert np.array_equal(k_cache[i], expect_k) and np.array_equal(v_cache[i], expect_v)
        expect = ref.attention_batched(q[i:i + 1], expect_k[None, : n + 1], expect_v[None, : n + 1])[0]
        np.testing.assert_allclose(out[i:i + 1], expect, atol=2e-5, rtol=2e-5)
    assert producer.owning_exports == 3  # k_cache, v_cache, out
    assert producer.non_owning_exports == 4  # q, k, v, cache_seqlens
    assert producer.live() == 0


def test_the_cache_call_allocates_its_outputs_through_the_table(rng):
    """kvcache_attention_forward with out None and return_lse (flash_attn_with_kvcache from torch
    2.10): out and the LSE come from q's table, poisoned with NaN, as q's type's objects, and hold
    the answer; the append writes only its slots; every export and allocation is released or owned
    by its object."""
    producer = Producer(allocates=True)
    A = exchange_type(producer)
    b, cap, hkv, hq, d = int(rng.integers(1, 4)), 24, 2, 4, 16
    lens = rng.integers(0, cap - 2, size=b).astype(np.int32)
    k_cache, v_cache = draw(rng, b, cap, hkv, d), draw(rng, b, cap, hkv, d)
    k_before, v_before = k_cache.copy(), v_cache.copy()
    q, k_new, v_new = draw(rng, b, 1, hq, d), draw(rng, b, 1, hkv, d), draw(rng, b, 1, hkv, d)
    out, lse = _C.kvcache_attention_forward(A(q), A(k_cache), A(v_cache), k=A(k_new), v=A(v_new),
                                            cache_seqlens=A(lens), return_lse=True, stream_from_q=True)
    assert type(out) is A and type(lse) is A
    assert out.values.shape == (b, 1, hq, d) and out.values.dtype == np.float32
    assert lse.values.shape == (b, hq, 1) and lse.values.dtype == np.float32
    for i in range(b):
        n = lens[i]
        expect_k, expect_v = k_before[i].copy(), v_before[i].copy()
        expect_k[n], expect_v[n] = k_new[i, 0], v_new[i, 0]
        assert np.array_equal(k_cache[i], expect_k) and np.array_equal(v_cache[i], expect_v)
        keys, values = expect_k[None, : n + 1], expect_v[None, : n + 1]
        out_ref, lse_ref, _ = ref.attention_batched(q[i:i + 1], keys, values)
        np.testing.assert_allclose(out.values[i:i + 1], out_ref, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(lse.values[i:i + 1], lse_ref, atol=2e-5, rtol=2e-5)
    assert (producer.allocated, producer.wrapped) == (2, 2)
    assert producer.live() == 0


def test_an_output_given_is_returned_and_only_the_lse_allocated(rng):
    producer = Producer(allocates=True)
    A = exchange_type(producer)
    q, k_cache, v_cache = draw(rng, 1, 1, 2, 16), draw(rng, 1, 11, 2, 16), draw(rng, 1, 11, 2, 16)
    out = np.full(q.shape, np.nan, np.float32)
    got, lse = _C.kvcache_attention_forward(A(q), A(k_cache), A(v_cache), cache_seqlen=11, out=out, return_lse=True)
    assert got is out and type(lse) is A and producer.allocated == 1
    out_ref, lse_ref, _ = ref.attention_batched(q, k_cache, v_cache)
    np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse.values, lse_ref, atol=2e-5, rtol=2e-5)
    assert _C.kvcache_attention_forward(A(q), A(k_cache), A(v_cache), cache_seqlen=11, out=out) is out


def test_a_failed_allocation_names_the_output_and_writes_nothing(rng):
    """The outputs are allocated after every array is imported and before the op: an allocator's
    failure is the error, naming the output and carrying the producer's message, and the cache
    append it would have done is not done."""
    producer = Producer(allocates=True, fail_allocation=True)
    A = exchange_type(producer)
    k_cache, v_cache = draw(rng, 2, 8, 1, 16), draw(rng, 2, 8, 1, 16)
    k_before, v_before = k_cache.copy(), v_cache.copy()
    q, k_new, v_new = draw(rng, 2, 1, 2, 16), draw(rng, 2, 1, 1, 16), draw(rng, 2, 1, 1, 16)
    with pytest.raises(ValueError, match=r"argument 'out': \S*ExchangeArray could not allocate the output: "
                                         r"no reason given"):
        _C.kvcache_attention_forward(A(q), A(k_cache), A(v_cache), k=A(k_new), v=A(v_new), cache_seqlen=3)
    assert np.array_equal(k_cache, k_before) and np.array_equal(v_cache, v_before)
    assert producer.live() == 0


def test_without_an_allocator_an_output_is_required_by_name(rng):
    A = exchange_type(Producer())
    q, k_cache = draw(rng, 1, 1, 2, 16), draw(rng, 1, 5, 2, 16)
    with pytest.raises(ValueError, match=r"argument 'out' is required: \S*ExchangeArray has no DLPack exchange "
                                         r"table to allocate it through"):
        _C.kvcache_attention_forward(A(q), A(k_cache), A(k_cache), cache_seqlen=5)
    out = np.zeros(q.shape, np.float32)
    with pytest.raises(ValueError, match=r"argument 'softmax_lse' is required: \S*ExchangeArray has no DLPack "
                                         r"exchange table to allocate it through"):
        _C.kvcache_attention_forward(A(q), A(k_cache), A(k_cache), cache_seqlen=5, out=out, return_lse=True)
    assert not out.any()  # the op did not run


def test_the_decode_runner_allocates_its_outputs_through_the_table(rng):
    """The decode wrapper's run() from torch 2.10: the runner allocates out (B, Hq, D) and lse
    (B, Hq) through q's table, and they hold the answer over each request's pages."""
    producer = Producer(allocates=True)
    A = exchange_type(producer)
    b, hq, hkv, d, page = 3, 4, 2, 16, 4
    lens = rng.integers(0, 14, size=b).astype(np.int32)
    pages_per = 4
    order = rng.permutation(b * pages_per).astype(np.int32)  # each request's pages, scattered
    table = order.reshape(b, pages_per)
    cache = draw(rng, b * pages_per, 2, page, hkv, d)
    runner = _C.PagedDecodeRunner(lens, table, None, None, None, 0, b, hq, hkv, d, page, "float32", None, False,
                                  None, False)
    q = draw(rng, b, hq, d)
    out, lse = runner.run(A(q), cache, None, None, None, -1, None, 0.0, 0, None, None, True, True)
    assert type(out) is A and out.values.shape == (b, hq, d)
    assert type(lse) is A and lse.values.shape == (b, hq)
    for i in range(b):
        keys = cache[table[i], 0].reshape(-1, hkv, d)[None, : lens[i]]
        values = cache[table[i], 1].reshape(-1, hkv, d)[None, : lens[i]]
        if lens[i] == 0:  # no keys: out 0, LSE -inf
            assert not out.values[i].any() and np.isneginf(lse.values[i]).all()
            continue
        out_ref, lse_ref, _ = ref.attention_batched(q[i][None, None], keys, values)
        np.testing.assert_allclose(out.values[i], out_ref[0, 0], atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(lse.values[i], lse_ref[0, :, 0], atol=2e-5, rtol=2e-5)
    assert (producer.allocated, producer.wrapped) == (2, 2) and producer.live() == 0


def test_the_varlen_call_allocates_its_outputs_through_the_table(rng):
    """varlen_attention_forward with out None and return_lse (flash_attn_varlen_func from torch
    2.10), over ragged sequences, causal, with a padding row past cu_seqlens_q[-1]: out
    (total_q, Hq, D) and the LSE (Hq, total_q) come from q's table, poisoned with NaN, and hold
    the float64 reference's answer (the padding row: out 0, LSE -inf)."""
    producer = Producer(allocates=True)
    A = exchange_type(producer)
    b, hkv, hq, d = int(rng.integers(2, 5)), 2, 4, 16
    lens_q = rng.integers(0, 5, size=b)
    lens_k = lens_q + rng.integers(0, 9, size=b)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    total_q = int(cu_q[-1]) + 1  # one padding row
    q, k, v = draw(rng, total_q, hq, d), draw(rng, int(cu_k[-1]), hkv, d), draw(rng, int(cu_k[-1]), hkv, d)
    out, lse = _C.varlen_attention_forward(A(q), A(cu_q), int(lens_q.max()), k=A(k), v=A(v), cu_seqlens_k=A(cu_k),
                                           max_seqlen_k=int(lens_k.max()), causal=True, return_lse=True,
                                           stream_from_q=True)
    assert type(out) is A and type(lse) is A
    assert out.values.shape == (total_q, hq, d) and out.values.dtype == np.float32
    assert lse.values.shape == (hq, total_q) and lse.values.dtype == np.float32
    out_ref, lse_ref, _ = ref.attention_varlen(q, cu_q, k, v, cu_k, causal=True)
    np.testing.assert_allclose(out.values, out_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse.values, lse_ref, atol=2e-5, rtol=2e-5)
    assert (producer.allocated, producer.wrapped) == (2, 2) and producer.live() == 0
    given = np.full(q.shape, np.nan, np.float32)
    got = _C.varlen_attention_forward(A(q), A(cu_q), int(lens_q.max()), k=A(k), v=A(v), cu_seqlens_k=A(cu_k),
                                      max_seqlen_k=int(lens_k.max()), out=given, causal=True)
    assert got is given and producer.allocated == 2  # a given out is returned, nothing allocated
    np.testing.assert_allclose(given, out_ref, atol=2e-5, rtol=2e-5)


def test_the_dense_call_allocates_its_outputs_through_the_table(rng):
    """attention_forward with out None and return_lse (flash_attn_func from torch 2.10): out
    (B, Sq, Hq, D) and the LSE (B, Hq, Sq) come from q's table and hold the reference's answer."""
    producer = Producer(allocates=True)
    A = exchange_type(producer)
    b, sq, sk = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 12))
    q, k, v = draw(rng, b, sq, 4, 16), draw(rng, b, sk, 2, 16), draw(rng, b, sk, 2, 16)
    out, lse = _C.attention_forward(A(q), A(k), A(v), None, softcap=5.0, return_lse=True, stream_from_q=True)
    assert type(out) is A and out.values.shape == q.shape and out.values.dtype == np.float32
    assert type(lse) is A and lse.values.shape == (b, 4, sq) and lse.values.dtype == np.float32
    out_ref, lse_ref, _ = ref.attention_batched(q, k, v, softcap=5.0)
    np.testing.assert_allclose(out.values, out_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse.values, lse_ref, atol=2e-5, rtol=2e-5)
    assert (producer.allocated, producer.wrapped) == (2, 2) and producer.live() == 0


@pytest.mark.parametrize("call", ["dense", "varlen"])
def test_a_failed_allocation_of_a_prefill_output_names_it(rng, call):
    """As for the kvcache op: the allocator's failure is the error, naming the output; a given
    out is left as it was when the LSE's allocation fails; nothing is left alive."""
    producer = Producer(allocates=True, fail_allocation=True)
    A = exchange_type(producer)
    if call == "dense":
        q, k = draw(rng, 1, 3, 2, 16), draw(rng, 1, 5, 2, 16)

        def run(out, **kw):
            return _C.attention_forward(A(q), A(k), A(k), out, **kw)
    else:
        q, k = draw(rng, 3, 2, 16), draw(rng, 5, 2, 16)
        cu_q, cu_k = np.array([0, 3], np.int32), np.array([0, 5], np.int32)

        def run(out, **kw):
            return _C.varlen_attention_forward(A(q), A(cu_q), 3, k=A(k), v=A(k), cu_seqlens_k=A(cu_k),
                                               max_seqlen_k=5, out=out, **kw)
    with pytest.raises(ValueError, match=r"argument 'out': \S*ExchangeArray could not allocate the output: "
                                         r"no reason given"):
        run(None)
    given = np.zeros(q.shape, np.float32)
    with pytest.raises(ValueError, match=r"argument 'softmax_lse': \S*ExchangeArray could not allocate the "
                                         r"output: no reason given"):
        run(given, return_lse=True)
    assert not given.any()  # the op did not run
    assert producer.live() == 0


def test_the_merge_ops_allocate_their_outputs_through_the_table(rng):
    """merge_state and merge_states with no outputs given (the public calls from torch 2.10): v_out
    and s_out come from the table, poisoned with NaN, in v's dtype and float32, holding the float64
    reference's merge (a row empty in both states included); the in-place merges take the stream
    flag and write their v and s."""
    producer = Producer(allocates=True)
    A = exchange_type(producer)
    seq, n, h, d = int(rng.integers(1, 6)), int(rng.integers(2, 5)), 3, 16
    v_a, v_b = draw(rng, seq, h, d), draw(rng, seq, h, d)
    s_a, s_b = draw(rng, seq, h) * 3, draw(rng, seq, h) * 3
    s_a[0, 0] = s_b[0, 0] = -np.inf
    v_a[0, 0] = v_b[0, 0] = 0.0
    v_out, s_out = _C.merge_state(A(v_a), A(s_a), A(v_b), A(s_b), stream_from_v_a=True)
    assert type(v_out) is A and v_out.values.shape == (seq, h, d) and v_out.values.dtype == np.float32
    assert type(s_out) is A and s_out.values.shape == (seq, h) and s_out.values.dtype == np.float32
    v_ref, s_ref = ref.merge_state(v_a, s_a, v_b, s_b)
    np.testing.assert_allclose(v_out.values, v_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s_out.values, s_ref, atol=2e-5, rtol=2e-5)
    v, s_states = draw(rng, seq, n, h, d), draw(rng, seq, n, h) * 3
    v_out, s_out = _C.merge_states(A(v), A(s_states), stream_from_v=True)
    assert v_out.values.shape == (seq, h, d) and s_out.values.shape == (seq, h)
    v_ref, s_ref = ref.merge_states(v, s_states)
    np.testing.assert_allclose(v_out.values, v_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s_out.values, s_ref, atol=2e-5, rtol=2e-5)
    assert (producer.allocated, producer.wrapped) == (4, 4)
    v_in, s_in = v_a.copy(), s_a.copy()
    _C.merge_state_in_place(A(v_in), A(s_in), A(v_b), A(s_b), stream_from_v=True)
    v_ref, s_ref = ref.merge_state(v_a, s_a, v_b, s_b)
    np.testing.assert_allclose(v_in, v_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s_in, s_ref, atol=2e-5, rtol=2e-5)
    sinks = draw(rng, h)
    _C.merge_attention_sinks(A(v_in), A(s_in), A(sinks), stream_from_v=True)
    v_ref, s_ref = ref.merge_state(v_ref, s_ref, np.zeros_like(v_ref), np.broadcast_to(sinks, s_ref.shape))
    np.testing.assert_allclose(v_in, v_ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(s_in, s_ref, atol=2e-5, rtol=2e-5)
    assert producer.allocated == 4 and producer.live() == 0


def test_a_failed_allocation_of_a_merge_output_names_it(rng):
    """As for the attention ops: the allocator's failure names the merge's output; a given v_out is
    left as it was when s_out's allocation fails."""
    producer = Producer(allocates=True, fail_allocation=True)
    A = exchange_type(producer)
    v, s = draw(rng, 2, 3, 16), draw(rng, 2, 3)
    with pytest.raises(ValueError, match=r"argument 'v_out': \S*ExchangeArray could not allocate the output"):
        _C.merge_state(A(v), A(s), A(v), A(s))
    given = np.zeros_like(v)
    with pytest.raises(ValueError, match=r"argument 's_out': \S*ExchangeArray could not allocate the output"):
        _C.merge_state(A(v), A(s), A(v), A(s), v_out=given)
    assert not given.any()
    with pytest.raises(ValueError, match=r"argument 'v_out': \S*ExchangeArray could not allocate the output"):
        _C.merge_states(A(v[:, None]), A(s[:, None]))
    assert producer.live() == 0


def test_a_subclass_goes_through_dunder_dlpack_not_the_inherited_table(rng):
    producer = Producer()
    A = exchange_type(producer)

    class Sub(A):
        pass

    check_small_call(rng, Sub)
    assert producer.non_owning_exports == 0 and producer.owning_exports == 0


def test_a_newer_table_is_walked_back_to_its_major_version_1(rng):
    older = Producer()
    newer = Producer(major=2, older=older)
    A = exchange_type(newer)
    check_small_call(rng, A, A)
    assert (older.non_owning_exports, older.owning_exports) == (3, 1)
    assert (newer.non_owning_exports, newer.owning_exports) == (0, 0)


def test_a_table_of_another_major_version_alone_is_not_used(rng):
    producer = Producer(major=2)
    A = exchange_type(producer)
    check_small_call(rng, A)  # through __dlpack__
    assert producer.non_owning_exports == 0 and producer.owning_exports == 0


def test_torch_negation_views_are_refused_by_name():
    """DLPack has no negation bit: torch.utils.dlpack.to_dlpack exports such a view's values
    without their sign, so the binding refuses it, as torch's __dlpack__ does."""
    torch = pytest.importorskip("torch")
    import fastattn

    q, k, v = torch.randn(2, 3, 4, 32), torch.randn(2, 11, 2, 32), torch.randn(2, 11, 2, 32)
    with pytest.raises(ValueError, match=r"argument 'q': the tensor is a lazy negation view"):
        fastattn.flash_attn_func(torch._neg_view(q), k, v)
    with pytest.raises(ValueError, match=r"argument 'v_cache': the tensor is a lazy negation view"):
        fastattn.flash_attn_with_kvcache(q, k, torch._neg_view(v), cache_seqlens=11)
    out = torch.full_like(q, 7.0)
    with pytest.raises(ValueError, match=r"argument 'k': the tensor is a lazy negation view"):
        _C.attention_forward(q, torch._neg_view(k), v, out)  # a tensor handed over directly
    assert bool((out == 7.0).all())
    # The resolved view is read with its sign.
    got = fastattn.flash_attn_func(torch._neg_view(q).resolve_neg(), k, v)
    expect = ref.attention_batched(-q.numpy(), k.numpy(), v.numpy())[0]
    np.testing.assert_allclose(got.numpy(), expect, atol=2e-5, rtol=2e-5)
