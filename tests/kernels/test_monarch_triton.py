"""Triton Monarch kernels (effnn.kernels.monarch) against the naive fp64 loop reference.

The forward returns (y, mid_t) with mid_t the middle activation feature-major (k*q, T) when asked
to save it; the backward reads that mid_t instead of recomputing it.

On a CPU-only machine these run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton is
imported); on a CUDA machine without the interpreter they run the compiled kernels on the GPU.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from effnn.kernels import monarch as km  # noqa: E402  (needs triton)
from tests.naive import monarch_naive, monarch_naive_mid  # noqa: E402  (the loop reference)
from tests.tolerances import assert_close_scaled, assert_within_2x  # noqa: E402

if km._INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.triton


NAMES = ("y", "mid_t", "dx", "dw1", "dw2")


def _naive_mid_t(x, w1):
    """The specification's mid, transposed to (k*q, T)."""
    return monarch_naive_mid(x, w1).t()


def _naive_all(x, w1, w2, bias, out_features, grad_out, need_input_grad=True):
    """(y, mid_t, dx, dw1, dw2) of the naive reference in the inputs' own dtype, on the CPU."""
    x, w1, w2, grad_out = (t.detach().cpu() for t in (x, w1, w2, grad_out))
    bias = None if bias is None else bias.detach().cpu()
    x.requires_grad_(need_input_grad)
    w1.requires_grad_()
    w2.requires_grad_()
    y = monarch_naive(x, w1, w2, bias, out_features)
    inputs = (x, w1, w2) if need_input_grad else (w1, w2)
    grads = torch.autograd.grad(y, inputs, grad_out)
    if not need_input_grad:
        grads = (None, *grads)
    return (y.detach(), _naive_mid_t(x.detach(), w1.detach()), *grads)


def _make(T, n_in, n_out, w1_shape, w2_shape, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n_in, generator=g, dtype=torch.float64)
    w1 = torch.randn(*w1_shape, generator=g, dtype=torch.float64) / math.sqrt(w1_shape[2])
    w2 = torch.randn(*w2_shape, generator=g, dtype=torch.float64) / math.sqrt(w2_shape[2])
    b = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None
    go = torch.randn(T, n_out, generator=g, dtype=torch.float64)
    return x, w1, w2, b, go


def _dev(t, dtype):
    return None if t is None else t.to(device=DEVICE, dtype=dtype)


def _forward_both(x, w1, w2, b, n_out):
    """km.forward with save_mid=True, checked against save_mid=False: (y, mid_t)."""
    T = x.shape[0]
    kq = w1.shape[0] * w1.shape[1]
    y, mid_t = km.forward(x, w1, w2, b, n_out, True)
    assert mid_t.shape == (kq, T) and mid_t.is_contiguous() and mid_t.dtype == x.dtype
    assert y.shape == (T, n_out) and y.is_contiguous() and y.dtype == x.dtype
    y0, none = km.forward(x, w1, w2, b, n_out, False)
    assert none.shape == (0,) and none.dtype == x.dtype
    assert y0.shape == y.shape and y0.is_contiguous()
    if km._INTERPRET:  # same tiles, same order: bit-identical (compiled kernels may autotune apart)
        assert torch.equal(y0, y)
    else:
        torch.testing.assert_close(y0, y)
    return y, mid_t


def _run_kernel(x, w1, w2, b, go, n_out, dtype, need_input_grad=True):
    """(y, mid_t, dx, dw1, dw2): the forward's mid_t is fed to the backward."""
    x, w1, w2, b, go = (_dev(t, dtype) for t in (x, w1, w2, b, go))
    y, mid_t = _forward_both(x, w1, w2, b, n_out)
    dx, dw1, dw2 = km.backward(go, x, mid_t, w1, w2, need_input_grad)
    return y, mid_t, dx, dw1, dw2


