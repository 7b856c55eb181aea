import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import effnn
from effnn.ops import routing_attention as ra
from effnn.ops.routing_attention import (
    bra_routing,
    region_grid,
    region_means,
    routed_attention,
    routed_attention_backward_ref,
    routed_attention_ref,
)
from tests.naive import routed_attention_naive

# The reference runs the routed attention either on gathered regions or as full attention with the
# unrouted regions masked out, by a cost rule; every test of the op runs both forms.
FORMS = {"gathered": 0, "masked_full": 10**9}


@pytest.fixture(params=list(FORMS))
def form(request, monkeypatch):
    monkeypatch.setattr(ra, "_GATHER_COST_MACS", FORMS[request.param])
    return request.param


def inputs(N, P, Tq, Tk, Cqk, Cv, topk, *, soft=False, masked=False, dtype=torch.float64,
           repeat=False, requires_grad=True):
    q = torch.randn(N, P, Tq, Cqk, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(N, P, Tk, Cqk, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(N, P, Tk, Cv, dtype=dtype, requires_grad=requires_grad)
    if repeat:  # indices drawn with replacement: repeated regions count twice
        r_idx = torch.randint(0, P, (N, P, topk))
    else:
        r_idx = torch.argsort(torch.rand(N, P, P), dim=-1)[..., :topk]
    w = torch.rand(N, P, topk, dtype=dtype, requires_grad=requires_grad) if soft else None
    key_valid = None
    if masked:
        key_valid = torch.rand(P, Tk) > 0.4
        key_valid[:, 0] = True  # every region keeps a key, so no query loses all of them
    return q, k, v, r_idx, w, key_valid


CASES = [
    # N, P, Tq, Tk, Cqk, Cv, heads, topk
    (1, 9, 4, 4, 8, 8, 2, 1),
    (2, 9, 4, 4, 8, 8, 2, 5),
    (1, 6, 3, 2, 8, 12, 4, 3),  # Tq != Tk (KV pooling), C_qk != C_v
    (2, 4, 1, 1, 3, 3, 1, 4),  # 1-token regions, every region routed
    (1, 1, 2, 5, 4, 6, 2, 1),  # a single region
]


@pytest.mark.parametrize("N,P,Tq,Tk,Cqk,Cv,heads,topk", CASES)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("masked", [False, True], ids=["all_keys", "key_valid"])
def test_matches_naive_fp64(form, N, P, Tq, Tk, Cqk, Cv, heads, topk, soft, masked):
    q, k, v, r_idx, w, key_valid = inputs(N, P, Tq, Tk, Cqk, Cv, topk, soft=soft, masked=masked)
    out = routed_attention(q, k, v, r_idx, w, key_valid, num_heads=heads, scale=0.7)
    want = routed_attention_naive(q, k, v, r_idx, w, key_valid, heads, 0.7)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    leaves = [t for t in (q, k, v, w) if t is not None]
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


def test_repeated_indices_count_twice(form):
    q, k, v, r_idx, w, _ = inputs(2, 5, 3, 2, 4, 4, 4, repeat=True)
    out = routed_attention(q, k, v, r_idx, num_heads=2, scale=0.5)
    want = routed_attention_naive(q, k, v, r_idx, None, None, 2, 0.5)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck(form, soft):
    q, k, v, r_idx, w, key_valid = inputs(2, 4, 2, 3, 4, 2, 2, soft=soft, masked=True)
    fn = lambda q, k, v, *w: routed_attention(q, k, v, r_idx, w[0] if w else None, key_valid,  # noqa: E731
                                              num_heads=2, scale=0.9)
    assert torch.autograd.gradcheck(fn, (q, k, v) + ((w,) if soft else ()))


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(0, 2), P=st.integers(1, 6), Tq=st.integers(1, 4), Tk=st.integers(1, 4),
    heads=st.integers(1, 2), dqk=st.integers(1, 3), dv=st.integers(1, 3), data=st.data(),
    soft=st.booleans(), masked=st.booleans(), gather=st.booleans(),
)
def test_property_any_shape(N, P, Tq, Tk, heads, dqk, dv, data, soft, masked, gather):
    topk = data.draw(st.integers(1, P))
    q, k, v, r_idx, w, key_valid = inputs(N, P, Tq, Tk, heads * dqk, heads * dv, topk, soft=soft, masked=masked)
    old = ra._GATHER_COST_MACS
    ra._GATHER_COST_MACS = FORMS["gathered" if gather else "masked_full"]
    try:
        out = routed_attention(q, k, v, r_idx, w, key_valid, num_heads=heads, scale=0.8)
        want = routed_attention_naive(q, k, v, r_idx, w, key_valid, heads, 0.8)
        assert out.shape == (N, P, Tq, heads * dv)
        torch.testing.assert_close(out, want)
        leaves = [t for t in (q, k, v, w) if t is not None]
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, g, allow_unused=True)
        exp = (torch.autograd.grad(want, leaves, g, allow_unused=True) if want.requires_grad
               else [None] * len(leaves))  # empty batch: the naive output is a constant
        for a, e, leaf in zip(got, exp, leaves, strict=True):
            torch.testing.assert_close(a, torch.zeros_like(leaf) if e is None else e)
    finally:
        ra._GATHER_COST_MACS = old


