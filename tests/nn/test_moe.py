"""effnn.MoE: the vectorised reference against a token-by-token loop written from the Switch /
WideNet routing rules, gradients, compile/export, round trips and bad input."""

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from effnn import FeedForward, MoE
from effnn.nn.moe import ACTIVATIONS, expert_capacity, moe_ref

F64 = torch.float64


def moe_naive(x, router_weight, w1, b1, w2, b2, top_k, capacity, activation="gelu"):
    """Token by token, in arrival order (WideNet's Router/Switch, widenet/model_configs.py): the
    router softmax, the top_k experts (ties to the lower index), an expert takes a token while it
    holds fewer than ``capacity``; the output is the probability-weighted sum of the kept experts'
    FFN outputs. Returns (y, aux_loss) with aux_loss = E * sum_e f_e * P_e (fractions before
    dropping)."""
    T, _ = x.shape
    E = router_weight.shape[0]
    act = ACTIVATIONS[activation][0]
    load = [0] * E
    chosen = torch.zeros(E, dtype=F64)
    prob_sum = torch.zeros(E, dtype=F64)
    rows = []
    for t in range(T):
        p = torch.softmax(router_weight @ x[t], dim=0)
        prob_sum = prob_sum + p
        experts = sorted(range(E), key=lambda e: (-p[e].item(), e))[:top_k]
        y = torch.zeros_like(x[t])
        for e in experts:
            chosen[e] += 1
            if load[e] < capacity:
                load[e] += 1
                h = act(w1[e] @ x[t] + (0 if b1 is None else b1[e]))
                y = y + p[e].to(x.dtype) * (w2[e] @ h + (0 if b2 is None else b2[e]))
        rows.append(y)
    out = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    if T == 0:
        return out, torch.zeros((), dtype=x.dtype)
    aux = E * ((chosen / (T * top_k)) * (prob_sum / T)).sum()
    return out, aux


def _params(moe):
    return moe.router.weight, moe.fc1_weight, moe.fc1_bias, moe.fc2_weight, moe.fc2_bias


def _spread_router(moe):
    """Router weights large enough that the tokens spread over the experts (not near ties)."""
    with torch.no_grad():
        moe.router.weight.normal_(0, 2.0)
    return moe


CONFIGS = [  # (E, top_k, capacity_factor, bias, activation)
    (4, 1, 1.0, True, "gelu"),
    (4, 2, 0.5, True, "gelu_tanh"),  # drops
    (3, 2, 1.5, False, "relu"),
    (5, 3, 0.3, True, "silu"),  # heavy dropping
    (1, 1, 1.0, True, "gelu"),  # a single expert is a dense FFN
    (6, 2, 3.0, True, "gelu"),  # capacity_factor = E / top_k: nothing dropped
]


