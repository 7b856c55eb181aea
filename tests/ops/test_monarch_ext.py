"""Tests of the optional compiled CPU kernels effnn._C (fused Monarch forward / backward).

Interface: ``monarch_forward(x, w1, w2, bias, out_features, save_mid) -> (y, mid_t)`` with mid_t
the middle activation, feature-major (k*q, T), when save_mid (else an empty (0,) tensor), and
``monarch_backward(grad_out, x, mid_t, w1, w2, need_input_grad) -> (dx, dw1, dw2)``, which reads
mid_t instead of recomputing the first factor. The private keyword ``_tile`` forces small token
tiles here.

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

from tests.naive import monarch_naive, monarch_naive_mid  # noqa: E402

pytestmark = pytest.mark.ext


def naive_dw2(grad_out, mid, w2_shape):
    """dw2 from grad_out and a given middle activation (T, k*q): dw2[ll] = dout2_ll^T @ in2_ll."""
    l, s, r = w2_shape
    g = torch.zeros(grad_out.shape[0], l * s, dtype=grad_out.dtype)
    g[:, :grad_out.shape[1]] = grad_out
    return torch.stack([g[:, ll::l].T @ mid[:, ll::l] for ll in range(l)])


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def naive_with_grads(x, w1, w2, bias, out_features, grad_out, dtype):
    """Naive forward + autograd backward in `dtype`: y, dx, dw1, dw2, mid_t (as float64; mid_t
    is the middle activation transposed to the extension's feature-major (k*q, T) layout)."""
    # many tiny ops: one thread avoids waking the pool for each (slow on a busy machine)
    with torch_threads(1):
        xs, w1s, w2s = (t.detach().to(dtype).requires_grad_() for t in (x, w1, w2))
        b = None if bias is None else bias.to(dtype)
        y = monarch_naive(xs, w1s, w2s, b, out_features)
        mid = monarch_naive_mid(xs, w1s)
        y.backward(grad_out.to(dtype))
        return [t.detach().double() for t in (y, xs.grad, w1s.grad, w2s.grad, mid.T)]


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
          need_input_grad=True, seed=0, tile=0):
    x, w1, w2, b, grad_out = make(T, n_in, n_out, w1_shape, w2_shape, bias, seed)
    truth = naive_with_grads(x, w1, w2, b, n_out, grad_out, torch.float64)
    low = naive_with_grads(x, w1, w2, b, n_out, grad_out, dtype)

    xs, w1s, w2s = x.to(dtype), w1.to(dtype), w2.to(dtype)
    bs = None if b is None else b.to(dtype)
    y, mid_t = _C.monarch_forward(xs, w1s, w2s, bs, n_out, True, _tile=tile)
    # inference: nothing saved, the same y
    y_inf, no_mid = _C.monarch_forward(xs, w1s, w2s, bs, n_out, False, _tile=tile)
    assert no_mid.shape == (0,) and no_mid.dtype == dtype
    assert torch.equal(y_inf, y)
    dx, dw1, dw2 = _C.monarch_backward(
        grad_out.to(dtype), xs, mid_t, w1s, w2s, need_input_grad, _tile=tile
    )
    for t in (y, mid_t, dx, dw1, dw2):
        assert t.dtype == dtype
    assert y.is_contiguous() and mid_t.is_contiguous()
    assert mid_t.shape == (w1_shape[0] * w1_shape[1], T)
    assert_close_2x("y", y, truth[0], low[0])
    assert_close_2x("mid_t", mid_t, truth[4], low[4])
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
        y, mid_t = _C.monarch_forward(x, w1, w2, torch.randn(n_out), n_out, True)
        assert y.shape == (0, n_out) and y.dtype == torch.float32
        assert mid_t.shape == (w1s[0] * w1s[1], 0) and mid_t.dtype == torch.float32
        y, no_mid = _C.monarch_forward(x, w1, w2, torch.randn(n_out), n_out, False)
        assert y.shape == (0, n_out) and no_mid.shape == (0,)
        dx, dw1, dw2 = _C.monarch_backward(torch.zeros(0, n_out), x, mid_t, w1, w2, True)
        assert dx.shape == (0, n_in)
        assert torch.equal(dw1, torch.zeros(w1s)) and torch.equal(dw2, torch.zeros(w2s))
        dx, _, _ = _C.monarch_backward(torch.zeros(0, n_out), x, mid_t, w1, w2, False)
        assert dx.shape == (0,)
    else:
        check(T, n_in, n_out, w1s, w2s)


