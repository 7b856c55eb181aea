import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import effnn
from effnn.ops.monarch import (
    monarch_factor_shapes,
    monarch_linear,
    monarch_linear_backward_ref,
    monarch_linear_ref,
    monarch_project,
    monarch_to_dense,
)
from tests.naive import monarch_naive, monarch_square_project_paper

# (in_features, out_features, nblocks): square, expanding, contracting, non-divisible, nb=1,
# nb=n (1x1 blocks), sqrt(n), middle width not divisible by nblocks
SHAPES = [
    (16, 16, 4),
    (64, 64, 8),
    (24, 96, 4),
    (96, 24, 4),
    (100, 70, 3),
    (70, 100, 3),
    (5, 7, 1),
    (7, 5, 7),
    (12, 48, 4),
    (30, 30, 6),
]


def factors(in_features, out_features, nblocks, dtype=torch.float64, requires_grad=False):
    s1, s2 = monarch_factor_shapes(in_features, out_features, nblocks)
    w1 = torch.randn(s1, dtype=dtype).requires_grad_(requires_grad)
    w2 = torch.randn(s2, dtype=dtype).requires_grad_(requires_grad)
    return w1, w2


def test_factor_shapes_follow_fly():
    # fly: expansion -> (nb, in_blk, in_blk), (nb, out_blk, in_blk); else (nb, out_blk, in_blk),
    # (nb, out_blk, out_blk); block sizes are ceilings
    assert monarch_factor_shapes(768, 3072, 4) == ((4, 192, 192), (4, 768, 192))
    assert monarch_factor_shapes(3072, 768, 4) == ((4, 192, 768), (4, 192, 192))
    assert monarch_factor_shapes(1000, 1000, 3) == ((3, 334, 334), (3, 334, 334))
    assert monarch_factor_shapes(4096, 4096, 64) == ((64, 64, 64), (64, 64, 64))


@pytest.mark.parametrize("in_features,out_features,nblocks", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_naive_fp64(in_features, out_features, nblocks, bias):
    w1, w2 = factors(in_features, out_features, nblocks, requires_grad=True)
    b = torch.randn(out_features, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(6, in_features, dtype=torch.float64, requires_grad=True)
    y = monarch_linear(x, w1, w2, b, out_features, backend="ref")
    y_naive = monarch_naive(x, w1, w2, b, out_features)
    torch.testing.assert_close(y, y_naive, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, w1, w2, b) if t is not None]
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_naive, inputs, g), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_general_factors_k_ne_l():
    # blockdiag_butterfly_multiply's general case: k*q == l*r with k != l
    w1 = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 20, dtype=torch.float64, requires_grad=True)
    y = monarch_linear(x, w1, w2)
    torch.testing.assert_close(y, monarch_naive(x, w1, w2, None, 21))
    assert torch.autograd.gradcheck(lambda *a: monarch_linear(*a), (x, w1, w2))


@pytest.mark.parametrize("in_features,out_features,nblocks", [(6, 6, 2), (7, 5, 3), (4, 9, 2)])
def test_gradcheck(in_features, out_features, nblocks):
    w1, w2 = factors(in_features, out_features, nblocks, requires_grad=True)
    b = torch.randn(out_features, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, in_features, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w1, w2, b: monarch_linear(x, w1, w2, b, out_features)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w1, w2, b))


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    nblocks=st.integers(1, 9),
    tokens=st.integers(0, 5),
)
def test_property_any_shape(in_features, out_features, nblocks, tokens):
    w1, w2 = factors(in_features, out_features, nblocks, requires_grad=True)
    x = torch.randn(tokens, in_features, dtype=torch.float64, requires_grad=True)
    y = monarch_linear(x, w1, w2, None, out_features)
    assert y.shape == (tokens, out_features)
    torch.testing.assert_close(y, monarch_naive(x, w1, w2, None, out_features))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w1, w2), g)
    want = torch.autograd.grad(monarch_naive(x, w1, w2, None, out_features), (x, w1, w2), g)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