def test_cost_rule_picks_the_form_of_each_biformer_stage():
    # BiFormer-T at 224x224, n_win 7: 8x8 regions top-1, 4x4 top-4 gathered; 2x2 top-16 masked full
    assert not ra._masked_full(49, 1, 64, soft=False)
    assert not ra._masked_full(49, 4, 16, soft=False)
    assert ra._masked_full(49, 16, 4, soft=False)
    assert not ra._masked_full(49, 16, 4, soft=True)  # soft routing always gathers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_within_2x_of_dtype_reference(form, dtype):
    # flash-attention's rule: the error against fp64 is at most 2x that of the naive reference
    # computed in the same low precision (plus a small slack)
    q, k, v, r_idx, w, key_valid = inputs(2, 9, 4, 4, 16, 16, 3, masked=True, requires_grad=False)
    exact = routed_attention_naive(q, k, v, r_idx, None, key_valid, 2, 0.25)
    low = [t.to(dtype) for t in (q, k, v)]
    ours = routed_attention(*low, r_idx, None, key_valid, num_heads=2, scale=0.25)
    ref = routed_attention_naive(*low, r_idx, None, key_valid, 2, 0.25)
    assert ours.dtype == dtype
    err = (ours.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-5


def test_low_precision_gradients_follow_float32(form):
    q, k, v, r_idx, w, _ = inputs(2, 9, 4, 4, 16, 16, 3, soft=True, dtype=torch.float32)
    out = routed_attention(q, k, v, r_idx, w, num_heads=2, scale=0.25)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v, w), g)
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out_lo = routed_attention(*lo, r_idx, w, num_heads=2, scale=0.25)
    got = torch.autograd.grad(out_lo, (*lo, w), g.bfloat16())
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), e, rtol=0.05, atol=0.05)
    assert got[3].dtype == torch.float32  # the routing weights keep their dtype


def test_autocast_follows_ambient_dtype():
    q, k, v, r_idx, _, _ = inputs(1, 4, 2, 2, 8, 8, 2, dtype=torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routed_attention(q, k, v, r_idx, num_heads=2, scale=0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), routed_attention(q, k, v, r_idx, num_heads=2, scale=0.3),
                               rtol=0.05, atol=0.05)