@pytest.mark.parametrize("tile", [7, 16, 40])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_tiles_and_threads(tile, threads):
    """Ragged token tiles and per-thread gradient accumulators (tile size forced small through
    the private _tile argument): mid_t is written and read in tile-wide column pieces."""
    with torch_threads(threads):
        check(203, 100, 70, *fly_shapes(100, 70, 3), tile=tile)
        check(150, 30, 50, (2, 12, 16), (3, 17, 8), need_input_grad=False, tile=tile)
        check(97, 48, 96, *fly_shapes(48, 96, 4), dtype=torch.bfloat16, tile=tile)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tile_size_does_not_change_the_forward(threads):
    """y and mid_t do not depend on the tiling (each token's products are the same), and the
    gradients agree to rounding."""
    x, w1, w2, b, g = (t.float() for t in make(203, 100, 70, *fly_shapes(100, 70, 3)))
    with torch_threads(threads):
        y0, m0 = _C.monarch_forward(x, w1, w2, b, 70, True)
        grads0 = _C.monarch_backward(g, x, m0, w1, w2, True)
        for tile in (1, 5, 64):
            y, m = _C.monarch_forward(x, w1, w2, b, 70, True, _tile=tile)
            torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m, m0, rtol=1e-6, atol=1e-6)
            for a, c in zip(_C.monarch_backward(g, x, m, w1, w2, True, _tile=tile), grads0,
                            strict=True):
                torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["nondivisible", "k_ne_l"])