def test_leading_dims_1d_and_non_contiguous():
    w1, w2 = factors(12, 20, 4)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    y = monarch_linear(x, w1, w2, None, 20)
    assert y.shape == (2, 3, 20)
    torch.testing.assert_close(y.reshape(6, 20), monarch_naive(x.reshape(6, 12), w1, w2, None, 20))
    v = torch.randn(12, dtype=torch.float64)
    torch.testing.assert_close(monarch_linear(v, w1, w2, None, 20), monarch_naive(v[None], w1, w2, None, 20)[0])
    xt = torch.randn(12, 7, dtype=torch.float64).t()  # non-contiguous (7, 12)
    torch.testing.assert_close(monarch_linear(xt, w1, w2, None, 20), monarch_naive(xt, w1, w2, None, 20))
    w1t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous factor
    torch.testing.assert_close(monarch_linear(xt, w1t, w2, None, 20), monarch_naive(xt, w1, w2, None, 20))


def test_empty_batch_forward_and_backward():
    w1, w2 = factors(12, 20, 4, requires_grad=True)
    x = torch.randn(0, 12, dtype=torch.float64, requires_grad=True)
    y = monarch_linear(x, w1, w2, None, 20)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert x.grad.shape == (0, 12)
    assert torch.count_nonzero(w1.grad) == 0 and torch.count_nonzero(w2.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_2x_of_dtype_reference(dtype):
    # flash-attention's rule: our error against fp64 is at most 2x that of the naive reference
    # computed in the same low precision (plus a small slack)
    w1, w2 = factors(64, 96, 4)
    w1, w2 = w1 / 8, w2 / 8
    x = torch.randn(32, 64, dtype=torch.float64)
    exact = monarch_naive(x, w1, w2, None, 96)
    ours = monarch_linear(x.to(dtype), w1.to(dtype), w2.to(dtype), None, 96)
    low = monarch_naive(x.to(dtype).float(), w1.to(dtype).float(), w2.to(dtype).float(), None, 96)
    low = low.to(dtype)
    assert ours.dtype == dtype
    err = (ours.double() - exact).abs().max().item()
    ref_err = (low.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3


def test_autocast_follows_ambient_dtype():
    w1, w2 = factors(16, 16, 4, dtype=torch.float32)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = monarch_linear(x, w1, w2)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), monarch_linear(x, w1, w2), rtol=0.05, atol=0.1)