@pytest.mark.parametrize("E,top_k,cf,bias,activation", CONFIGS)
def test_module_matches_token_loop_forward_and_gradients(E, top_k, cf, bias, activation):
    moe = _spread_router(MoE(6, 10, E, top_k, cf, activation, bias, dtype=F64))
    x = torch.randn(3, 7, 6, dtype=F64, requires_grad=True)
    y = moe(x)
    C = moe.capacity(21)
    assert C == max(1, math.floor(cf * top_k * 21 / E))
    ref_params = [None if p is None else p.detach().clone().requires_grad_() for p in _params(moe)]
    x_ref = x.detach().clone().requires_grad_()
    y_ref, aux_ref = moe_naive(x_ref.view(21, 6), *ref_params, top_k, C, activation)
    torch.testing.assert_close(y, y_ref.view(3, 7, 6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moe.aux_loss, aux_ref, rtol=1e-12, atol=1e-12)
    assert moe.aux_loss.dtype == F64 and y.dtype == F64
    g = torch.randn_like(y)
    (y * g).sum().add(moe.aux_loss).backward()
    (y_ref.view(3, 7, 6) * g).sum().add(aux_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for p, r in zip(_params(moe), ref_params, strict=True):
        if p is not None:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(0, 12), dim=st.integers(1, 5), hidden=st.integers(1, 6),
    E=st.integers(1, 5), data=st.data(),
)
def test_forward_matches_token_loop_over_shapes(T, dim, hidden, E, data):
    top_k = data.draw(st.integers(1, E))
    cf = data.draw(st.sampled_from([0.1, 0.5, 1.0, 1.25, E / top_k]))
    bias = data.draw(st.booleans())
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    moe = _spread_router(MoE(dim, hidden, E, top_k, cf, bias=bias, dtype=F64))
    x = torch.randn(T, dim, dtype=F64)
    with torch.no_grad():
        y = moe(x)
        y_ref, aux_ref = moe_naive(x, *_params(moe), top_k, moe.capacity(T))
    assert y.shape == (T, dim)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moe.aux_loss, aux_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_fp64_every_input():
    torch.manual_seed(1)
    T, dim, hidden, E, k = 7, 3, 4, 3, 2
    x = torch.randn(T, dim, dtype=F64, requires_grad=True)
    tensors = [torch.randn(*s, dtype=F64, requires_grad=True)
               for s in ((E, dim), (E, hidden, dim), (E, hidden), (E, dim, hidden), (E, dim))]
    with torch.no_grad():
        tensors[0].mul_(2)  # no near-ties in the routing: finite differences must not flip it
    capacity = expert_capacity(T, E, k, 0.75)  # 3 per expert: some assignments are dropped

    def fn(x, rw, w1, b1, w2, b2):
        return moe_ref(x, rw, w1, b1, w2, b2, k, capacity, "gelu")

    assert torch.autograd.gradcheck(fn, (x, *tensors))


def test_capacity_drops_late_tokens_in_arrival_order():
    moe = MoE(4, 8, num_experts=4, top_k=1, capacity_factor=1.0, dtype=F64)
    with torch.no_grad():  # every token prefers expert 2
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0
    x = torch.randn(12, 4, dtype=F64)
    x[:, 0] = 1.0
    y = moe(x)
    C = moe.capacity(12)
    assert C == 3
    assert (y[:C].abs().sum(-1) > 0).all() and (y[C:] == 0).all()
    p = torch.softmax(x @ moe.router.weight.T, -1)[:, 2]
    torch.testing.assert_close(y[:C], p[:C, None] * moe.expert(2)(x[:C]))
    # f = (0, 0, 1, 0) before dropping, P_2 = mean p: aux = 4 * P_2
    torch.testing.assert_close(moe.aux_loss, 4 * p.mean())
    assert expert_capacity(0, 4, 1, 1.0) == 0 and expert_capacity(3, 8, 1, 1.0) == 1
    assert expert_capacity(100, 8, 2, 1.25) == 31


def test_ties_go_to_the_lower_expert_and_aux_loss_is_one_when_balanced():
    moe = MoE(4, 8, num_experts=4, top_k=2, capacity_factor=2.0)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: every token ties
    x = torch.randn(8, 4)
    y = moe(x)
    expected = 0.25 * (moe.expert(0)(x) + moe.expert(1)(x))
    torch.testing.assert_close(y, expected)
    # all tokens on experts 0 and 1: f = (1/2, 1/2, 0, 0), P = 1/4 each -> aux = 4 * 2 * 1/8 = 1
    torch.testing.assert_close(moe.aux_loss, torch.tensor(1.0))
    # perfectly balanced assignment with probabilities concentrated on the chosen expert
    moe1 = MoE(2, 4, num_experts=2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe1.router.weight.copy_(torch.tensor([[50.0, 0.0], [0.0, 50.0]]))
    moe1(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(moe1.aux_loss, torch.tensor(1.0), atol=1e-6, rtol=0)


def test_router_noise_only_in_training():
    moe = MoE(8, 16, num_experts=4, router_noise=0.25)
    x = torch.randn(64, 8)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x))
    moe.train()
    assert not torch.equal(moe(x), moe(x))
    plain = MoE(8, 16, num_experts=4)
    plain.load_state_dict(moe.state_dict())
    torch.testing.assert_close(plain.train()(x), moe.eval()(x))
    assert "router_noise=0.25" in repr(moe) and "router_noise" not in repr(plain)


def test_every_parameter_gets_a_gradient_even_when_an_expert_gets_no_token():
    moe = MoE(4, 8, num_experts=8, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[5, 0] = 10.0
    x = torch.randn(3, 4)
    x[:, 0] = 1
    (moe(x).sum() + moe.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
    assert moe.fc1_weight.grad[5].abs().sum() > 0 and moe.fc1_weight.grad[0].abs().sum() == 0


def test_flops_are_the_capacity_buffer_and_the_router():
    from torch.utils.flop_counter import FlopCounterMode

    moe = MoE(16, 32, num_experts=4, top_k=2, capacity_factor=1.25)
    T = 40
    C = moe.capacity(T)
    with FlopCounterMode(display=False) as counter:
        moe(torch.randn(T, 16))
    assert counter.get_total_flops() == 2 * T * 16 * 4 + 2 * 2 * 4 * C * 16 * 32


def test_torch_compile_fullgraph_matches_eager():
    moe = MoE(12, 20, num_experts=4, top_k=2, capacity_factor=0.75)
    x = torch.randn(2, 9, 12, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True)
    y_c = compiled(x)
    aux_c = moe.aux_loss
    y_e = moe(x)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(aux_c, moe.aux_loss)
    g = torch.randn_like(y_e)
    grads_c = torch.autograd.grad((y_c * g).sum() + aux_c, (x, *moe.parameters()))
    grads_e = torch.autograd.grad((y_e * g).sum() + moe.aux_loss, (x, *moe.parameters()))
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:The tensor attribute self.aux_loss was assigned during export")
def test_torch_export():
    # an exported MoE returns its output; aux_loss (a training quantity) is not an export output
    moe = MoE(8, 16, num_experts=4, top_k=2).eval()
    x = torch.randn(2, 5, 8)
    exported = torch.export.export(moe, (x,))
    torch.testing.assert_close(exported.module()(x), moe(x))


def test_serialisation_and_copies_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    moe = MoE(8, 16, num_experts=4, top_k=2)
    x = torch.randn(5, 8)
    moe(x).sum().backward()  # aux_loss now holds a graph: copies must still work
    with torch.no_grad():
        y = moe(x)
    st.save_file(moe.state_dict(), tmp_path / "m.safetensors")
    fresh = MoE(8, 16, num_experts=4, top_k=2)
    fresh.load_state_dict(st.load_file(tmp_path / "m.safetensors"))
    assert torch.equal(fresh(x), y)
    assert sorted(moe.state_dict()) == ["fc1_bias", "fc1_weight", "fc2_bias", "fc2_weight", "router.weight"]
    assert torch.equal(copy.deepcopy(moe)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(moe))(x), y)
    buf = io.BytesIO()
    torch.save(moe.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)
    half = copy.deepcopy(moe).to(torch.bfloat16)
    torch.testing.assert_close(half(x.bfloat16()).float(), y, rtol=0.05, atol=0.05)


def test_expert_and_from_ffn_round_trip():
    ffn = FeedForward(8, 24, activation="gelu_tanh", dtype=F64)
    moe = MoE.from_ffn(ffn, num_experts=3, top_k=2)
    assert moe.activation == "gelu_tanh" and moe.fc1_weight.dtype == F64
    x = torch.randn(10, 8, dtype=F64)
    for e in range(3):
        torch.testing.assert_close(moe.expert(e)(x), ffn(x), rtol=0, atol=0)
    # identical experts: the output is the ffn scaled by the kept probability mass
    moe.capacity_factor = 3 / 2
    p = torch.softmax(x @ moe.router.weight.T, -1).topk(2, -1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(moe(x), p * ffn(x))
    with pytest.raises(TypeError, match="fc1 and fc2"):
        MoE.from_ffn(nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="index must be an int"):
        moe.expert(3)


def test_feedforward_is_timm_mlp_compatible():
    timm_layers = pytest.importorskip("timm.layers")
    mlp = timm_layers.Mlp(16, 48)
    ffn = FeedForward(16, 48)
    ffn.load_state_dict(mlp.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(ffn(x), mlp(x))
    moe = MoE.from_ffn(mlp, num_experts=2)
    torch.testing.assert_close(moe.expert(1)(x), mlp(x))
    assert ffn.dim == 16 and ffn.hidden_dim == 48


def test_meta_device_then_materialise():
    with torch.device("meta"):
        moe = MoE(8, 16, num_experts=4)
    assert moe.fc1_weight.is_meta
    moe.to_empty(device="cpu")
    moe.reset_parameters()
    assert moe.fc1_weight.abs().max() <= 1 / math.sqrt(8)
    assert torch.isfinite(moe(torch.randn(3, 8))).all()


def test_autocast_bfloat16_routes_in_float32():
    moe = MoE(16, 32, num_experts=4, top_k=2)
    x = torch.randn(20, 16)
    y32 = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16 and moe.aux_loss.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="num_experts must be a positive int, got 0"):
        MoE(8, 16, 0)
    with pytest.raises(ValueError, match="top_k=3 is larger than num_experts=2"):
        MoE(8, 16, 2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor must be a positive number"):
        MoE(8, 16, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 16, 2, capacity_factor=float("nan"))
    with pytest.raises(ValueError, match="router_noise must be a number >= 0"):
        MoE(8, 16, 2, router_noise=-1)
    with pytest.raises(ValueError, match="activation must be one of"):
        MoE(8, 16, 2, activation="tanh")
    with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
        FeedForward(8, 0)
    moe = MoE(8, 16, 2)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\), got \(3, 9\)"):
        moe(torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"got \(\)"):
        moe(torch.tensor(1.0))
    with pytest.raises(TypeError, match="input has dtype torch.float64"):
        moe(torch.randn(3, 8, dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a Tensor"):
        moe([0.0] * 8)


def test_empty_batch_and_non_finite_tokens():
    moe = MoE(8, 16, num_experts=2)
    x = torch.randn(0, 5, 8, requires_grad=True)
    y = moe(x)
    assert y.shape == (0, 5, 8) and moe.aux_loss.item() == 0
    (y.sum() + moe.aux_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in moe.parameters())
    # a NaN token gets a NaN output; the other tokens stay finite; the aux loss turns NaN
    x = torch.randn(6, 8)
    x[2, 3] = float("nan")
    y = moe(x)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(moe.aux_loss)


def test_repr():
    assert "num_experts=4, top_k=2, capacity_factor=1.25, activation='gelu', bias=True" in repr(
        MoE(8, 16, 4, top_k=2, capacity_factor=1.25)
    )
    assert F.gelu is ACTIVATIONS["gelu"][0]
