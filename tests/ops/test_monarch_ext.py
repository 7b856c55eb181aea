"""Tests of the optional compiled CPU kernels effnn._C (fused Monarch forward / backward).

The extension is opt-in (EFFNN_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .);
without it this module is skipped. Everything is compared with a naive loop implementation of
the specification run in float64; the extension (fp32 / bf16 in, fp32 accumulation) must be
within 2x the error of the same naive implementation run in the extension's own dtype, plus a
small absolute slack (the flash-attention rule of DESIGN.md).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

_C = pytest.importorskip("effnn._C")

pytestmark = pytest.mark.ext


def monarch_naive(x, w1, w2, bias, out_features):
    """The specification, written with loops over the blocks."""
    T, n_in = x.shape
    k, q, p = w1.shape
    l, s, r = w2.shape
    xp = torch.zeros(T, k * p, dtype=x.dtype)
    xp[:, :n_in] = x
    mid = torch.zeros(T, k * q, dtype=x.dtype)
    for kk in range(k):
        mid[:, kk * q:(kk + 1) * q] = xp[:, kk * p:(kk + 1) * p] @ w1[kk].T
    out = torch.zeros(T, l * s, dtype=x.dtype)
    for ll in range(l):
        out[:, ll::l] = mid[:, ll::l] @ w2[ll].T  # in2[t, rr] = mid[t, rr*l + ll]
    y = out[:, :out_features]
    return y if bias is None else y + bias


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def naive_with_grads(x, w1, w2, bias, out_features, grad_out, dtype):
    """Naive forward + autograd backward in `dtype`: y, dx, dw1, dw2 (as float64)."""
    # many tiny ops: one thread avoids waking the pool for each (slow on a busy machine)
    with torch_threads(1):
        xs, w1s, w2s = (t.detach().to(dtype).requires_grad_() for t in (x, w1, w2))
        b = None if bias is None else bias.to(dtype)
        y = monarch_naive(xs, w1s, w2s, b, out_features)
        y.backward(grad_out.to(dtype))
        return [t.detach().double() for t in (y, xs.grad, w1s.grad, w2s.grad)]


def fly_shapes(n_in, n_out, nb):
    """(w1 shape, w2 shape) of MonarchLinear(n_in, n_out, nblocks=nb), as in the official code."""
    in_blk, out_blk = math.ceil(n_in / nb), math.ceil(n_out / nb)
    if in_blk < out_blk:
        return (nb, in_blk, in_blk), (nb, out_blk, in_blk)
    return (nb, out_blk, in_blk), (nb, out_blk, out_blk)


def make(T, n_in, n_out, w1_shape, w2_shape, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n_in, generator=g, dtype=torch.float64)
    w1 = torch.randn(*w1_shape, generator=g, dtype=torch.float64) / math.sqrt(w1_shape[2])
    w2 = torch.randn(*w2_shape, generator=g, dtype=torch.float64) / math.sqrt(w2_shape[2])
    b = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None
    grad_out = torch.randn(T, n_out, generator=g, dtype=torch.float64)
    return x, w1, w2, b, grad_out


def assert_close_2x(name, got, truth, ref_low):
    """|got - truth| <= 2 |ref_low - truth| + slack (max norms, per tensor)."""
    got = got.double()
    if truth.numel() == 0:
        assert got.shape == truth.shape, name
        return
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - truth).abs().max().item()
    ref_err = (ref_low - truth).abs().max().item()
    scale = truth.abs().max().item()
    slack = 1e-6 * (scale + 1.0)
    assert err <= 2 * ref_err + slack, (
        f"{name}: max error {err:.3g} > 2 x reference error {ref_err:.3g} + {slack:.2g}"
    )


def check(T, n_in, n_out, w1_shape, w2_shape, *, bias=True, dtype=torch.float32,
          need_input_grad=True, seed=0):
    x, w1, w2, b, grad_out = make(T, n_in, n_out, w1_shape, w2_shape, bias, seed)
    truth = naive_with_grads(x, w1, w2, b, n_out, grad_out, torch.float64)
    low = naive_with_grads(x, w1, w2, b, n_out, grad_out, dtype)

    y = _C.monarch_forward(
        x.to(dtype), w1.to(dtype), w2.to(dtype), None if b is None else b.to(dtype), n_out
    )
    dx, dw1, dw2 = _C.monarch_backward(
        grad_out.to(dtype), x.to(dtype), w1.to(dtype), w2.to(dtype), need_input_grad
    )
    for t in (y, dx, dw1, dw2):
        assert t.dtype == dtype
    assert_close_2x("y", y, truth[0], low[0])
    if need_input_grad:
        assert_close_2x("dx", dx, truth[1], low[1])
    else:
        assert dx.shape == (0,)
    assert_close_2x("dw1", dw1, truth[2], low[2])
    assert_close_2x("dw2", dw2, truth[3], low[3])


# (T, in_features, out_features, w1 shape, w2 shape)
CASES = {
    "square": (37, 64, 64, *fly_shapes(64, 64, 8)),
    "expanding": (41, 48, 96, *fly_shapes(48, 96, 4)),
    "contracting": (41, 96, 48, *fly_shapes(96, 48, 4)),
    "nondivisible": (53, 100, 70, *fly_shapes(100, 70, 3)),
    "nondivisible_expanding": (29, 70, 100, *fly_shapes(70, 100, 3)),
    "nblocks1": (19, 20, 20, *fly_shapes(20, 20, 1)),
    "sqrt_n": (64, 256, 256, *fly_shapes(256, 256, 16)),
    "k_ne_l": (33, 30, 50, (2, 12, 16), (3, 17, 8)),  # k*q = l*r = 24, q % l != 0
    "k_ne_l_2": (21, 17, 19, (6, 4, 3), (4, 5, 6)),
    "tiny": (5, 1, 1, (1, 1, 1), (1, 1, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_naive_fp32(case, bias):
    check(*CASES[case], bias=bias)


@pytest.mark.parametrize("case", ["square", "nondivisible", "k_ne_l"])
def test_no_input_grad(case):
    check(*CASES[case], need_input_grad=False)


@pytest.mark.parametrize("T", [0, 1, 2, 17])
def test_token_counts(T):
    _, n_in, n_out, w1s, w2s = CASES["nondivisible"]
    if T == 0:
        x = torch.zeros(0, n_in)
        w1, w2 = torch.randn(*w1s), torch.randn(*w2s)
        y = _C.monarch_forward(x, w1, w2, torch.randn(n_out), n_out)
        assert y.shape == (0, n_out) and y.dtype == torch.float32
        dx, dw1, dw2 = _C.monarch_backward(torch.zeros(0, n_out), x, w1, w2, True)
        assert dx.shape == (0, n_in)
        assert torch.equal(dw1, torch.zeros(w1s)) and torch.equal(dw2, torch.zeros(w2s))
        dx, _, _ = _C.monarch_backward(torch.zeros(0, n_out), x, w1, w2, False)
        assert dx.shape == (0,)
    else:
        check(T, n_in, n_out, w1s, w2s)


@pytest.mark.parametrize("tile", ["7", "16", "40"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_tiles_and_threads(monkeypatch, tile, threads):
    """Ragged token tiles and per-thread gradient accumulators (tile size forced small)."""
    monkeypatch.setenv("EFFNN_MONARCH_TILE", tile)
    with torch_threads(threads):
        check(203, 100, 70, *fly_shapes(100, 70, 3))
        check(150, 30, 50, (2, 12, 16), (3, 17, 8), need_input_grad=False)


def test_default_tiles_large_T():
    """Several full 128-token tiles plus a ragged tail, default settings."""
    check(300, 256, 256, *fly_shapes(256, 256, 16), seed=1)


@pytest.mark.parametrize("case", ["nondivisible", "k_ne_l"])
def test_without_onednn(case):
    """With oneDNN disabled libtorch's brgemm falls back to its BLAS gemm (as on CPUs without
    AVX2): same results."""
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        check(*CASES[case])
    finally:
        torch.backends.mkldnn.enabled = old


@pytest.mark.parametrize("case", ["square", "nondivisible", "k_ne_l"])
def test_matches_naive_bf16(case):
    check(*CASES[case], dtype=torch.bfloat16)


def test_agrees_with_dense_matrix():
    """The product is linear: y == x @ M^T with M the densified Monarch matrix."""
    n_in, n_out = 100, 70
    w1s, w2s = fly_shapes(n_in, n_out, 3)
    w1, w2 = torch.randn(*w1s, dtype=torch.float64), torch.randn(*w2s, dtype=torch.float64)
    dense = monarch_naive(torch.eye(n_in, dtype=torch.float64), w1, w2, None, n_out).T
    x = torch.randn(64, n_in, dtype=torch.float64)
    y = _C.monarch_forward(x.float(), w1.float(), w2.float(), None, n_out)
    torch.testing.assert_close(y.double(), x @ dense.T, rtol=1e-4, atol=1e-4)


def test_deterministic():
    """Fixed split of the tokens over the threads: repeated calls are bitwise equal."""
    x, w1, w2, _, g = (t.float() for t in make(517, 256, 256, *fly_shapes(256, 256, 16)))
    first = _C.monarch_backward(g, x, w1, w2, True)
    for _ in range(3):
        for a, b in zip(first, _C.monarch_backward(g, x, w1, w2, True), strict=True):
            assert torch.equal(a, b)


def test_does_not_modify_inputs():
    T, n_in, n_out, w1s, w2s = CASES["nondivisible"]
    x, w1, w2, b, g = (t.float() for t in make(T, n_in, n_out, w1s, w2s))
    copies = [t.clone() for t in (x, w1, w2, b, g)]
    _C.monarch_forward(x, w1, w2, b, n_out)
    _C.monarch_backward(g, x, w1, w2, True)
    for a, c in zip((x, w1, w2, b, g), copies, strict=True):
        assert torch.equal(a, c)


def test_outputs_have_no_autograd_history():
    x = torch.randn(8, 16, requires_grad=True)
    w1 = torch.randn(4, 4, 4, requires_grad=True)
    w2 = torch.randn(4, 4, 4, requires_grad=True)
    y = _C.monarch_forward(x, w1, w2, None, 16)
    assert y.grad_fn is None
    dx, dw1, dw2 = _C.monarch_backward(torch.ones(8, 16), x, w1, w2, True)
    assert dx.grad_fn is None and dw1.grad_fn is None and dw2.grad_fn is None


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, never a crash


def _ok():
    return torch.randn(5, 16), torch.randn(4, 4, 4), torch.randn(4, 4, 4)


def test_rejects_other_dtypes():
    x, w1, w2 = _ok()
    for dt in (torch.float64, torch.float16):
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            _C.monarch_forward(x.to(dt), w1.to(dt), w2.to(dt), None, 16)
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            _C.monarch_backward(torch.ones(5, 16, dtype=dt), x.to(dt), w1.to(dt), w2.to(dt), True)
    with pytest.raises(RuntimeError, match="same dtype"):
        _C.monarch_forward(x, w1.double(), w2, None, 16)
    with pytest.raises(RuntimeError, match="bias dtype"):
        _C.monarch_forward(x, w1, w2, torch.zeros(16, dtype=torch.float64), 16)
    with pytest.raises(RuntimeError, match="grad_out dtype"):
        _C.monarch_backward(torch.ones(5, 16, dtype=torch.float64), x, w1, w2, True)


def test_rejects_bad_shapes_and_layouts():
    x, w1, w2 = _ok()
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.monarch_forward(x.t().contiguous().t(), w1, w2, None, 16)
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.monarch_forward(x, w1.transpose(1, 2), w2, None, 16)
    with pytest.raises(RuntimeError, match=r"k\*q == l\*r"):
        _C.monarch_forward(x, w1, torch.randn(4, 4, 5), None, 16)
    with pytest.raises(RuntimeError, match="in_features"):
        _C.monarch_forward(torch.randn(5, 17), w1, w2, None, 16)
    with pytest.raises(RuntimeError, match="out_features"):
        _C.monarch_forward(x, w1, w2, None, 17)
    with pytest.raises(RuntimeError, match="2-D"):
        _C.monarch_forward(torch.randn(5, 2, 8), w1, w2, None, 16)
    with pytest.raises(RuntimeError, match="3-D"):
        _C.monarch_forward(x, w1.view(4, 16), w2, None, 16)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        _C.monarch_forward(x, w1, w2, torch.zeros(15), 16)
    with pytest.raises(RuntimeError, match="rows but x has"):
        _C.monarch_backward(torch.ones(4, 16), x, w1, w2, True)
    with pytest.raises(RuntimeError, match="out_features"):
        _C.monarch_backward(torch.ones(5, 17), x, w1, w2, True)
