import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effnn.ops.gblr import (
    gaudi_mask,
    gblr_dense_weight,
    gblr_masked_linear,
    gblr_structured,
    mask_intervals,
    pack_structure,
)
from tests.naive import gaudi_mask_naive

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def official_mask(w, loc, sigma, n, training=True):
    """The official ``GaudiGBLR.get_mask`` (changwoolee/Gaudi-GBLR, src/models/layers/gblr.py) as
    read there, with ``get_width``'s rounding: STE-rounded width (hardshrunk in eval) and
    location, w sinc(f w) / sinc(f/n) exp(-f^2/2sigma^2 - i (2 pi f l + pi f (w - 1/n))), irfft
    with norm="forward", entries below 1e-3 zeroed in eval. Autograd gives its gradients.
    ``sigma`` None: ``no_gaussian``. ``round_=False`` is not the official forward: the continuous
    formula, for finite differences."""
    w = w - w.detach() + torch.round(w * n) / n
    if not training:
        w = torch.nn.functional.hardshrink(w, 1.0 / n)
    loc = loc - loc.detach() + torch.round(loc * n) / n
    return _official_formula(w, loc, sigma, n, training)


def _official_formula(w, loc, sigma, n, training=True):
    freq = torch.arange(0.0, n // 2 + 1, 1, dtype=w.dtype).view(1, -1)
    w, loc = w.view(-1, 1), loc.view(-1, 1) * 2 * math.pi
    imag = -freq * loc + math.pi * freq * (1.0 / n - w)
    real = 0.0 if sigma is None else -0.5 / sigma**2 * freq**2
    spectrum = w * torch.sinc(freq * w) / torch.sinc(freq / n) * torch.exp(real + imag * 1j)
    mask = torch.fft.irfft(spectrum, n=n, norm="forward")
    if not training:
        mask = torch.where(mask.abs() < 1e-3, torch.zeros_like(mask), mask)
    return mask


def _sigma(sigma, dtype=F64):
    return torch.tensor(math.inf if sigma is None else sigma, dtype=dtype)


def _structure(K, dtype=F64):
    # widths beyond [0, 1] and negative, locations wrapping: the closed form covers them all
    w = torch.rand(K, dtype=dtype) * 1.4 - 0.2
    loc = torch.rand(K, dtype=dtype) * 3 - 1
    return w, loc


@pytest.mark.parametrize("n", [1, 2, 7, 8, 13])
@pytest.mark.parametrize("sigma", [0.7, 2.5, None])
@pytest.mark.parametrize("hard", [False, True])
def test_mask_matches_naive_paper_definition(n, sigma, hard):
    w, loc = _structure(6)
    mask = gaudi_mask(w, loc, _sigma(sigma), n, hard=hard)
    for k in range(6):
        torch.testing.assert_close(mask[k], gaudi_mask_naive(w[k], loc[k], n, sigma, hard), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 9, 16, 48, 33])
@pytest.mark.parametrize("sigma", [1.0, 3.0, None])
@pytest.mark.parametrize("training", [True, False])
def test_mask_and_gradients_match_official_formula(n, sigma, training):
    w, loc = _structure(24)
    w.requires_grad_()
    loc.requires_grad_()
    ref = official_mask(w, loc, sigma, n, training)
    out = gaudi_mask(w, loc, _sigma(sigma), n, hard=not training)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    expected = torch.autograd.grad((ref * g).sum(), (w, loc))
    got = torch.autograd.grad((out * g).sum(), (w, loc))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_float32_mask_is_close_to_official_float32():
    n = 768
    w, loc = _structure(64, torch.float32)
    ref = official_mask(w, loc, 10.0, n)
    out = gaudi_mask(w, loc, _sigma(10.0, torch.float32), n)
    assert out.dtype == torch.float32
    # the official evaluates phases up to ~1e3 rad in float32; ours are exact up to rounding
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)
    exact = gaudi_mask(w.double(), loc.double(), _sigma(10.0), n)
    assert (out.double() - exact).abs().max() < 1e-6


@pytest.mark.parametrize("sigma", [1.5, None])
def test_straight_through_gradient_is_the_derivative_of_the_closed_form(sigma):
    # the rounding passes the gradient straight through: our gradient at (w, l) must be the
    # finite-difference derivative of the continuous official formula at the rounded point
    n, K = 11, 5
    w, loc = _structure(K)
    wq, lq = torch.round(w * n) / n, torch.round(loc * n) / n
    g = torch.randn(K, n, dtype=F64)
    w.requires_grad_()
    loc.requires_grad_()
    got_w, got_l = torch.autograd.grad((gaudi_mask(w, loc, _sigma(sigma), n) * g).sum(), (w, loc))
    eps = 1e-6
    for k in range(K):
        for which, got in ((0, got_w), (1, got_l)):
            delta = torch.zeros(K, dtype=F64)
            delta[k] = eps
            args_p = (wq + delta, lq) if which == 0 else (wq, lq + delta)
            args_m = (wq - delta, lq) if which == 0 else (wq, lq - delta)
            fd = ((_official_formula(*args_p, sigma, n) - _official_formula(*args_m, sigma, n)) * g).sum() / (2 * eps)
            assert abs(float(got[k]) - float(fd)) < 1e-6