# name: (T, in_features, out_features, w1 (k, q, p), w2 (l, s, r), bias)
# MonarchLinear layouts (k == l == nb) plus general shapes (k != l, r != q).
SHAPES = {
    "square": (20, 32, 32, (2, 16, 16), (2, 16, 16), True),
    "expanding": (20, 24, 40, (2, 12, 12), (2, 20, 12), False),
    "contracting": (20, 40, 24, (2, 12, 20), (2, 12, 12), True),
    "nondivisible_in100_out70_nb3": (18, 100, 70, (3, 24, 34), (3, 24, 24), True),
    "tiny_blocks_nb_eq_in": (20, 6, 6, (6, 1, 1), (6, 1, 1), True),
    "tiny_general_p1_q3": (17, 6, 17, (6, 3, 1), (9, 2, 2), False),
    "nb1_dense": (20, 20, 12, (1, 12, 20), (1, 12, 12), True),
    "general_k4_l3": (21, 30, 28, (4, 6, 8), (3, 10, 8), True),
    "padded_blocks_truncated_out": (20, 10, 13, (4, 6, 8), (3, 10, 8), True),
    "long_blocks": (33, 80, 72, (2, 40, 40), (2, 36, 40), True),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_fp32_forward_backward(name):
    T, n_in, n_out, s1, s2, bias = SHAPES[name]
    x, w1, w2, b, go = _make(T, n_in, n_out, s1, s2, bias=bias)
    ref = _naive_all(x, w1, w2, b, n_out, go)
    got = _run_kernel(x, w1, w2, b, go, n_out, torch.float32)
    y, mid_t, dx, dw1, dw2 = got
    assert y.dtype == torch.float32 and y.is_contiguous() and y.shape == (T, n_out)
    assert dw1.dtype == dw2.dtype == torch.float32
    for what, a, r in zip(NAMES, got, ref, strict=True):
        assert_close_scaled(a, r, 2e-5, f"{name} {what}")


@pytest.mark.parametrize("T", [0, 1, 37])
def test_token_counts(T):
    x, w1, w2, b, go = _make(T, 30, 28, (4, 6, 8), (3, 10, 8))
    ref = _naive_all(x, w1, w2, b, 28, go)
    got = _run_kernel(x, w1, w2, b, go, 28, torch.float32)
    for what, a, r in zip(NAMES, got, ref, strict=True):
        assert_close_scaled(a, r, 2e-5, f"T={T} {what}")


def _strided(t, kind):
    """The same values as t (2-D) in a non-contiguous layout."""
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "column_slice":
        wide = torch.zeros(t.shape[0], t.shape[1] + 7, dtype=t.dtype, device=t.device)
        wide[:, 3 : 3 + t.shape[1]] = t
        return wide[:, 3 : 3 + t.shape[1]]
    if kind == "row_step":
        tall = torch.zeros(2 * t.shape[0], t.shape[1], dtype=t.dtype, device=t.device)
        tall[::2] = t
        return tall[::2]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["transposed", "column_slice", "row_step"])
def test_noncontiguous_inputs(kind):
    T, n_in, n_out, s1, s2, _ = SHAPES["nondivisible_in100_out70_nb3"]
    x, w1, w2, b, go = _make(19, n_in, n_out, s1, s2)
    ref = _naive_all(x, w1, w2, b, n_out, go)
    xd, w1d, w2d, bd, god = (_dev(t, torch.float32) for t in (x, w1, w2, b, go))
    xs, gos = _strided(xd, kind), _strided(god, kind)
    assert not xs.is_contiguous() and not gos.is_contiguous()
    # weights as non-contiguous views too (last two dims stored transposed)
    w1s = w1d.transpose(1, 2).contiguous().transpose(1, 2)
    w2s = w2d.transpose(1, 2).contiguous().transpose(1, 2)
    y, mid_t = _forward_both(xs, w1s, w2s, bd, n_out)
    # the backward accepts mid_t of any strides ("transposed" is token-major)
    mids = _strided(mid_t, kind)
    assert not mids.is_contiguous() and torch.equal(mids, mid_t)
    dx, dw1, dw2 = km.backward(gos, xs, mids, w1s, w2s, True)
    for what, a, r in zip(NAMES, (y, mid_t, dx, dw1, dw2), ref, strict=True):
        assert_close_scaled(a, r, 2e-5, f"{kind} {what}")


