"""ContextBroadcast / context_broadcast (Hyeon-Woo et al., ICCV 2023): the paper's formula, its
uniform-attention reading, gradients, shapes, compile/export, round trips and bad input."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from effnn import ContextBroadcast
from effnn.nn.broadcast import context_broadcast


def cb_naive(x: torch.Tensor) -> torch.Tensor:
    """The paper's CB for x of shape (B, N, D), loops over samples and tokens:
    out_i = (x_i + (1/N) sum_j x_j) / 2, the sum over all N tokens (class token included)."""
    B, N, D = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        context = torch.zeros(D, dtype=x.dtype)
        for j in range(N):
            context += x[b, j]
        context /= N
        for i in range(N):
            out[b, i] = (x[b, i] + context) / 2
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 197, 6), (3, 5, 7), (0, 4, 3)])
def test_matches_naive_paper_formula_fp64(shape):
    x = torch.randn(shape, dtype=torch.float64)
    expected = cb_naive(x)
    torch.testing.assert_close(ContextBroadcast()(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(context_broadcast(x), expected, rtol=1e-12, atol=1e-12)


def test_is_half_identity_half_uniform_attention():
    # uniform attention: softmax of constant logits, i.e. attention with zero queries and keys
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    zeros = torch.zeros_like(x)
    uniform = F.scaled_dot_product_attention(zeros, zeros, x)
    torch.testing.assert_close(context_broadcast(x), 0.5 * x + 0.5 * uniform)
    # and the token-mixing matrix (I + 11^T / N) / 2
    n = x.shape[1]
    mix = 0.5 * (torch.eye(n, dtype=x.dtype) + torch.full((n, n), 1.0 / n, dtype=x.dtype))
    torch.testing.assert_close(context_broadcast(x), mix @ x)


def test_token_dim_axes_and_tuples():
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    # NCHW feature map: tokens are the spatial positions
    flat = x.flatten(2).transpose(1, 2)  # (B, HW, C)
    y = ContextBroadcast(token_dim=(2, 3))(x)
    torch.testing.assert_close(y.flatten(2).transpose(1, 2), cb_naive(flat))
    torch.testing.assert_close(ContextBroadcast(token_dim=(-1, -2))(x), y)
    # sequence-first layout (N, B, D)
    seq = torch.randn(7, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(
        ContextBroadcast(token_dim=0)(seq), cb_naive(seq.transpose(0, 1)).transpose(0, 1)
    )


@pytest.mark.parametrize("token_dim", [1, (1, 2)])
def test_gradcheck_fp64(token_dim):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    cb = ContextBroadcast(token_dim)
    assert torch.autograd.gradcheck(cb, (x,))
    assert torch.autograd.gradgradcheck(cb, (x,))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    data=st.data(),
)
def test_properties_over_shapes(shape, data):
    ndim = len(shape)
    dims = data.draw(
        st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim - 1, unique=True)
    )
    x = torch.randn(shape, dtype=torch.float64)
    y = ContextBroadcast(tuple(dims))(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    mean_x = x.mean(dims, keepdim=True)
    # the formula, the token mean is kept, and every deviation from it is halved
    torch.testing.assert_close(y, (x + mean_x) / 2)
    torch.testing.assert_close(y.mean(dims, keepdim=True), mean_x)
    torch.testing.assert_close(y - mean_x, (x - mean_x) / 2)
    # a constant along the token axes is a fixed point
    torch.testing.assert_close(ContextBroadcast(tuple(dims))(mean_x.expand_as(x)), mean_x.expand_as(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_keeps_dtype_and_is_accurate(dtype):
    x = torch.randn(2, 197, 64, dtype=torch.float64) + 3.0  # a large common offset
    ref = context_broadcast(x)
    y = ContextBroadcast()(x.to(dtype))
    assert y.dtype == dtype
    # within 2x the error of rounding the exact result to dtype (plus an ulp of slack)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), ref, rtol=2 * eps, atol=2 * eps)


def test_torch_compile_fullgraph_matches_eager():
    cb = ContextBroadcast()
    x = torch.randn(2, 17, 8, requires_grad=True)
    compiled = torch.compile(cb, fullgraph=True)
    y_c, y_e = compiled(x), cb(x)
    torch.testing.assert_close(y_c, y_e)
    g = torch.randn_like(y_e)
    torch.testing.assert_close(
        torch.autograd.grad(y_c, x, g)[0], torch.autograd.grad(y_e, x, g)[0]
    )


def test_torch_export_matches_eager():
    cb = ContextBroadcast(token_dim=(1, 2))
    x = torch.randn(2, 3, 4, 5)
    exported = torch.export.export(cb, (x,))
    torch.testing.assert_close(exported.module()(x), cb(x))


def test_no_state_and_round_trips(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    cb = ContextBroadcast(token_dim=(1, 2))
    assert list(cb.parameters()) == [] and list(cb.buffers()) == [] and cb.state_dict() == {}
    x = torch.randn(2, 3, 4, 5)
    y = cb(x)
    st_torch.save_file(cb.state_dict(), tmp_path / "cb.safetensors")
    fresh = ContextBroadcast(token_dim=(1, 2))
    fresh.load_state_dict(st_torch.load_file(tmp_path / "cb.safetensors"))
    assert torch.equal(fresh(x), y)
    assert torch.equal(copy.deepcopy(cb)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(cb))(x), y)
    buf = io.BytesIO()
    torch.save(cb, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)  # our own object, trusted
    assert cb.to(torch.float64)(x.double()).dtype == torch.float64
    assert repr(cb) == "ContextBroadcast(token_dim=(1, 2))"
    assert repr(ContextBroadcast()) == "ContextBroadcast(token_dim=1)"


def test_output_is_a_new_tensor():
    x = torch.randn(2, 3, 4)
    before = x.clone()
    y = ContextBroadcast()(x)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x, before)


def test_nan_reaches_every_token_of_its_sample_only():
    x = torch.randn(2, 5, 3)
    x[0, 2, 1] = float("nan")
    y = ContextBroadcast()(x)
    assert torch.isnan(y[0, :, 1]).all()  # through the mean, as dense attention would spread it
    assert torch.isfinite(y[0, :, [0, 2]]).all() and torch.isfinite(y[1]).all()


def test_bad_input_errors():
    cb = ContextBroadcast()
    with pytest.raises(TypeError, match="ContextBroadcast: input must be a Tensor, got list"):
        cb([[1.0, 2.0]])
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        cb(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_dim=1 is out of range .* shape \(5,\)"):
        cb(torch.randn(5))
    with pytest.raises(ValueError, match=r"token_dim=0 covers every dimension of the input of shape \(5,\)"):
        ContextBroadcast(0)(torch.randn(5))
    with pytest.raises(ValueError, match=r"token_dim=1 is out of range for an input of shape \(\)"):
        cb(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"token_dim=3 is out of range .* \(2, 3, 4\)"):
        ContextBroadcast(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="names a dimension twice"):
        ContextBroadcast((1, -2))(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"covers every dimension"):
        ContextBroadcast((0, 1))(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 0, 4\) has no tokens"):
        cb(torch.randn(2, 0, 4))
    for bad in (1.0, True, (), "1", (1, None)):
        with pytest.raises(TypeError, match="token_dim must be an int or a non-empty sequence"):
            ContextBroadcast(bad)
    with pytest.raises(TypeError, match="context_broadcast: token_dim must be"):
        context_broadcast(torch.randn(2, 3, 4), 1.5)
    with pytest.raises(ValueError, match="context_broadcast: the input of shape"):
        context_broadcast(torch.randn(2, 0, 4))
    # an empty batch is fine: nothing to average across samples
    assert cb(torch.randn(0, 3, 4)).shape == (0, 3, 4)