def test_gradcheck_of_the_closed_form_gradient():
    # the backward op is linear in grad: gradcheck it (fp64) through the registered autograd
    n, K = 9, 4
    w, loc = _structure(K)
    sigma = _sigma(2.0)

    def fn(w_, l_):
        return gaudi_mask(w_, l_, sigma, n)

    # the mask is piecewise constant in (w, l), so check the Jacobian the op reports against
    # the Jacobian of the continuous official formula at the rounded point
    w.requires_grad_()
    loc.requires_grad_()
    jac = torch.autograd.functional.jacobian(fn, (w, loc))
    wq, lq = torch.round(w.detach() * n) / n, torch.round(loc.detach() * n) / n
    ref = torch.autograd.functional.jacobian(lambda a, b: _official_formula(a, b, 2.0, n), (wq, lq))
    for a, b in zip(jac, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.autograd.gradcheck(lambda a, b: _official_formula(a, b, 2.0, n), (wq.requires_grad_(), lq.requires_grad_()))


def test_infinite_sigma_gives_exact_boxcars_in_float32():
    n = 10
    w = torch.tensor([0.3, 0.0, 1.0, 0.5, 0.1])
    loc = torch.tensor([0.8, 0.2, 0.35, -0.1, 0.0])
    mask = gaudi_mask(w, loc, _sigma(None, torch.float32), n)
    expected = torch.zeros(5, n)
    for k, (length, start) in enumerate([(3, 8), (0, 2), (10, 4), (5, -1), (1, 0)]):
        for j in range(start, start + length):
            expected[k, j % n] = 1.0
    assert torch.equal(mask, expected)
    hard = gaudi_mask(w, loc, _sigma(None, torch.float32), n, hard=True)
    expected[4] = 0.0  # one element wide: dropped in eval
    assert torch.equal(hard, expected)
    assert torch.equal(mask_intervals(expected)[1], torch.tensor([3, 0, 10, 5, 0]))


def test_gaudi_mask_opcheck():
    w, loc = _structure(5)
    for hard in (False, True):
        args = (w.clone().requires_grad_(), loc.clone().requires_grad_(), _sigma(2.0), 12, hard)
        torch.library.opcheck(torch.ops.effnn.gaudi_mask.default, args)
    grad = torch.randn(5, 12, dtype=F64)
    mask = gaudi_mask(w, loc, _sigma(2.0), 12)
    torch.library.opcheck(torch.ops.effnn.gaudi_mask_backward.default, (grad, mask, w, loc, _sigma(2.0), 12, False))


def test_gaudi_mask_errors():
    w, loc, s = torch.rand(3), torch.rand(3), torch.tensor(1.0)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        gaudi_mask(w, loc, s, 0)
    with pytest.raises(ValueError, match=r"1-D of one length K, got shapes \(3,\) and \(4,\)"):
        gaudi_mask(w, torch.rand(4), s, 8)
    with pytest.raises(ValueError, match="sigma must be a 0-d tensor"):
        gaudi_mask(w, loc, torch.ones(1), 8)
    with pytest.raises(TypeError, match="widths must be a floating-point tensor"):
        gaudi_mask(torch.ones(3, dtype=torch.int64), loc, s, 8)


def _random_masks(K, n, m, sigma, hard, dead=2):
    w = torch.rand(2, K, dtype=F64) * 0.9 + 0.05
    w[:, :dead] = 0.0  # dead components
    loc = torch.rand(2, K, dtype=F64)
    mask_in = gaudi_mask(w[0], loc[0], _sigma(sigma), n, hard=hard)
    mask_out = gaudi_mask(w[1], loc[1], _sigma(sigma), m, hard=hard)
    return mask_in, mask_out


@pytest.mark.parametrize("sigma", [4.0, None])
@pytest.mark.parametrize("tokens", [1, 50])
def test_masked_linear_skips_dead_components_exactly(sigma, tokens):
    K, r, n, m = 7, 2, 12, 10
    mask_in, mask_out = _random_masks(K, n, m, sigma, hard=False)
    mask_in[2] = 0.0  # one side dead only: contributes nothing but its width still learns
    w1 = torch.randn(K, r, n, dtype=F64, requires_grad=True)
    w2 = torch.randn(K, m, r, dtype=F64, requires_grad=True)
    mi, mo = mask_in.clone().requires_grad_(), mask_out.clone().requires_grad_()
    bias = torch.randn(m, dtype=F64, requires_grad=True)
    x = torch.randn(tokens, n, dtype=F64, requires_grad=True)
    y = gblr_masked_linear(x, w1, w2, mi, mo, bias)
    weight = sum(mo[k, :, None] * (w2[k] @ w1[k]) * mi[k, None, :] for k in range(K))
    y_ref = x @ weight.T + bias
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w1, w2, mi, mo, bias), g)
    ref = torch.autograd.grad(y_ref, (x, w1, w2, mi, mo, bias), g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert got[3][2].abs().sum() > 0  # the half-dead component's empty input mask gets a gradient


def _packed_case(K, r, n, m, sigma, dead=2):
    mask_in, mask_out = _random_masks(K, n, m, sigma, hard=True, dead=dead)
    w1 = torch.randn(K, r, n, dtype=F64)
    w2 = torch.randn(K, m, r, dtype=F64)
    return w1, w2, mask_in, mask_out


@pytest.mark.parametrize("sigma", [3.0, None])
@pytest.mark.parametrize("K,r,n,m", [(9, 1, 16, 12), (6, 3, 10, 21), (1, 1, 5, 4), (12, 2, 7, 7)])
def test_structured_product_equals_dense_masked_weight(sigma, K, r, n, m):
    w1, w2, mask_in, mask_out = _packed_case(K, r, n, m, sigma)
    packed = pack_structure(w1, w2, mask_in, mask_out)
    x = torch.randn(3, 4, n, dtype=F64)
    bias = torch.randn(m, dtype=F64)
    y = gblr_structured(x, packed, bias)
    torch.testing.assert_close(y, x @ gblr_dense_weight(w1, w2, mask_in, mask_out).T + bias)
    live = ((mask_in != 0).any(1) & (mask_out != 0).any(1)).sum()
    if sigma is None:  # boxcars: the packed cost is at least the components' own
        _, l_in = mask_intervals(mask_in)
        _, l_out = mask_intervals(mask_out)
        own = int((r * (l_in + l_out) * ((l_in > 0) & (l_out > 0))).sum())
        assert packed.macs_per_token >= own
    assert live < K or packed.macs_per_token > 0


@given(
    K=st.integers(1, 6), r=st.integers(1, 3), n=st.integers(1, 11), m=st.integers(1, 11),
    tokens=st.integers(0, 4), seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_structured_product_property(K, r, n, m, tokens, seed):
    torch.manual_seed(seed)
    w1, w2, mask_in, mask_out = _packed_case(K, r, n, m, None, dead=K // 3)
    packed = pack_structure(w1, w2, mask_in, mask_out)
    x = torch.randn(tokens, n, dtype=F64)
    torch.testing.assert_close(gblr_structured(x, packed), x @ gblr_dense_weight(w1, w2, mask_in, mask_out).T)


def test_structured_product_gradcheck_and_opcheck():
    w1, w2, mask_in, mask_out = _packed_case(6, 2, 9, 8, None)
    packed = pack_structure(w1, w2, mask_in, mask_out)
    a = packed.in_factor.clone().requires_grad_()
    b = packed.out_factor.clone().requires_grad_()
    bias = torch.randn(8, dtype=F64, requires_grad=True)
    x = torch.randn(5, 9, dtype=F64, requires_grad=True)

    def fn(x_, a_, b_, bias_):
        p = type(packed)(a_, packed.in_meta, b_, packed.out_meta, packed.perm, 9, 8)
        return gblr_structured(x_, p, bias_)

    torch.autograd.gradcheck(fn, (x, a, b, bias))
    args = (x, a, packed.in_meta, b, packed.out_meta, packed.perm, bias, 8, "ref", True)
    torch.library.opcheck(torch.ops.effnn.gblr_structured.default, args)


def test_structured_product_errors():
    w1, w2, mask_in, mask_out = _packed_case(3, 1, 6, 5, None, dead=0)
    packed = pack_structure(w1, w2, mask_in, mask_out)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 6\), got \(2, 7\)"):
        gblr_structured(torch.randn(2, 7, dtype=F64), packed)
    with pytest.raises(TypeError, match="in_factor has dtype torch.float64 but x has dtype torch.float32"):
        gblr_structured(torch.randn(2, 6), packed)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        gblr_structured(torch.randn(2, 6, dtype=F64), packed, torch.randn(4, dtype=F64))
    with pytest.raises(NotImplementedError, match="triton"):
        gblr_structured(torch.randn(2, 6, dtype=F64), packed, backend="triton")