def test_broadcast_rows_stride0():
    x, w1, w2, b, go = _make(1, 24, 40, (2, 12, 12), (2, 20, 12))
    xe = x.expand(18, 24)  # stride (0, 1)
    go = torch.randn(18, 40, dtype=torch.float64)
    ref = _naive_all(xe.contiguous(), w1, w2, b, 40, go)
    got = _run_kernel(xe, w1, w2, b, go, 40, torch.float32)
    for what, a, r in zip(NAMES, got, ref, strict=True):
        assert_close_scaled(a, r, 2e-5, f"expanded {what}")


def test_grad_out_stride0():
    """autograd hands e.g. y.sum()'s gradient over as an expanded tensor with strides (0, 0)."""
    T, n_in, n_out, s1, s2, _ = SHAPES["general_k4_l3"]
    x, w1, w2, b, _ = _make(T, n_in, n_out, s1, s2)
    go = torch.ones(1, 1, dtype=torch.float64).expand(T, n_out)
    ref = _naive_all(x, w1, w2, b, n_out, go.contiguous())
    xd, w1d, w2d = (_dev(t, torch.float32) for t in (x, w1, w2))
    god = torch.ones(1, 1, device=DEVICE).expand(T, n_out)
    assert god.stride() == (0, 0)
    _, mid_t = km.forward(xd, w1d, w2d, None, n_out, True)
    dx, dw1, dw2 = km.backward(god, xd, mid_t, w1d, w2d, True)
    for what, a, r in zip(NAMES[2:], (dx, dw1, dw2), ref[2:], strict=True):
        assert_close_scaled(a, r, 2e-5, f"stride-0 grad_out {what}")


def test_no_input_grad():
    T, n_in, n_out, s1, s2, _ = SHAPES["general_k4_l3"]
    x, w1, w2, b, go = _make(T, n_in, n_out, s1, s2)
    _, _, _, rdw1, rdw2 = _naive_all(x, w1, w2, b, n_out, go, need_input_grad=False)
    xd, w1d, w2d, god = (_dev(t, torch.float32) for t in (x, w1, w2, go))
    _, mid_t = km.forward(xd, w1d, w2d, None, n_out, True)
    dx, dw1, dw2 = km.backward(god, xd, mid_t, w1d, w2d, False)
    assert dx.shape == (0,)
    assert_close_scaled(dw1, rdw1, 2e-5, "dw1")
    assert_close_scaled(dw2, rdw2, 2e-5, "dw2")


def test_weight_grad_token_split(monkeypatch):
    """Force the split-over-tokens path of the weight-gradient kernel (fp32 workspace + sum)."""
    monkeypatch.setattr(km, "_num_sms", lambda device: 64)
    monkeypatch.setattr(km, "_WGRAD_MIN_CHUNK", 16)
    assert km._wgrad_chunk(50, 2, torch.device(DEVICE)) == 16
    x, w1, w2, b, go = _make(50, 24, 40, (2, 12, 12), (2, 20, 12))
    ref = _naive_all(x, w1, w2, b, 40, go)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        _, _, dx, dw1, dw2 = _run_kernel(x, w1, w2, b, go, 40, dtype)
        assert dw1.dtype == dw2.dtype == dtype
        for what, a, r in zip(NAMES[2:], (dx, dw1, dw2), ref[2:], strict=True):
            assert_close_scaled(a, r, tol, f"split {dtype} {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "name", ["nondivisible_in100_out70_nb3", "general_k4_l3", "tiny_general_p1_q3"]
)
def test_low_precision(dtype, name):
    """Error vs fp64 <= 2x the naive reference's own error in `dtype` + a one-ulp slack."""
    T, n_in, n_out, s1, s2, bias = SHAPES[name]
    x, w1, w2, b, go = _make(T, n_in, n_out, s1, s2, bias=bias, seed=1)
    ref64 = _naive_all(x, w1, w2, b, n_out, go)
    low = [None if t is None else t.to(dtype) for t in (x, w1, w2, b, go)]
    ref_low = _naive_all(*low[:4], n_out, low[4])
    got = _run_kernel(*low[:4], low[4], n_out, dtype)
    assert all(t.dtype == dtype for t in got)
    for what, a, rl, r64 in zip(NAMES, got, ref_low, ref64, strict=True):
        assert_within_2x(a, rl, r64, f"{name} {dtype} {what}")


