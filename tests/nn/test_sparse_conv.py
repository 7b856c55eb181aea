"""effnn.nn.sparse_conv against dense torch convolutions on small occupied grids."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from effnn.nn.sparse_conv import (
    SparseConv3d,
    SparseConvTensor,
    SparseInverseConv3d,
    SparseSequential,
    SubMConv3d,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_sites(batch=2, size=6, density=0.3, margin=4, gen=None):
    """Distinct (batch, x, y, z) in [0, size)^3 of a dense grid of size + margin (so every output
    of a strided convolution lies inside the dense grid), sorted in a random order."""
    occ = torch.rand(batch, size, size, size, generator=gen) < density
    occ[0, 0, 0, 0] = True  # never empty
    idx = occ.nonzero()
    idx = idx[torch.randperm(idx.shape[0], generator=gen)]
    return idx, (size + margin,) * 3


def dense(features, idx, shape):
    return SparseConvTensor(features, idx).dense(shape)


def at(grid, idx):
    b, x, y, z = idx.long().unbind(1)
    return grid[b, :, x, y, z]


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("kernel_size", [3, 1, (3, 1, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_subm_matches_dense_conv(kernel_size, bias):
    idx, shape = random_sites()
    x = torch.randn(idx.shape[0], 3, dtype=torch.float64, requires_grad=True)
    conv = SubMConv3d(3, 5, kernel_size, bias=bias).double()
    out = conv(SparseConvTensor(x, idx))
    assert torch.equal(out.indices, idx)
    pad = tuple(k // 2 for k in conv.kernel_size)
    ref = at(F.conv3d(dense(x, idx, shape), conv.weight.permute(0, 4, 1, 2, 3), conv.bias, padding=pad), idx)
    assert torch.allclose(out.features, ref, atol=1e-12)
    g = torch.randn_like(ref)
    params = [x] + list(conv.parameters())
    for a, b in zip(grads(out.features, params, g), grads(ref, params, g), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("kernel_size,stride,padding", [
    (2, 2, 0),  # SphereFormer's downsampling
    (3, 2, 1),  # CenterPoint's / SECOND's
    (3, 1, 0),
    ((2, 3, 1), (2, 1, 1), (0, 1, 0)),
])
def test_strided_matches_dense_conv(kernel_size, stride, padding):
    idx, shape = random_sites()
    x = torch.randn(idx.shape[0], 3, dtype=torch.float64, requires_grad=True)
    conv = SparseConv3d(3, 4, kernel_size, stride, padding, indice_key="down").double()
    out = conv(SparseConvTensor(x, idx))
    occ = dense(torch.ones(idx.shape[0], 1, dtype=torch.float64), idx, shape)
    reached = F.conv3d(occ, torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64), stride=stride,
                       padding=padding)[:, 0] > 0
    assert torch.equal(out.indices, reached.nonzero())  # sorted by batch, x, y, z
    full = F.conv3d(dense(x, idx, shape), conv.weight.permute(0, 4, 1, 2, 3), conv.bias,
                    stride=stride, padding=padding)
    ref = at(full, out.indices)
    assert torch.allclose(out.features, ref, atol=1e-12)
    g = torch.randn_like(ref)
    params = [x] + list(conv.parameters())
    for a, b in zip(grads(out.features, params, g), grads(ref, params, g), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("kernel_size,stride,padding", [(2, 2, 0), (3, 2, 1)])
def test_inverse_matches_dense_transposed_conv(kernel_size, stride, padding):
    idx, shape = random_sites()
    x = torch.randn(idx.shape[0], 3, dtype=torch.float64)
    down = SparseConv3d(3, 4, kernel_size, stride, padding, indice_key="k").double()
    coarse = down(SparseConvTensor(x, idx))
    y = torch.randn(coarse.indices.shape[0], 4, dtype=torch.float64, requires_grad=True)
    up = SparseInverseConv3d(4, 2, kernel_size, indice_key="k").double()
    out = up(coarse.replace_feature(y))
    assert torch.equal(out.indices, idx)  # back on the input sites, in their order
    cshape = [int(v) + 1 for v in coarse.indices[:, 1:].amax(0)]
    full = F.conv_transpose3d(dense(y, coarse.indices, cshape), up.weight.permute(4, 0, 1, 2, 3), up.bias,
                              stride=stride, padding=padding)
    ref = at(full, idx)
    assert torch.allclose(out.features, ref, atol=1e-12)
    g = torch.randn_like(ref)
    params = [y] + list(up.parameters())
    for a, b in zip(grads(out.features, params, g), grads(ref, params, g), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_gradcheck():
    idx, _ = random_sites(batch=1, size=4, density=0.4)
    x = torch.randn(idx.shape[0], 2, dtype=torch.float64, requires_grad=True)
    subm = SubMConv3d(2, 3).double()
    down = SparseConv3d(2, 3, 2, 2, indice_key="d").double()
    up = SparseInverseConv3d(3, 2, 2, indice_key="d").double()
    coarse = down(SparseConvTensor(x.detach(), idx))
    y = torch.randn(coarse.indices.shape[0], 3, dtype=torch.float64, requires_grad=True)
    cases = [(subm, x, lambda f: SparseConvTensor(f, idx)), (down, x, lambda f: SparseConvTensor(f, idx)),
             (up, y, coarse.replace_feature)]
    for module, inp, wrap in cases:
        w = module.weight.detach().clone().requires_grad_()
        b = module.bias.detach().clone().requires_grad_()

        def f(inp, w, b, module=module, wrap=wrap):
            return torch.func.functional_call(module, {"weight": w, "bias": b}, (wrap(inp),)).features
        assert torch.autograd.gradcheck(f, (inp, w, b))


@settings(max_examples=15, deadline=None)
@given(n_batch=st.integers(1, 3), size=st.integers(1, 5), density=st.floats(0.05, 0.9),
       c_in=st.integers(1, 4), c_out=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_hypothesis_random_sets(n_batch, size, density, c_in, c_out, seed):
    gen = torch.Generator().manual_seed(seed)
    idx, shape = random_sites(n_batch, size, density, margin=3, gen=gen)
    x = torch.randn(idx.shape[0], c_in, dtype=torch.float64, generator=gen)
    t = SparseConvTensor(x, idx)
    subm = SubMConv3d(c_in, c_out).double()
    ref = at(F.conv3d(dense(x, idx, shape), subm.weight.permute(0, 4, 1, 2, 3), subm.bias, padding=1), idx)
    assert torch.allclose(subm(t).features, ref, atol=1e-12)
    down = SparseConv3d(c_in, c_out, 2, 2, indice_key="d").double()
    out = down(t)
    assert torch.equal(out.indices, torch.unique(torch.cat([idx[:, :1], idx[:, 1:] // 2], 1), dim=0))
    full = F.conv3d(dense(x, idx, shape), down.weight.permute(0, 4, 1, 2, 3), down.bias, stride=2)
    assert torch.allclose(out.features, at(full, out.indices), atol=1e-12)


def test_kernel_maps_cached_and_shared():
    idx, _ = random_sites()
    t = SparseConvTensor(torch.randn(idx.shape[0], 4), idx)
    a, b = SubMConv3d(4, 4), SubMConv3d(4, 4)
    y = a(t)
    kmap = t.indice_dict[("subm", (3, 3, 3))]
    assert y.indice_dict is t.indice_dict
    b(y)
    assert t.indice_dict[("subm", (3, 3, 3))] is kmap  # built once for the two convolutions
    down = SparseConv3d(4, 8, 2, 2, indice_key="spconv1")
    up = SparseInverseConv3d(8, 4, 2, indice_key="spconv1")
    coarse = down(y)
    assert set(coarse.indice_dict) == {"spconv1"}
    back = up(coarse)
    assert back.indice_dict is t.indice_dict and back.indices is t.indices


def test_clouds_in_a_batch_are_independent():
    idx, _ = random_sites(batch=2)
    x = torch.randn(idx.shape[0], 3, dtype=torch.float64)
    net = SparseSequential(SubMConv3d(3, 4), nn.ReLU(), SparseConv3d(4, 5, 2, 2, indice_key="d"),
                           SubMConv3d(5, 5), SparseInverseConv3d(5, 3, 2, indice_key="d")).double()
    both = net(SparseConvTensor(x, idx)).features
    for b in (0, 1):
        keep = idx[:, 0] == b
        sub = idx[keep].clone()
        sub[:, 0] = 0
        alone = net(SparseConvTensor(x[keep], sub)).features
        assert torch.allclose(alone, both[keep], atol=1e-12)


def test_sparse_sequential_hands_features_to_dense_modules():
    idx, _ = random_sites()
    x = torch.randn(idx.shape[0], 4)
    bn = nn.BatchNorm1d(4)
    seq = SparseSequential(bn, nn.ReLU(), SubMConv3d(4, 2, bias=False))
    out = seq(SparseConvTensor(x, idx))
    conv = seq[2]
    ref = conv(SparseConvTensor(F.relu(F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)), idx))
    assert torch.allclose(out.features, ref.features, atol=1e-6)
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "0.running_mean", "0.running_var",
                                      "0.num_batches_tracked", "2.weight"]


def test_spconv_parameter_layout_and_round_trips():
    conv = SubMConv3d(4, 32, 3, bias=False)
    assert dict(conv.named_parameters())["weight"].shape == (32, 3, 3, 3, 4)  # KRSC
    assert SparseConv3d(32, 64, 2, 2).weight.shape == (64, 2, 2, 2, 32)
    assert SparseInverseConv3d(64, 32, 2, indice_key="k").weight.shape == (32, 2, 2, 2, 64)
    assert SubMConv3d(4, 8).bias.shape == (8,)
    idx, _ = random_sites()
    t = SparseConvTensor(torch.randn(idx.shape[0], 4), idx)
    for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        assert torch.equal(clone(t).features, conv(t).features)
    fresh = SubMConv3d(4, 32, 3, bias=False)
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(fresh(t).features, conv(t).features)


def test_autocast_and_half_inputs():
    idx, _ = random_sites()
    x = torch.randn(idx.shape[0], 4)
    conv = SubMConv3d(4, 8)
    ref = conv(SparseConvTensor(x, idx)).features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(SparseConvTensor(x, idx)).features
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=5e-2, rtol=5e-2)
    with pytest.raises(TypeError, match="dtype"):
        conv(SparseConvTensor(x.double(), idx))


def test_empty_input():
    idx = torch.zeros(0, 4, dtype=torch.long)
    t = SparseConvTensor(torch.zeros(0, 3), idx)
    assert SubMConv3d(3, 4)(t).features.shape == (0, 4)
    down = SparseConv3d(3, 4, 2, 2, indice_key="d")(t)
    assert down.features.shape == (0, 4) and down.indices.shape == (0, 4)
    assert SparseInverseConv3d(4, 3, 2, indice_key="d")(down).features.shape == (0, 3)


def test_bad_input():
    idx = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"indices must have shape \(2, 4\)"):
        SparseConvTensor(x, idx[:, :3])
    with pytest.raises(ValueError, match="features must be 2-D"):
        SparseConvTensor(x[0], idx)
    with pytest.raises(TypeError, match="integer"):
        SparseConvTensor(x, idx.float())
    with pytest.raises(ValueError, match="same site more than once"):
        SubMConv3d(3, 3)(SparseConvTensor(torch.randn(2, 3), torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])))
    with pytest.raises(ValueError, match=">= 0"):
        SubMConv3d(3, 3)(SparseConvTensor(x, torch.tensor([[0, -1, 0, 0], [0, 1, 0, 0]])))
    with pytest.raises(ValueError, match="input has 3 channels, expected in_channels=4"):
        SubMConv3d(4, 3)(SparseConvTensor(x, idx))
    with pytest.raises(TypeError, match="SparseConvTensor"):
        SubMConv3d(3, 3)(x)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        SubMConv3d(3, 3, 2)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1"):
        SparseConv3d(3, 3, 0)
    with pytest.raises(ValueError, match="padding must be < kernel_size"):
        SparseConv3d(3, 3, 2, 2, padding=2)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        SubMConv3d(0, 3)
    with pytest.raises(ValueError, match="no kernel map under indice_key='k'"):
        SparseInverseConv3d(3, 3, 2, indice_key="k")(SparseConvTensor(x, idx))
    down = SparseConv3d(3, 3, 2, 2, indice_key="k")(SparseConvTensor(x, idx))
    with pytest.raises(ValueError, match="differs from the forward"):
        SparseInverseConv3d(3, 3, 3, indice_key="k")(down)