def test_nonfinite_inputs_propagate_like_dense():
    w1, w2 = factors(8, 8, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    x[1, 0] = float("nan")
    y = monarch_linear(x, w1, w2)
    dense = x @ monarch_to_dense(w1, w2, 8, 8).t()
    assert torch.equal(torch.isnan(y), torch.isnan(dense))
    assert torch.isfinite(y[[0, 2]]).all()


def test_opcheck_forward_and_backward_ops():
    w1, w2 = factors(12, 20, 4, dtype=torch.float32, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    x = torch.randn(5, 12, requires_grad=True)
    for args in [(x, w1, w2, b, 20), (x, w1, w2, None, 18)]:
        for save_mid in (True, False):
            torch.library.opcheck(torch.ops.effnn.monarch_linear.default, (*args, "ref", save_mid))
    g = torch.randn(5, 20)
    mid_t = torch.ops.effnn.monarch_linear(x, w1, w2, b, 20, "ref", True)[1].detach()
    for need_input_grad in (True, False):
        torch.library.opcheck(
            torch.ops.effnn.monarch_linear_backward.default,
            (g, x.detach(), mid_t, w1.detach(), w2.detach(), need_input_grad, "ref"),
        )


def test_saved_middle_activation_only_when_gradients_need_it():
    w1, w2 = factors(12, 20, 4)
    x = torch.randn(5, 12, dtype=torch.float64)
    y, mid_t = torch.ops.effnn.monarch_linear(x, w1, w2, None, 20, "ref", True)
    xp = torch.nn.functional.pad(x, (0, 4 * 3 - 12))
    naive_mid = torch.cat([xp[:, kk * 3:(kk + 1) * 3] @ w1[kk].T for kk in range(4)], dim=1)
    torch.testing.assert_close(mid_t, naive_mid.t())
    assert torch.ops.effnn.monarch_linear(x, w1, w2, None, 20, "ref", False)[1].numel() == 0
    dx, dw1, dw2 = monarch_linear_backward_ref(torch.randn(5, 20, dtype=torch.float64), x, mid_t, w1, w2, False)
    assert dx.numel() == 0 and dw1.shape == w1.shape and dw2.shape == w2.shape


def test_flop_counter_counts_real_cost():
    w1, w2 = factors(24, 96, 4, dtype=torch.float32, requires_grad=True)
    x = torch.randn(10, 24, requires_grad=True)
    w = w1.numel() + w2.numel()
    with FlopCounterMode(display=False) as counter:
        y = monarch_linear(x, w1, w2)
    assert counter.get_total_flops() == 2 * 10 * w
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    # grad of the middle, grad_w2, grad_w1, grad_x (the middle activation was saved)
    assert counter.get_total_flops() == 2 * 10 * (2 * w1.numel() + 2 * w2.numel())


def test_fvcore_counts_macs():
    fvcore_nn = pytest.importorskip("fvcore.nn")
    layer = effnn.MonarchLinear(24, 96, nblocks=4)
    analysis = fvcore_nn.FlopCountAnalysis(layer, (torch.randn(10, 24),))
    analysis.set_op_handle(**effnn.flops.fvcore_handles())
    analysis.unsupported_ops_warnings(False)
    assert analysis.total() == 10 * (layer.blkdiag1.numel() + layer.blkdiag2.numel())
    assert not analysis.unsupported_ops()


# ---- projection and densification -------------------------------------------------------------


@pytest.mark.parametrize("in_features,out_features,nblocks", SHAPES + [(256, 64, 4)])
def test_project_is_exact_on_monarch_matrices(in_features, out_features, nblocks):
    w1, w2 = factors(in_features, out_features, nblocks)
    dense = monarch_to_dense(w1, w2, in_features, out_features)
    torch.testing.assert_close(dense, monarch_naive(torch.eye(in_features, dtype=torch.float64), w1, w2, None, out_features).t())
    p1, p2 = monarch_project(dense, nblocks)
    torch.testing.assert_close(monarch_to_dense(p1, p2, in_features, out_features), dense)


def test_project_matches_paper_algorithm_1_for_sqrt_n_blocks():
    weight = torch.randn(64, 64, dtype=torch.float64)
    p1, p2 = monarch_project(weight, 8)
    ours = monarch_to_dense(p1, p2, 64, 64)
    paper = monarch_square_project_paper(weight, 8)
    torch.testing.assert_close(ours, paper)


@pytest.mark.parametrize("in_features,out_features,nblocks", [(48, 48, 4), (32, 96, 4), (90, 40, 3), (30, 30, 4)])
def test_project_is_optimal(in_features, out_features, nblocks):
    # The error equals the energy of the singular values the blocks cannot keep (Eckart-Young on
    # independent blocks), and no perturbation of the factors does better.
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    p1, p2 = monarch_project(weight, nblocks)
    err = (monarch_to_dense(p1, p2, in_features, out_features) - weight).norm()
    for _ in range(20):
        q1 = p1 + 1e-3 * torch.randn_like(p1)
        q2 = p2 + 1e-3 * torch.randn_like(p2)
        assert (monarch_to_dense(q1, q2, in_features, out_features) - weight).norm() >= err
    # gradient of the error vanishes at the optimum
    q1, q2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()
    loss = (monarch_to_dense(q1, q2, in_features, out_features) - weight).square().sum()
    g1, g2 = torch.autograd.grad(loss, (q1, q2))
    assert max(g1.abs().max(), g2.abs().max()) < 1e-9


def test_project_error_on_random_matrix_matches_theory():
    # nblocks = sqrt(n): every 8x8 block keeps its largest singular value
    weight = torch.randn(64, 64, dtype=torch.float64)
    p1, p2 = monarch_project(weight, 8)
    err = (monarch_to_dense(p1, p2, 64, 64) - weight).norm() ** 2
    blocks = weight.view(8, 8, 8, 8).permute(1, 2, 0, 3)
    sv = torch.linalg.svdvals(blocks)
    torch.testing.assert_close(err, sv[..., 1:].square().sum())


# ---- bad input --------------------------------------------------------------------------------


def test_errors_name_the_argument():
    w1, w2 = factors(12, 20, 4, dtype=torch.float32)
    x = torch.randn(5, 12)
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        monarch_linear(x, w1.double(), w2)
    with pytest.raises(TypeError, match="floating-point"):
        monarch_linear(torch.ones(5, 12, dtype=torch.int64), w1, w2)
    with pytest.raises(ValueError, match="x has 13 features"):
        monarch_linear(torch.randn(5, 13), w1, w2)
    with pytest.raises(ValueError, match="must be 3-D"):
        monarch_linear(x, w1[0], w2)
    with pytest.raises(ValueError, match="middle features"):
        monarch_linear(x, w1, w2[:, :, :2])
    with pytest.raises(ValueError, match="out_features must be in"):
        monarch_linear(x, w1, w2, None, 21)
    with pytest.raises(ValueError, match="bias must have shape"):
        monarch_linear(x, w1, w2, torch.randn(19), 20)
    with pytest.raises(ValueError, match="on meta but x is on cpu"):
        monarch_linear(x, w1.to("meta"), w2)
    with pytest.raises(ValueError, match="backend must be one of"):
        monarch_linear(x, w1, w2, backend="cuda")
    with pytest.raises(TypeError, match="must be a Tensor"):
        monarch_linear(x.tolist(), w1, w2)


def test_forced_backend_refusals_say_why(monkeypatch):
    w1, w2 = factors(12, 20, 4, dtype=torch.float32)
    x = torch.randn(5, 12)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(effnn.BackendError, match="triton.*CUDA tensors"):
        monarch_linear(x, w1, w2, backend="triton")
    with pytest.raises(effnn.BackendError, match="ext.*float32 and bfloat16 only"):
        monarch_linear(x.double(), w1.double(), w2.double(), backend="ext")
    # auto never fails: it falls back to the reference path
    torch.testing.assert_close(monarch_linear(x, w1, w2), monarch_linear_ref(x, w1, w2, None, 20))


def test_meta_tensors_give_shapes():
    w1, w2 = factors(12, 20, 4, dtype=torch.float32)
    y = monarch_linear(torch.empty(3, 12, device="meta"), w1.to("meta"), w2.to("meta"))
    assert y.is_meta and y.shape == (3, 20)


def test_auto_uses_the_extension_when_built_and_the_reference_otherwise(monkeypatch):
    from effnn import _ext
    from effnn.ops.monarch import choose_backend

    w1, w2 = factors(12, 20, 4, dtype=torch.float32)
    x = torch.randn(5, 12)
    assert choose_backend(x, w1, w2) == ("ext" if _ext.load() is not None else "ref")
    assert choose_backend(x.double(), w1.double(), w2.double()) == "ref"
    monkeypatch.setattr(_ext, "unavailable_reason", lambda: "effnn._C is not built (test)")
    assert choose_backend(x, w1, w2) == "ref"
    with pytest.raises(effnn.BackendError, match="not built"):
        choose_backend(x, w1, w2, "ext")
    torch.testing.assert_close(monarch_linear(x, w1, w2), monarch_linear_ref(x, w1, w2, None, 20))