def test_zero_out_features():
    """out_features == 0: y is (T, 0), yet mid_t is computed in full and the backward is zero."""
    x, w1, w2, _, _ = _make(19, 30, 0, (4, 6, 8), (3, 10, 8), bias=False)
    xd, w1d, w2d = (_dev(t, torch.float32) for t in (x, w1, w2))
    y, mid_t = _forward_both(xd, w1d, w2d, None, 0)
    assert_close_scaled(mid_t, _naive_mid_t(x, w1), 2e-5, "mid_t")
    dx, dw1, dw2 = km.backward(torch.empty(19, 0, device=DEVICE), xd, mid_t, w1d, w2d, True)
    for what, a, shape in (("dx", dx, (19, 30)), ("dw1", dw1, w1.shape), ("dw2", dw2, w2.shape)):
        assert_close_scaled(a, torch.zeros(shape, dtype=torch.float64), 0.0, what)


def test_unsupported_reasons():
    x = torch.randn(4, 8)
    w1 = torch.randn(2, 4, 4)
    w2 = torch.randn(2, 4, 4)
    assert km.unsupported_reasons(x, w1, w2) == []
    assert km.unsupported_reasons(x.half(), w1.half(), w2.half()) == []
    assert km.unsupported_reasons(x.bfloat16(), w1.bfloat16(), w2.bfloat16()) == []
    r = km.unsupported_reasons(x.double(), w1.double(), w2.double())
    assert r and all("float64" in m for m in r)
    r = km.unsupported_reasons(x, w1.half(), w2)
    assert any("mixed dtypes" in m for m in r)
    r = km.unsupported_reasons(x[None], w1, w2)
    assert any("x must be 2-D" in m for m in r)
    # int32 limits, checked on meta tensors (nothing allocated)
    big = torch.empty(2**31, 8, device="meta")
    assert any("T=" in m for m in km.unsupported_reasons(big, w1.to("meta"), w2.to("meta")))


def test_shape_errors():
    x = torch.randn(4, 8, device=DEVICE)
    w1 = torch.randn(2, 4, 4, device=DEVICE)
    w2 = torch.randn(2, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="k\\*q == l\\*r"):
        km.forward(x, w1, torch.randn(3, 4, 4, device=DEVICE), None, 8, True)
    with pytest.raises(ValueError, match="out_features=20"):
        km.forward(x, w1, w2, None, 20, True)
    with pytest.raises(ValueError, match="exceeds k\\*p"):
        km.forward(torch.randn(4, 9, device=DEVICE), w1, w2, None, 8, False)
    go = torch.randn(4, 8, device=DEVICE)
    # the backward needs the saved mid_t (k*q, T), not the empty one of save_mid=False
    for bad in (torch.empty(0, device=DEVICE), torch.randn(4, 8, device=DEVICE),
                torch.randn(8, 5, device=DEVICE)):
        with pytest.raises(ValueError, match="mid_t must be"):
            km.backward(go, x, bad, w1, w2, True)
