import copy
import io
import pickle

import pytest
import torch
from torch import nn

from effnn import MonarchLinear
from tests.naive import monarch_naive

# square, expanding, contracting, non-divisible both ways, bias-free handled by the bias param
LAYOUTS = [(64, 64, 4), (64, 256, 4), (256, 64, 4), (100, 70, 3), (70, 100, 3), (1000, 1000, 3)]


@pytest.mark.parametrize("in_features,out_features,nblocks", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_official_state_dict_layout_loads_and_computes(in_features, out_features, nblocks, bias):
    # fly's MonarchLinear: parameters blkdiag1, blkdiag2, bias; no buffers; shapes from ceil blocks
    in_blk, out_blk = -(-in_features // nblocks), -(-out_features // nblocks)
    if nblocks * in_blk < nblocks * out_blk:
        shapes = {"blkdiag1": (nblocks, in_blk, in_blk), "blkdiag2": (nblocks, out_blk, in_blk)}
    else:
        shapes = {"blkdiag1": (nblocks, out_blk, in_blk), "blkdiag2": (nblocks, out_blk, out_blk)}
    if bias:
        shapes["bias"] = (out_features,)
    official = {k: torch.randn(v, dtype=torch.float64) for k, v in shapes.items()}
    layer = MonarchLinear(in_features, out_features, bias=bias, nblocks=nblocks, dtype=torch.float64)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == shapes
    assert [k for k, _ in layer.named_parameters()] == [k for k in ("bias", "blkdiag1", "blkdiag2") if k in shapes]
    layer.load_state_dict(official)
    x = torch.randn(3, 5, in_features, dtype=torch.float64, requires_grad=True)
    x_naive = x.detach().clone().requires_grad_()
    y = layer(x)
    params = {k: v.clone().requires_grad_() for k, v in official.items()}
    y_naive = monarch_naive(
        x_naive.reshape(15, in_features), params["blkdiag1"], params["blkdiag2"], params.get("bias"), out_features
    ).reshape(3, 5, out_features)
    torch.testing.assert_close(y, y_naive, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_naive.backward(g)
    torch.testing.assert_close(x.grad, x_naive.grad, rtol=1e-12, atol=1e-12)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-12, atol=1e-12)


def test_1d_input_and_extra_attributes():
    layer = MonarchLinear(100, 70, nblocks=3)
    assert layer(torch.randn(100)).shape == (70,)
    assert layer.in_features_extended == 102 and layer.out_features_extended == 72
    assert layer.saving == pytest.approx((3 * 24 * 34 + 3 * 24 * 24) / 7000)
    assert "nblocks=3" in repr(layer)


def test_default_init_matches_nn_linear_output_variance():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    for in_f, out_f, nb in [(256, 256, 4), (256, 1024, 4), (256, 256, 16)]:
        xs = x[:, :in_f]
        mon = torch.stack([MonarchLinear(in_f, out_f, bias=False, nblocks=nb)(xs).var() for _ in range(8)]).mean()
        lin = torch.stack([nn.Linear(in_f, out_f, bias=False)(xs).var() for _ in range(8)]).mean()
        assert mon.item() == pytest.approx(lin.item(), rel=0.1)
        assert lin.item() == pytest.approx(1 / 3, rel=0.1)
    bias = MonarchLinear(256, 1024).bias
    assert bias.abs().max() <= 1 / 16 and bias.abs().max() > 1 / 32  # nn.Linear's 1/sqrt(in)


@pytest.mark.parametrize("in_features,out_features,nblocks", [(64, 64, 8), (48, 96, 4), (100, 70, 3)])
def test_from_linear_to_linear_round_trips(in_features, out_features, nblocks):
    mon = MonarchLinear(in_features, out_features, nblocks=nblocks, dtype=torch.float64)
    dense = mon.to_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.float64
    x = torch.randn(7, in_features, dtype=torch.float64)
    torch.testing.assert_close(dense(x), mon(x))
    back = MonarchLinear.from_linear(dense, nblocks=nblocks)
    torch.testing.assert_close(back(x), mon(x))
    torch.testing.assert_close(back.to_linear().weight, dense.weight)


def test_from_linear_projects_random_and_keeps_dtype_device():
    dense = nn.Linear(96, 48, dtype=torch.float64)
    mon = MonarchLinear.from_linear(dense, nblocks=4)
    assert mon.blkdiag1.dtype == torch.float64 and mon.blkdiag1.device == dense.weight.device
    torch.testing.assert_close(mon.bias, dense.bias)
    err = (mon.dense_weight() - dense.weight).norm() / dense.weight.norm()
    rand = MonarchLinear.from_linear(dense, nblocks=4, init="random")
    rand_err = (rand.dense_weight() - dense.weight).norm() / dense.weight.norm()
    assert err < 0.9 < rand_err
    with pytest.raises(ValueError, match="init must be"):
        MonarchLinear.from_linear(dense, init="svd")


def test_meta_device_then_materialise():
    with torch.device("meta"):
        layer = MonarchLinear(64, 32, nblocks=4)
    assert layer.blkdiag1.is_meta
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.isfinite(layer(torch.randn(2, 64))).all()
    meta_linear = nn.Linear(64, 32, device="meta")
    assert MonarchLinear.from_linear(meta_linear).blkdiag2.is_meta


def test_serialisation_round_trips(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    layer = MonarchLinear(40, 24, nblocks=4)
    x = torch.randn(3, 40)
    y = layer(x)
    st.save_file(layer.state_dict(), tmp_path / "m.safetensors")
    fresh = MonarchLinear(40, 24, nblocks=4)
    fresh.load_state_dict(st.load_file(tmp_path / "m.safetensors"))
    assert torch.equal(fresh(x), y)
    assert torch.equal(copy.deepcopy(layer)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(layer))(x), y)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), y, rtol=0.05, atol=0.05)


def test_torch_compile_fullgraph_matches_eager():
    layer = MonarchLinear(48, 80, nblocks=4)
    x = torch.randn(2, 5, 48, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y_c = compiled(x)
    y_e = layer(x)
    torch.testing.assert_close(y_c, y_e)
    g = torch.randn_like(y_e)
    grads_c = torch.autograd.grad(y_c, (x, *layer.parameters()), g)
    grads_e = torch.autograd.grad(y_e, (x, *layer.parameters()), g)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_export_is_one_node():
    layer = MonarchLinear(48, 80, nblocks=4)
    x = torch.randn(6, 48)
    exported = torch.export.export(layer, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "effnn.monarch_linear.default" in targets
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        MonarchLinear(0, 4)
    with pytest.raises(ValueError, match="nblocks must be a positive int"):
        MonarchLinear(8, 4, nblocks=2.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        MonarchLinear(8, 4, backend="gpu")
    layer = MonarchLinear(8, 4, nblocks=2)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\), got \(3, 9\)"):
        layer(torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"got \(\)"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a Tensor"):
        layer([1.0] * 8)
    assert layer(torch.randn(0, 8)).shape == (0, 4)


def test_2d_output_is_a_fresh_tensor_like_nn_linear():
    assert not MonarchLinear(32, 7)(torch.randn(2, 32))._is_view()