def test_non_contiguous_inputs(form):
    qkv = torch.randn(2, 6, 3, 20, dtype=torch.float64)
    q, k, v = qkv.split([6, 6, 8], -1)  # channel slices of one tensor
    r_idx = torch.argsort(torch.rand(2, 6, 6), -1)[..., :2]
    out = routed_attention(q, k, v, r_idx, num_heads=2, scale=0.5)
    torch.testing.assert_close(out, routed_attention_naive(q, k, v, r_idx, None, None, 2, 0.5))
    qt = torch.randn(2, 6, 6, 3, dtype=torch.float64).transpose(2, 3)  # transposed (N, P, T, C)
    out = routed_attention(qt, k, v, r_idx, num_heads=2, scale=0.5)
    torch.testing.assert_close(out, routed_attention_naive(qt, k, v, r_idx, None, None, 2, 0.5))


def test_empty_batch_forward_and_backward():
    q, k, v, r_idx, w, _ = inputs(0, 4, 2, 2, 4, 4, 2, soft=True)
    out = routed_attention(q, k, v, r_idx, w, num_heads=2, scale=0.5)
    assert out.shape == (0, 4, 2, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape and w.grad.shape == w.shape


def test_saved_state_does_not_grow_with_topk():
    # Autograd keeps q, k, v, the output, the log-sum-exp and the indices: never a gathered
    # (topk-fold) copy of the keys and values.
    q, k, v, r_idx, _, _ = inputs(2, 16, 4, 4, 8, 8, 16, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        routed_attention(q, k, v, r_idx, num_heads=2, scale=0.5)
    float_bytes = sum(t.numel() * t.element_size() for t in saved if t.is_floating_point())
    # q, k, v, out (4 x 1024 floats) and lse (2 * 16 * 2 * 4)
    assert float_bytes == 4 * (4 * 2 * 16 * 4 * 8 + 2 * 16 * 2 * 4)


def test_training_step_memory_stays_far_below_the_official_gather_buffer():
    # The official backward of torch.gather on the expanded K/V allocates P times the K/V size;
    # here (the gathered form, by the cost rule) the copies of the 4 routed regions come and go.
    from effnn.bench.runner import Step, peak_memory_bytes

    N, P, T, C, topk = 2, 49, 16, 32, 4
    q, k, v, r_idx, _, _ = inputs(N, P, T, T, C, C, topk, dtype=torch.float32)

    def step():
        routed_attention(q, k, v, r_idx, num_heads=2, scale=0.2).sum().backward()

    def zero():
        q.grad = k.grad = v.grad = None

    peak = peak_memory_bytes(Step(step, zero), torch.device("cpu"))
    kv_bytes = 2 * N * P * T * C * 4
    assert peak is not None and peak < 12 * kv_bytes < P * kv_bytes


def test_opcheck_forward_and_backward_ops():
    q, k, v, r_idx, w, key_valid = inputs(2, 5, 3, 2, 4, 6, 2, soft=True, masked=True, dtype=torch.float32)
    torch.library.opcheck(torch.ops.effnn.routed_attention.default, (q, k, v, r_idx, w, key_valid, 2, 0.5, "ref"))
    out, lse = torch.ops.effnn.routed_attention(q, k, v, r_idx, w, key_valid, 2, 0.5, "ref")
    torch.library.opcheck(
        torch.ops.effnn.routed_attention_backward.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, r_idx,
         w.detach(), key_valid, 2, 0.5, True, "ref"),
    )


def test_backward_ref_skips_the_weight_gradient_unless_asked():
    q, k, v, r_idx, w, _ = inputs(1, 4, 2, 2, 4, 4, 2, soft=True, requires_grad=False)
    out, lse = routed_attention_ref(q, k, v, r_idx, w, None, 2, 0.5)
    assert lse.shape == (1, 4, 2, 2) and lse.dtype == torch.float64
    g = torch.randn_like(out)
    *_, dw = routed_attention_backward_ref(g, q, k, v, out, lse, r_idx, w, None, 2, 0.5, False)
    assert dw.numel() == 0


def test_flop_counter_counts_model_flops():
    q, k, v, r_idx, _, _ = inputs(2, 6, 3, 2, 4, 8, 3, dtype=torch.float32)
    macs = 2 * 6 * 3 * (3 * 2) * (4 + 8)  # every query against topk * Tk keys, logits and values
    with FlopCounterMode(display=False) as counter:
        out = routed_attention(q, k, v, r_idx, num_heads=2, scale=0.5)
    assert counter.get_total_flops() == 2 * macs
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 4 * macs


def test_meta_tensors_give_shapes():
    q, k, v, r_idx, _, _ = inputs(2, 4, 3, 2, 4, 6, 2, dtype=torch.float32, requires_grad=False)
    out = routed_attention(q.to("meta"), k.to("meta"), v.to("meta"), r_idx.to("meta"), num_heads=2, scale=1.0)
    assert out.is_meta and out.shape == (2, 4, 3, 6)


# ---- routing ----------------------------------------------------------------------------------


def test_routing_follows_the_official_topk_routing():
    q_r = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    k_r = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    r_idx, r_weight = bra_routing(q_r, k_r, 3, 0.35)
    logits = (q_r * 0.35) @ k_r.transpose(1, 2)
    top, idx = logits.topk(3, dim=-1)
    assert torch.equal(r_idx, idx)
    torch.testing.assert_close(r_weight, top.softmax(-1))
    assert not r_weight.requires_grad  # detached unless diff_routing
    r_idx, r_weight = bra_routing(q_r, k_r, 3, 0.35, diff_routing=True)
    assert r_weight.requires_grad
    assert torch.autograd.gradcheck(lambda a, b: bra_routing(a, b, 3, 0.35, diff_routing=True)[1], (q_r, k_r))


def test_routing_is_float32_for_half_inputs_and_respects_region_valid():
    q_r, k_r = torch.randn(1, 6, 4).bfloat16(), torch.randn(1, 6, 4).bfloat16()
    valid = torch.tensor([True, False, True, True, False, True])
    r_idx, r_weight = bra_routing(q_r, k_r, 4, 1.0, region_valid=valid)
    assert r_weight.dtype == torch.float32
    assert valid[r_idx].all()
    logits = q_r.float() @ k_r.float().transpose(1, 2)
    assert torch.equal(r_idx, logits.masked_fill(~valid, float("-inf")).topk(4).indices)


def test_routing_with_router_projection():
    q_r, k_r = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    w, b = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    r_idx, _ = bra_routing(q_r, k_r, 2, 0.5, diff_routing=True, emb_weight=w, emb_bias=b)
    logits = ((q_r @ w.T + b) * 0.5) @ (k_r @ w.T + b).transpose(1, 2)
    assert torch.equal(r_idx, logits.topk(2).indices)


def test_region_means():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(region_means(x), x.mean(2))
    x[:, :, 2:] = 0  # padded tokens are zero
    x[:, 2] = 0  # region 2 is all padding
    counts = torch.tensor([2, 2, 0])
    got = region_means(x, counts)
    torch.testing.assert_close(got[:, :2], x[:, :2, :2].mean(2))
    assert torch.equal(got[:, 2], torch.zeros(2, 5, dtype=torch.float64))
    assert region_means(x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("H,W,n_win,mode,expected", [
    (56, 56, 7, False, (7, 7, 8, 8)),
    (56, 56, 7, "nchw", (7, 7, 8, 8)),
    (30, 45, 7, True, (7, 7, 5, 7)),
    (30, 45, 7, "legacy", (7, 7, 5, 7)),
    (30, 45, 7, "masked", (7, 7, 5, 7)),
    (30, 45, 7, "nchw", (8, 8, 4, 6)),  # floor region size: 8 regions per side
    (3, 2, 4, "masked", (4, 4, 1, 1)),  # smaller than n_win: empty regions
])
def test_region_grid(H, W, n_win, mode, expected):
    assert tuple(region_grid(H, W, n_win, mode)) == expected


def test_region_grid_errors():
    with pytest.raises(ValueError, match=r"H=30 and W=45 must be divisible by n_win=7"):
        region_grid(30, 45, 7)
    with pytest.raises(ValueError, match="auto_pad='nchw' needs H and W of at least n_win=7"):
        region_grid(6, 45, 7, "nchw")
    with pytest.raises(ValueError, match="auto_pad must be False, True or one of"):
        region_grid(14, 14, 7, "reflect")
    with pytest.raises(ValueError, match="at least 1x1"):
        region_grid(0, 14, 7, True)


# ---- bad input --------------------------------------------------------------------------------


def test_errors_name_the_argument():
    q, k, v, r_idx, w, _ = inputs(2, 4, 3, 2, 4, 6, 2, dtype=torch.float32, requires_grad=False)
    kw = {"num_heads": 2, "scale": 0.5}
    with pytest.raises(TypeError, match="k has dtype torch.float64 but q has dtype torch.float32"):
        routed_attention(q, k.double(), v, r_idx, **kw)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        routed_attention(q.int(), k, v, r_idx, **kw)
    with pytest.raises(ValueError, match=r"v must be 4-D region-major \(N, P, T, C\)"):
        routed_attention(q, k, v[0], r_idx, **kw)
    with pytest.raises(ValueError, match=r"k must have shape \(2, 4, Tk, 4\)"):
        routed_attention(q, k[:, :3], v, r_idx, **kw)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 4, 2, C_v\)"):
        routed_attention(q, k, v[:, :, :1], r_idx, **kw)
    with pytest.raises(ValueError, match=r"at least one token per region \(Tk >= 1\), got Tk=0"):
        routed_attention(q, k[:, :, :0], v[:, :, :0], r_idx, **kw)
    with pytest.raises(TypeError, match="r_idx must be an int64 Tensor, got torch.int32"):
        routed_attention(q, k, v, r_idx.int(), **kw)
    with pytest.raises(ValueError, match=r"r_idx must have shape \(2, 4, topk\)"):
        routed_attention(q, k, v, r_idx[0], **kw)
    with pytest.raises(ValueError, match="r_weight must have the shape of r_idx"):
        routed_attention(q, k, v, r_idx, torch.rand(2, 4, 3), **kw)
    with pytest.raises(ValueError, match=r"key_valid must have shape \(4, 2\)"):
        routed_attention(q, k, v, r_idx, None, torch.ones(4, 3, dtype=torch.bool), **kw)
    with pytest.raises(TypeError, match="key_valid must be a bool Tensor"):
        routed_attention(q, k, v, r_idx, None, torch.ones(4, 2), **kw)
    with pytest.raises(ValueError, match="must be divisible by num_heads=4"):
        routed_attention(q, k, v, r_idx, num_heads=4, scale=0.5)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        routed_attention(q, k, v, r_idx, num_heads=0, scale=0.5)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        routed_attention(q, k, v, r_idx, num_heads=2, scale=float("nan"))
    with pytest.raises(ValueError, match="r_idx is on meta but q is on cpu"):
        routed_attention(q, k, v, r_idx.to("meta"), **kw)
    with pytest.raises(ValueError, match="backend must be one of"):
        routed_attention(q, k, v, r_idx, backend="cuda", **kw)
    with pytest.raises((IndexError, RuntimeError)):  # out-of-range region: an error, not a wrong answer
        routed_attention(q, k, v, r_idx + 4, **kw)


def test_forced_backends_not_implemented_say_so():
    # (the Triton backend's refusals are tested in tests/kernels/test_routing_attention_triton.py)
    q, k, v, r_idx, _, _ = inputs(1, 4, 2, 2, 4, 4, 2, dtype=torch.float32, requires_grad=False)
    with pytest.raises(effnn.BackendError, match="backend='ext' is not implemented"):
        routed_attention(q, k, v, r_idx, num_heads=2, scale=0.5, backend="ext")


def test_nonfinite_values_stay_in_their_image():
    q, k, v, r_idx, _, _ = inputs(2, 4, 2, 2, 4, 4, 2, requires_grad=False)
    v[0, :, 0, 0] = float("nan")
    out = routed_attention(q, k, v, r_idx, num_heads=2, scale=0.5)
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()