def test_backward_uses_saved_mid(case, dtype):
    """The backward reads mid_t (it does not recompute the first factor): dw2 follows whatever
    middle activation it is given, while dx and dw1 do not depend on it."""
    T, n_in, n_out, w1s, w2s = CASES[case]
    x, w1, w2, _, g = make(T, n_in, n_out, w1s, w2s, seed=3)
    xs, w1d, w2d, gs = (t.to(dtype) for t in (x, w1, w2, g))
    _, mid_t = _C.monarch_forward(xs, w1d, w2d, None, n_out, True)
    dx0, dw1_0, dw2_0 = _C.monarch_backward(gs, xs, mid_t, w1d, w2d, True)
    other = torch.randn(mid_t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dx, dw1, dw2 = _C.monarch_backward(gs, xs, other.to(dtype), w1d, w2d, True)
    assert torch.equal(dx, dx0) and torch.equal(dw1, dw1_0)
    truth = naive_dw2(g, other.to(dtype).double().T, w2s)
    low = naive_dw2(gs, other.to(dtype).T, w2s).double()
    assert_close_2x("dw2 (given mid_t)", dw2, truth, low)
    assert not torch.equal(dw2, dw2_0)
    _, _, dw2 = _C.monarch_backward(gs, xs, torch.zeros_like(mid_t), w1d, w2d, False)
    assert torch.equal(dw2, torch.zeros_like(dw2))


def test_mid_t_layout():
    """mid_t[kk*q + j, t] = mid[t, kk*q + j]; the second factor's input is a row stride of it:
    in2[t, ll, rr] = mid_t[rr*l + ll, t]."""
    k, q, p, l, s, r = 2, 12, 16, 3, 17, 8
    x = torch.randn(9, 30, dtype=torch.float64)
    w1, w2 = torch.randn(k, q, p, dtype=torch.float64), torch.randn(l, s, r, dtype=torch.float64)
    mid = monarch_naive_mid(x, w1)
    y, mid_t = _C.monarch_forward(x.float(), w1.float(), w2.float(), None, 50, True)
    torch.testing.assert_close(mid_t.double(), mid.T, rtol=1e-4, atol=1e-4)
    in2 = mid_t.view(r, l, 9).permute(2, 1, 0)  # (T, l, r)
    out = torch.einsum("lsr,tlr->tsl", w2.float(), in2).reshape(9, s * l)
    torch.testing.assert_close(y, out[:, :50], rtol=1e-4, atol=1e-4)


def test_zero_out_features_still_saves_mid():
    x, w1, w2, _, _ = make(11, 20, 20, *fly_shapes(20, 20, 4))
    x, w1, w2 = x.float(), w1.float(), w2.float()
    y, mid_t = _C.monarch_forward(x, w1, w2, None, 0, True)
    assert y.shape == (11, 0)
    mid = monarch_naive_mid(x.double(), w1.double())
    torch.testing.assert_close(mid_t.double(), mid.T, rtol=1e-5, atol=1e-5)
    dx, dw1, dw2 = _C.monarch_backward(torch.zeros(11, 0), x, mid_t, w1, w2, True)
    assert not dx.any() and not dw1.any() and not dw2.any()


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
    y, _ = _C.monarch_forward(x.float(), w1.float(), w2.float(), None, n_out, False)
    torch.testing.assert_close(y.double(), x @ dense.T, rtol=1e-4, atol=1e-4)


def test_deterministic():
    """Fixed split of the tokens over the threads: repeated calls are bitwise equal."""
    x, w1, w2, _, g = (t.float() for t in make(517, 256, 256, *fly_shapes(256, 256, 16)))
    y, mid_t = _C.monarch_forward(x, w1, w2, None, 256, True)
    first = _C.monarch_backward(g, x, mid_t, w1, w2, True)
    for _ in range(3):
        y2, mid2 = _C.monarch_forward(x, w1, w2, None, 256, True)
        assert torch.equal(y, y2) and torch.equal(mid_t, mid2)
        for a, b in zip(first, _C.monarch_backward(g, x, mid_t, w1, w2, True), strict=True):
            assert torch.equal(a, b)


def test_does_not_modify_inputs():
    T, n_in, n_out, w1s, w2s = CASES["nondivisible"]
    x, w1, w2, b, g = (t.float() for t in make(T, n_in, n_out, w1s, w2s))
    copies = [t.clone() for t in (x, w1, w2, b, g)]
    _, mid_t = _C.monarch_forward(x, w1, w2, b, n_out, True)
    mid_copy = mid_t.clone()
    _C.monarch_backward(g, x, mid_t, w1, w2, True)
    for a, c in zip((x, w1, w2, b, g, mid_t), copies + [mid_copy], strict=True):
        assert torch.equal(a, c)


def test_outputs_have_no_autograd_history():
    x = torch.randn(8, 16, requires_grad=True)
    w1 = torch.randn(4, 4, 4, requires_grad=True)
    w2 = torch.randn(4, 4, 4, requires_grad=True)
    y, mid_t = _C.monarch_forward(x, w1, w2, None, 16, True)
    assert y.grad_fn is None and mid_t.grad_fn is None
    dx, dw1, dw2 = _C.monarch_backward(torch.ones(8, 16), x, mid_t, w1, w2, True)
    assert dx.grad_fn is None and dw1.grad_fn is None and dw2.grad_fn is None


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, never a crash


def _ok():
    return torch.randn(5, 16), torch.randn(4, 4, 4), torch.randn(4, 4, 4)


def _fwd(x, w1, w2, bias, out_features):
    return _C.monarch_forward(x, w1, w2, bias, out_features, True)


def _mid():
    """A well-formed mid_t for _ok(): (k*q, T) = (16, 5)."""
    return torch.randn(16, 5)


def test_rejects_other_dtypes():
    x, w1, w2 = _ok()
    for dt in (torch.float64, torch.float16):
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            _fwd(x.to(dt), w1.to(dt), w2.to(dt), None, 16)
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            _C.monarch_backward(torch.ones(5, 16, dtype=dt), x.to(dt), _mid().to(dt), w1.to(dt),
                                w2.to(dt), True)
    with pytest.raises(RuntimeError, match="same dtype"):
        _fwd(x, w1.double(), w2, None, 16)
    with pytest.raises(RuntimeError, match="bias dtype"):
        _fwd(x, w1, w2, torch.zeros(16, dtype=torch.float64), 16)
    with pytest.raises(RuntimeError, match="grad_out dtype"):
        _C.monarch_backward(torch.ones(5, 16, dtype=torch.float64), x, _mid(), w1, w2, True)
    with pytest.raises(RuntimeError, match="mid_t dtype"):
        _C.monarch_backward(torch.ones(5, 16), x, _mid().bfloat16(), w1, w2, True)
    xb, w1b, w2b = x.bfloat16(), w1.bfloat16(), w2.bfloat16()
    with pytest.raises(RuntimeError, match="mid_t dtype"):
        _C.monarch_backward(torch.ones(5, 16).bfloat16(), xb, _mid(), w1b, w2b, True)


def test_rejects_bad_shapes_and_layouts():
    x, w1, w2 = _ok()
    with pytest.raises(RuntimeError, match="contiguous"):
        _fwd(x.t().contiguous().t(), w1, w2, None, 16)
    with pytest.raises(RuntimeError, match="contiguous"):
        _fwd(x, w1.transpose(1, 2), w2, None, 16)
    with pytest.raises(RuntimeError, match=r"k\*q == l\*r"):
        _fwd(x, w1, torch.randn(4, 4, 5), None, 16)
    with pytest.raises(RuntimeError, match="in_features"):
        _fwd(torch.randn(5, 17), w1, w2, None, 16)
    with pytest.raises(RuntimeError, match="out_features"):
        _fwd(x, w1, w2, None, 17)
    with pytest.raises(RuntimeError, match="2-D"):
        _fwd(torch.randn(5, 2, 8), w1, w2, None, 16)
    with pytest.raises(RuntimeError, match="3-D"):
        _fwd(x, w1.view(4, 16), w2, None, 16)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        _fwd(x, w1, w2, torch.zeros(15), 16)
    with pytest.raises(RuntimeError, match="rows but x has"):
        _C.monarch_backward(torch.ones(4, 16), x, _mid(), w1, w2, True)
    with pytest.raises(RuntimeError, match="out_features"):
        _C.monarch_backward(torch.ones(5, 17), x, _mid(), w1, w2, True)
    with pytest.raises(RuntimeError, match="_tile must be >= 0"):
        _C.monarch_forward(x, w1, w2, None, 16, True, _tile=-1)
    with pytest.raises(TypeError):  # private and keyword-only
        _C.monarch_forward(x, w1, w2, None, 16, True, 8)


def test_rejects_bad_mid_t():
    """mid_t must be the forward's (k*q, T) contiguous tensor in x.dtype: clear errors naming
    mid_t (including the (0,) placeholder of save_mid=False)."""
    x, w1, w2 = _ok()
    g = torch.ones(5, 16)
    _, mid_t = _fwd(x, w1, w2, None, 16)
    _, placeholder = _C.monarch_forward(x, w1, w2, None, 16, False)
    bad_shapes = [placeholder, mid_t.T.contiguous(), mid_t[:, :4].contiguous(),
                  mid_t[:15].contiguous(), mid_t.reshape(16, 5, 1), mid_t.reshape(-1)]
    for bad in bad_shapes:
        with pytest.raises(RuntimeError, match=r"mid_t must have shape \(k\*q, T\) = \(16, 5\)"):
            _C.monarch_backward(g, x, bad, w1, w2, True)
    with pytest.raises(RuntimeError, match="mid_t must be contiguous"):
        _C.monarch_backward(g, x, mid_t.T.contiguous().T, w1, w2, True)
    with pytest.raises(RuntimeError, match="mid_t must be contiguous"):
        _C.monarch_backward(g, x, torch.randn(16, 10)[:, ::2], w1, w2, True)
    with pytest.raises(RuntimeError, match="mid_t dtype"):
        _C.monarch_backward(g, x, mid_t.double(), w1, w2, True)
    with pytest.raises(TypeError):  # the old signature, without mid_t
        _C.monarch_backward(g, x, w1, w2, True)
    with pytest.raises(TypeError):  # the old signature, without save_mid
        _C.monarch_forward(x, w1, w2, None, 16)
