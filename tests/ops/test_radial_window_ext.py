"""Tests of the compiled CPU kernel of window attention (effnn._C, csrc/window_attention_cpu.cpp),
the ``ext`` backend of ``effnn::window_attention``.

The extension is opt-in (EFFNN_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .);
without it this module is skipped. The kernel is compared with the reference backend (itself
checked against the brute force of tests/naive.py in tests/ops/test_radial_window_op.py) for the
output and every gradient, the position tables included: to 1e-10 in float64, to float32
rounding in float32, and once directly against the brute force.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

_C = pytest.importorskip("effnn._C")

import effnn  # noqa: E402
from effnn.ops import radial_window as rw  # noqa: E402
from effnn.ops._dispatch import BackendError  # noqa: E402
from effnn.ops.radial_window import (  # noqa: E402
    cart2sphere,
    radial_window_attention,
    window_attention,
)
from tests.naive import window_attention_naive  # noqa: E402

pytestmark = pytest.mark.ext

A = 0.0125


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cloud(n, clouds=2, spread=(8.0, 8.0, 1.0), dtype=torch.float64):
    xyz = torch.randn(n, 3, dtype=dtype) * torch.tensor(spread, dtype=dtype)
    return xyz, torch.randint(0, clouds, (n,))


def leaves(n, h, d, rows, dtype=torch.float64):
    qkv = [torch.randn(n, h, d, dtype=dtype, requires_grad=True) for _ in range(3)]
    if rows is None:
        return qkv
    return qkv + [(0.3 * torch.randn(rows, 3, h, d, dtype=dtype)).requires_grad_() for _ in range(3)]


def both_backends(fn, ins):
    """Output and gradients of every input for backend="ref" and backend="ext"."""
    results = []
    g = None
    for backend in ("ref", "ext"):
        out = fn(backend)
        g = torch.randn_like(out) if g is None else g
        results.append((out, *torch.autograd.grad(out, ins, g)))
    return results


def assert_close(results, atol, rtol=0.0):
    ref, ext = results
    for a, b in zip(ref, ext, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol)


def test_auto_picks_the_kernel_on_cpu():
    q = torch.zeros(3, 2, 4)
    assert rw.choose_backend(q) == "ext"
    assert rw.choose_backend(q, "ext") == "ext"
    with pytest.raises(BackendError, match="CPU kernels only"):
        rw.choose_backend(torch.zeros(3, 2, 4, device="meta"), "ext")


@pytest.mark.parametrize("origin", ["fixed", "batch_min"])
@pytest.mark.parametrize("window", [(40.0, 30.0, 120.0), (10.0, 10.0, 120.0), (90.0, 60.0, 6.0)])
def test_radial_exp_split_matches_reference(origin, window):
    N, h, d, L = 90, 2, 5, 4
    xyz, batch = cloud(N)
    ins = leaves(N, h, d, 2 * L)
    quant = [w / L for w in window]
    res = both_backends(lambda b: radial_window_attention(
        *ins[:3], xyz, batch, window, table_q=ins[3], table_k=ins[4], table_v=ins[5],
        quant_size=quant, a=0.5, origin=origin, backend=b), ins)
    assert_close(res, atol=1e-10)


@pytest.mark.parametrize("origin", ["fixed", "batch_min"])
def test_cubic_windows_match_reference(origin):
    N, h, d, L = 80, 3, 4, 3
    xyz, batch = cloud(N, spread=(2.0, 2.0, 1.0))
    ins = leaves(N, h, d, 2 * L - 1)
    res = both_backends(lambda b: window_attention(
        *ins[:3], xyz, batch, 1.5, table_q=ins[3], table_k=ins[4], table_v=ins[5],
        quant_size=0.5, origin=origin, scale=0.3, backend=b), ins)
    assert_close(res, atol=1e-10)


def test_without_position_encoding_matches_reference():
    N, h, d = 60, 2, 7
    xyz, batch = cloud(N, spread=(2.0, 2.0, 2.0))
    ins = leaves(N, h, d, None)
    res = both_backends(lambda b: window_attention(*ins, xyz, batch, [1.0, 2.0, 1.5], backend=b), ins)
    assert_close(res, atol=1e-10)


def test_matches_naive():
    N, h, d, L = 70, 2, 9, 3
    xyz, batch = cloud(N)
    ins = leaves(N, h, d, 2 * L)
    window, quant = (40.0, 30.0, 120.0), (40 / 3, 10.0, 40.0)
    out = radial_window_attention(*ins[:3], xyz, batch, window, table_q=ins[3], table_k=ins[4],
                                  table_v=ins[5], quant_size=quant, a=0.5, backend="ext")
    ref = window_attention_naive(*ins[:3], cart2sphere(xyz), batch, window, d**-0.5, "fixed",
                                 ins[3:], quant, 0.5)
    g = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_large_windows_span_several_query_blocks():
    # windows of more than the kernel's 64-query block (and a window of one point)
    N, h, d, L = 300, 2, 16, 24
    xyz, batch = cloud(N, clouds=1, spread=(3.0, 3.0, 3.0))
    xyz[0] = torch.tensor([100.0, 100.0, 100.0], dtype=torch.float64)
    ins = leaves(N, h, d, 2 * L)
    res = both_backends(lambda b: radial_window_attention(
        *ins[:3], xyz, batch, (200.0, 200.0, 120.0), table_q=ins[3], table_k=ins[4],
        table_v=ins[5], backend=b), ins)
    assert_close(res, atol=1e-10)


def test_official_sizes_float32():
    # SphereFormer level 1: 2 deg x 2 deg x 120 m windows, 24 bins, a = 0.0125, head_dim 16
    N, h, d, L = 400, 2, 16, 24
    ang = torch.rand(N, 2, dtype=torch.float64)
    r = 2 + 60 * torch.rand(N, dtype=torch.float64)
    az, el = torch.deg2rad(4 * ang[:, 0]), torch.deg2rad(-2 - 4 * ang[:, 1])
    xyz = torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], -1) * r[:, None]
    xyz, batch = xyz.float(), torch.zeros(N, dtype=torch.long)
    ins = leaves(N, h, d, 2 * L, torch.float32)
    res = both_backends(lambda b: radial_window_attention(
        *ins[:3], xyz, batch, (2.0, 2.0, 120.0), table_q=ins[3], table_k=ins[4], table_v=ins[5],
        backend=b), ins)
    assert_close(res, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    N, h, d, L = 64, 2, 16, 4
    xyz, batch = cloud(N)
    ins = [t.detach().to(dtype).requires_grad_() for t in leaves(N, h, d, 2 * L)]
    res = both_backends(lambda b: radial_window_attention(
        *ins[:3], xyz, batch, (40.0, 30.0, 120.0), table_q=ins[3], table_k=ins[4], table_v=ins[5],
        quant_size=(10.0, 7.5, 30.0), a=0.5, backend=b), ins)
    # both compute in float32 and round once to `dtype`: at most a rounding step apart
    assert_close(res, atol=2e-2 if dtype == torch.bfloat16 else 2e-3, rtol=2e-2)


def test_modules_match_reference():
    # q, k, v reach the kernel as strided views of the fused qkv projection
    torch.manual_seed(0)
    xyz = torch.cat([torch.randn(120, 3) * 10, torch.randn(80, 3) * 10])
    batch = torch.cat([torch.zeros(120, dtype=torch.long), torch.ones(80, dtype=torch.long)])
    x = torch.randn(200, 32)
    for make in (lambda b: effnn.RadialWindowAttention(32, 2, (20, 20, 120), backend=b),
                 lambda b: effnn.SphereFormerAttention(32, 2, window_size=3.0,
                                                       window_size_sphere=(20, 20, 80), backend=b)):
        ref, ext = make("ref"), make("ext")
        ext.load_state_dict(ref.state_dict())
        outs = []
        for m in (ref, ext):
            y = m(x, xyz, batch=batch)
            y.square().sum().backward()
            outs.append((y, *[p.grad for p in m.parameters()]))
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_baseline_isa_build_matches_reference(monkeypatch, dtype):
    # the loops compiled without AVX2 (what CPUs without it run), forced through the test knob
    monkeypatch.setenv("EFFNN_EXT_BASELINE_ISA", "1")
    N, h, d, L = 150, 2, 16, 4
    xyz, batch = cloud(N, dtype=dtype)
    ins = leaves(N, h, d, 2 * L, dtype)
    res = both_backends(lambda b: radial_window_attention(
        *ins[:3], xyz, batch, (40.0, 30.0, 120.0), table_q=ins[3], table_k=ins[4],
        table_v=ins[5], quant_size=(10.0, 7.5, 30.0), a=0.5, backend=b), ins)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close(res, atol=tol, rtol=tol)


def test_gradcheck():
    N, h, d, L = 10, 2, 3, 2
    xyz, batch = cloud(N, spread=(3.0, 3.0, 1.0))
    ins = leaves(N, h, d, 2 * L)

    def f(q, k, v, tq, tk, tv):
        return radial_window_attention(q, k, v, xyz, batch, (90.0, 90.0, 120.0), table_q=tq,
                                       table_k=tk, table_v=tv, quant_size=(45.0, 45.0, 60.0),
                                       a=0.3, backend="ext")

    assert torch.autograd.gradcheck(f, tuple(ins))


def test_table_gradients_are_deterministic():
    N, h, d, L = 500, 2, 16, 24
    xyz, batch = cloud(N, clouds=3, spread=(20.0, 20.0, 3.0), dtype=torch.float32)
    ins = leaves(N, h, d, 2 * L, torch.float32)
    g = torch.randn(N, h, d)

    def grads():
        out = radial_window_attention(*ins[:3], xyz, batch, (20.0, 20.0, 120.0), table_q=ins[3],
                                      table_k=ins[4], table_v=ins[5], backend="ext")
        return torch.autograd.grad(out, ins, g)

    with torch_threads(2):
        first, second = grads(), grads()
    with torch_threads(1):
        single = grads()
    for a, b, c in zip(first, second, single, strict=True):
        assert torch.equal(a, b)  # per-part accumulators summed in a fixed order
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 40), h=st.integers(1, 3), d=st.integers(1, 20), clouds=st.integers(1, 3),
    L=st.integers(1, 4), rel=st.sampled_from(["none", "linear", "exp"]),
    origin=st.sampled_from(["fixed", "batch_min"]),
)
def test_property_matches_reference(n, h, d, clouds, L, rel, origin):
    xyz, batch = cloud(n, clouds, spread=(2.0, 2.0, 2.0))
    rows = {"none": None, "linear": 2 * L - 1, "exp": 2 * L}[rel]
    ins = leaves(n, h, d, rows)
    window = [1.5, 2.0, 2.5]
    kw = {}
    if rows is not None:
        kw = {"table_q": ins[3], "table_k": ins[4], "table_v": ins[5],
              "quant_size": [w / L for w in window], "exp_split_a": 0.2 if rel == "exp" else None}
    res = both_backends(lambda b: window_attention(*ins[:3], xyz, batch, window, origin=origin,
                                                   backend=b, **kw), ins)
    assert_close(res, atol=1e-10)


def test_empty_input():
    q, k, v = leaves(0, 2, 4, None)
    out = window_attention(q, k, v, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 1.0,
                           backend="ext")
    assert out.shape == (0, 2, 4)
    out.sum().backward()
    assert q.grad.shape == (0, 2, 4)


def test_opcheck():
    N, h, d, L = 20, 2, 3, 2
    xyz, batch = cloud(N, spread=(2.0, 2.0, 2.0), dtype=torch.float32)
    ins = leaves(N, h, d, 2 * L, torch.float32)
    args = (*ins[:3], xyz, batch, *ins[3:], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], 0.5, "fixed", 0.5,
            "ext")
    torch.library.opcheck(torch.ops.effnn.window_attention.default, args)


def test_kernel_rejects_bad_arguments():
    q = torch.randn(4, 1, 2)
    starts = torch.tensor([0, 4])
    empty_codes, empty_r = torch.zeros(0, dtype=torch.int32), torch.zeros(0)
    fwd = torch.ops.effnn_ext.window_attention_forward
    with pytest.raises(RuntimeError, match="order must be a permutation"):
        fwd(q, q, q, torch.tensor([0, 1, 1, 3]), starts, empty_codes, empty_r, None, None, None,
            0, None, 1.0)
    with pytest.raises(RuntimeError, match="starts must run from 0 to N"):
        fwd(q, q, q, torch.arange(4), torch.tensor([0, 3]), empty_codes, empty_r, None, None,
            None, 0, None, 1.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        fwd(q.half(), q.half(), q.half(), torch.arange(4), starts, empty_codes, empty_r, None,
            None, None, 0, None, 1.0)
    t = torch.randn(1, 3, 4, 2)  # h=1, rows 4 = 2L for L=2 (exp split)
    with pytest.raises(RuntimeError, match="codes must be in"):
        fwd(q, q, q, torch.arange(4), starts, torch.full((4, 2), 5, dtype=torch.int32),
            torch.rand(4), t, t, t, 2, 0.1, 1.0)
