"""Shared test helpers: inputs in each dtype, poisoned outputs, the tolerance rule.

dtypes: float32 and float16 are numpy arrays; bfloat16 inputs are torch tensors (numpy has no
bfloat16), so bfloat16 tests skip when torch is not importable.

Tolerance (FlashAttention's rule, DESIGN.md): with ref64 the float64 reference and naive the same
naive computation done in the input dtype (reference.rounder),
    max|ours - ref64| <= factor * max|naive - ref64| + slack
with factor 2 (3 for KV-cache tests). slack is 1e-5 for float16 / bfloat16. For float32 inputs the
naive float32 error is ~1e-7 and says little about a tiled online softmax's different summation
order, so slack is 1e-5 relative to the magnitude of the reference (1e-5 * max(1, max|ref64|)).
LSE (always float32, computed from the exactly representable inputs) must match to
5e-5 * (1 + |lse|) and -inf exactly where the reference is -inf.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref

try:  # torch is optional: bfloat16 tests and the seed examples need it
    import torch
except ImportError:  # pragma: no cover
    torch = None

DTYPES = [
    "float32",
    "float16",
    pytest.param("bfloat16", marks=pytest.mark.skipif(torch is None, reason="bfloat16 needs torch")),
]


def randn(rng, shape, dtype, scale=1.0):
    """Random normal array in `dtype` (torch tensor for bfloat16) and its exact float64 values."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if dtype == "bfloat16":
        t = torch.from_numpy(x).to(torch.bfloat16)
        return t, t.float().numpy().astype(np.float64)
    a = x.astype(dtype)
    return a, a.astype(np.float64)


def like_framework(x, values, dtype=None):
    """`values` (numpy) as an array of x's framework (torch for torch inputs)."""
    if torch is not None and isinstance(x, torch.Tensor):
        t = torch.from_numpy(np.ascontiguousarray(values))
        return t if dtype is None else t.to(dtype)
    return np.ascontiguousarray(values)


def nan_like(x, shape=None):
    """An output buffer of x's framework and dtype filled with NaN (poisoned)."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if torch is not None and isinstance(x, torch.Tensor):
        return torch.full(shape, float("nan"), dtype=x.dtype)
    return np.full(shape, np.nan, dtype=x.dtype)


def to64(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().float().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def int32(values):
    return np.ascontiguousarray(np.asarray(values, dtype=np.int32))


def max_abs(a, b):
    """max |a - b| (inf on NaN); equal infinities count as equal."""
    a, b = to64(a), to64(b)
    if a.size == 0:
        return 0.0
    same_inf = np.isinf(a) & (a == b)
    with np.errstate(invalid="ignore"):
        d = np.where(same_inf, 0.0, np.abs(a - b))
    if np.isnan(d).any():
        return float("inf")
    return float(d.max())


def assert_close(name, ours, ref64, naive, dtype, factor=2.0):
    """FlashAttention's criterion (see the module docstring)."""
    ours = to64(ours)
    assert ours.shape == ref64.shape, f"{name}: shape {ours.shape} != {ref64.shape}"
    nan = np.isnan(ours)
    assert not nan.any(), f"{name}: {int(nan.sum())} NaN values (unwritten poisoned output?) " \
                          f"first at {tuple(np.argwhere(nan)[0])}"
    err = max_abs(ours, ref64)
    base = max_abs(naive, ref64)
    if dtype == "float32":
        slack = 1e-5 * max(1.0, float(np.abs(ref64).max()) if ref64.size else 1.0)
    else:
        slack = 1e-5
    tol = factor * base + slack
    if not err <= tol:
        worst = np.unravel_index(np.argmax(np.abs(ours - ref64)), ours.shape)
        raise AssertionError(
            f"{name}: max|ours - ref64| = {err:.3g} > {factor} * naive error {base:.3g} + "
            f"{slack:.1g} (worst at {worst}: ours {ours[worst]!r}, ref {ref64[worst]!r})"
        )


def assert_lse(name, ours, ref64, rel=5e-5, naive=None, factor=3.0):
    """LSE check. With `naive` (the LSE of the naive-in-dtype computation) the bound also allows
    factor * its error: needed where the op itself rounds to the input dtype before the scores
    (rotary-embedded q / k are rounded to the cache dtype)."""
    ours = to64(ours)
    assert ours.shape == ref64.shape, f"{name}: shape {ours.shape} != {ref64.shape}"
    assert not np.isnan(ours).any(), f"{name}: NaN in LSE"
    ninf_ref, ninf = np.isneginf(ref64), np.isneginf(ours)
    if not np.array_equal(ninf_ref, ninf):
        bad = np.argwhere(ninf_ref != ninf)[0]
        raise AssertionError(f"{name}: -inf pattern differs at {tuple(bad)}: ours "
                             f"{ours[tuple(bad)]!r}, ref {ref64[tuple(bad)]!r}")
    fin = ~ninf_ref
    if fin.any():
        err = np.abs(ours[fin] - ref64[fin])
        tol = rel * (1.0 + np.abs(ref64[fin]))
        if naive is not None:
            tol = tol + factor * max_abs(naive[fin], ref64[fin])
        assert np.all(err <= tol), (
            f"{name}: LSE error {err.max():.3g} exceeds {rel} * (1 + |lse|)"
        )


def assert_probs(name, ours, ref64, atol=3e-5):
    ours = to64(ours)
    assert ours.shape == ref64.shape, f"{name}: shape {ours.shape} != {ref64.shape}"
    err = max_abs(ours, ref64)
    assert err <= atol, f"{name}: max|probs - ref| = {err:.3g} > {atol}"


def naive_and_exact(fn, dtype, *args, **kwargs):
    """(exact float64 result, naive-in-dtype result) of a reference function taking rnd=."""
    exact = fn(*args, rnd=None, **kwargs)
    naive = fn(*args, rnd=ref.rounder(dtype), **kwargs)
    return exact, naive


def alibi_slopes(rng, shape):
    return (rng.uniform(0.05, 0.6, size=shape)).astype(np.float32)


def draw_sinks(rng, heads, dtype):
    """Attention sinks (heads,) float32 near the scores' scale, so they move the outputs; a torch
    tensor for bfloat16 (numpy has no bfloat16, so those cases run through torch)."""
    s = (rng.standard_normal(heads) * 2.0).astype(np.float32)
    return torch.from_numpy(s) if dtype == "bfloat16" else s
