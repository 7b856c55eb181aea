"""Triton routed-attention kernels (effnn.kernels.routing_attention) through the registered op
with backend="triton", against the reference op computed in float64: outputs, lse and every
gradient (q, k, v, r_weight).

On a CPU-only machine these run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton is
imported), where the kernels' tiles are 16 wide, so the shapes below cross tile and region borders;
on a CUDA machine without the interpreter they run the compiled kernels.
"""

import pytest
import torch

pytest.importorskip("triton")

import effnn  # noqa: E402
from effnn.kernels import routing_attention as kr  # noqa: E402  (needs triton)
from effnn.ops import routing_attention as ra  # noqa: E402
from effnn.ops.routing_attention import (  # noqa: E402
    routed_attention,
    routed_attention_backward_ref,
    routed_attention_ref,
)
from tests.sm90 import assert_compiles_for_sm90  # noqa: E402
from tests.tolerances import assert_close_scaled, assert_within_2x  # noqa: E402

if kr._INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.triton

SCALE = 0.35
NAMES = ("out", "lse", "grad_q", "grad_k", "grad_v", "grad_r_weight")


def _inputs(N, P, Tq, Tk, Cqk, Cv, topk, *, soft=False, masked=False, repeat=False, seed=0):
    """float64 CPU inputs and an output cotangent."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, P, Tq, Cqk, generator=g, dtype=torch.float64)
    k = torch.randn(N, P, Tk, Cqk, generator=g, dtype=torch.float64)
    v = torch.randn(N, P, Tk, Cv, generator=g, dtype=torch.float64)
    if repeat:  # drawn with replacement: a region routed twice counts its keys twice
        r_idx = torch.randint(0, P, (N, P, topk), generator=g)
    else:
        r_idx = torch.argsort(torch.rand(N, P, P, generator=g), dim=-1)[..., :topk]
    w = torch.rand(N, P, topk, generator=g, dtype=torch.float64) + 0.2 if soft else None
    key_valid = None
    if masked:  # padded keys; every region keeps one, so no query loses all of its keys
        key_valid = torch.rand(P, Tk, generator=g) > 0.4
        key_valid[:, -1] = True
    grad_out = torch.randn(N, P, Tq, Cv, generator=g, dtype=torch.float64)
    return q, k, v, r_idx, w, key_valid, grad_out


def _reference(q, k, v, r_idx, w, key_valid, grad_out, heads):
    """(out, lse, grad_q, grad_k, grad_v, grad_r_weight) of the reference op, in the inputs' dtype."""
    out, lse = routed_attention_ref(q, k, v, r_idx, w, key_valid, heads, SCALE)
    grads = routed_attention_backward_ref(
        grad_out, q, k, v, out, lse, r_idx, w, key_valid, heads, SCALE, w is not None
    )
    return out, lse, *grads


def _kernel(q, k, v, r_idx, w, key_valid, grad_out, heads, dtype):
    """The same six results from the registered op with backend="triton" and its autograd."""
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    q, k, v, w = (None if t is None else dev(t).to(dtype).requires_grad_() for t in (q, k, v, w))
    out, lse = torch.ops.effnn.routed_attention(
        q, k, v, dev(r_idx), w, dev(key_valid), heads, SCALE, "triton"
    )
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    inputs = (q, k, v) if w is None else (q, k, v, w)
    grads = torch.autograd.grad(out, inputs, grad_out.to(DEVICE, dtype))
    assert all(gr.dtype == dtype for gr in grads)
    return (out, lse, *grads) if w is not None else (out, lse, *grads, torch.empty(0))


# name: (N, P, Tq, Tk, C_qk, C_v, heads, topk), options
CASES = {
    "plain": ((1, 4, 4, 4, 8, 8, 2, 2), {}),
    "soft_routing": ((2, 4, 4, 4, 8, 8, 2, 2), {"soft": True}),
    "key_valid": ((1, 4, 5, 6, 8, 8, 2, 3), {"masked": True}),
    "repeated_indices": ((2, 3, 4, 5, 8, 8, 2, 4), {"soft": True, "repeat": True}),
    "topk_all_regions": ((1, 5, 3, 4, 4, 4, 1, 5), {"masked": True}),
    # head sizes 3 and 5, 17 queries (two query tiles), 3 x 7 = 21 routed keys (two key tiles,
    # each crossing a region border)
    "odd_sizes": ((1, 3, 17, 7, 6, 10, 2, 3), {"soft": True, "masked": True}),
    # 1-token regions (BiFormer's KV pooling or tiny maps): many regions per key tile
    "one_token_regions": ((1, 6, 1, 1, 4, 6, 2, 4), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name):
    (N, P, Tq, Tk, Cqk, Cv, heads, topk), opts = CASES[name]
    data = _inputs(N, P, Tq, Tk, Cqk, Cv, topk, **opts)
    ref = _reference(*data, heads)
    got = _kernel(*data, heads, torch.float32)
    for what, a, r in zip(NAMES, got, ref, strict=True):
        assert_close_scaled(a, r, 5e-5, f"{name} {what}")


def test_non_contiguous_inputs():
    # q, k, v as channel slices of one tensor (how a fused projection hands them over), and a
    # transposed q
    q, k, v, r_idx, w, key_valid, go = _inputs(1, 4, 5, 5, 6, 8, 2, soft=True, masked=True)
    qkv = torch.cat([q, k, v], -1)
    qs, ks, vs = qkv.split([6, 6, 8], -1)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (qs.is_contiguous() or ks.is_contiguous() or vs.is_contiguous() or qt.is_contiguous())
    ref = _reference(q, k, v, r_idx, w, key_valid, go, 2)
    for qq in (qs, qt):
        got = _kernel(qq, ks, vs, r_idx, w, key_valid, go, 2, torch.float32)
        for what, a, r in zip(NAMES, got, ref, strict=True):
            assert_close_scaled(a, r, 5e-5, f"strided {what}")


def test_weight_gradient_only_when_asked():
    q, k, v, r_idx, w, _, go = _inputs(1, 4, 4, 4, 8, 8, 2, soft=True)
    args = [t.to(DEVICE, torch.float32) for t in (q, k, v)]
    out, lse = kr.forward(*args, r_idx.to(DEVICE), w.to(DEVICE), None, 2, SCALE)
    grads = kr.backward(go.to(DEVICE, torch.float32), *args, out, lse, r_idx.to(DEVICE),
                        w.to(DEVICE), None, 2, SCALE, False)
    assert grads[3].numel() == 0
    ref = _reference(q, k, v, r_idx, w, None, go, 2)
    for what, a, r in zip(NAMES[2:5], grads[:3], ref[2:5], strict=True):
        assert_close_scaled(a, r, 5e-5, what)


def test_backward_is_deterministic():
    # dK/dV sum over inverse routing lists in a fixed order: no atomics
    q, k, v, r_idx, w, key_valid, go = _inputs(2, 3, 4, 5, 8, 8, 3, soft=True, repeat=True)
    first = _kernel(q, k, v, r_idx, w, key_valid, go, 2, torch.float32)
    second = _kernel(q, k, v, r_idx, w, key_valid, go, 2, torch.float32)
    for what, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["soft_routing", "odd_sizes"])
def test_low_precision(dtype, name):
    """Error vs float64 <= 2x the reference's own error in `dtype` + a one-ulp slack, for the
    output and every gradient (the flash-attention rule)."""
    (N, P, Tq, Tk, Cqk, Cv, heads, topk), opts = CASES[name]
    data = _inputs(N, P, Tq, Tk, Cqk, Cv, topk, seed=1, **opts)
    exact = _reference(*data, heads)
    low = [t if t is None or t.dtype == torch.bool or t.dtype == torch.int64 else t.to(dtype)
           for t in data]
    ref_low = _reference(*low, heads)
    got = _kernel(*data, heads, dtype)
    for what, a, rl, r64 in zip(NAMES, got, ref_low, exact, strict=True):
        if what == "lse":  # float32 in both
            assert_close_scaled(a, r64, 1e-2, f"{name} {dtype} lse")
        else:
            assert_within_2x(a, rl, r64, f"{name} {dtype} {what}")


def test_out_of_range_region_is_an_error():
    q, k, v, r_idx, _, _, _ = _inputs(1, 4, 2, 2, 4, 4, 2)
    if DEVICE == "cuda":
        pytest.skip("a device-side assert on CUDA poisons the context of later tests")
    with pytest.raises(RuntimeError, match="r_idx must lie in"):
        routed_attention(q.float(), k.float(), v.float(), r_idx + 3, num_heads=2, scale=SCALE,
                         backend="triton")


def test_dispatch(monkeypatch):
    q, k, v, r_idx, _, _, _ = _inputs(1, 4, 2, 2, 4, 4, 2)
    q32, k32, v32 = (t.float().to(DEVICE) for t in (q, k, v))
    assert ra.choose_backend(q32, k32, v32, 2, "triton") == "triton"
    with pytest.raises(effnn.BackendError, match="float64 is not supported"):
        ra.choose_backend(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 2, "triton")
    big = torch.empty(1, 1, 1, 2 * 257)
    assert "exceeds 256" in " ".join(kr.unsupported_reasons(big, big, big, 2))
    if DEVICE == "cpu":
        assert ra.choose_backend(q32, k32, v32, 2) == "ref"  # "auto" never interprets
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(effnn.BackendError, match="TRITON_INTERPRET=1"):
            ra.choose_backend(q32, k32, v32, 2, "triton")
    else:
        assert ra.choose_backend(q32, k32, v32, 2) == "triton"
        assert ra.choose_backend(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 2) == "ref"


def test_module_end_to_end_matches_reference():
    # soft + differentiable routing (r_weight gets a gradient) and masked padding (key_valid) on
    # a 5x6 map with 2x2 regions of 3x3 tokens
    kw = dict(num_heads=2, n_win=2, topk=2, soft_routing=True, diff_routing=True,
              param_routing=True, auto_pad="masked", device=DEVICE)
    ref = effnn.BiLevelRoutingAttention(16, backend="ref", **kw)
    tri = effnn.BiLevelRoutingAttention(16, backend="triton", **kw)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 6, 16, device=DEVICE)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yt = ref(xr), tri(xt)
    torch.testing.assert_close(yt, yr, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(yr)
    yr.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-4)
    for (name, pr), pt in zip(ref.named_parameters(), tri.parameters(), strict=True):
        torch.testing.assert_close(pt.grad, pr.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_opcheck_with_the_triton_backend():
    q, k, v, r_idx, w, key_valid, go = _inputs(1, 3, 4, 4, 8, 8, 2, soft=True, masked=True)
    q, k, v, w, go = (t.to(DEVICE, torch.float32) for t in (q, k, v, w, go))
    r_idx, key_valid = r_idx.to(DEVICE), key_valid.to(DEVICE)
    q, k, v, w = (t.requires_grad_() for t in (q, k, v, w))
    torch.library.opcheck(torch.ops.effnn.routed_attention.default,
                          (q, k, v, r_idx, w, key_valid, 2, SCALE, "triton"))
    out, lse = torch.ops.effnn.routed_attention(q, k, v, r_idx, w, key_valid, 2, SCALE, "triton")
    torch.library.opcheck(
        torch.ops.effnn.routed_attention_backward.default,
        (go, q.detach(), k.detach(), v.detach(), out.detach(), lse, r_idx, w.detach(), key_valid,
         2, SCALE, True, "triton"),
    )


# The three kernels compiled for sm_90 without a GPU (tests/sm90.py), in the most general variant
# (every optional input), bf16 and fp32.
_COMPILE_FOR_SM90 = """
    import torch
    from effnn.kernels import routing_attention as kr
    from tests.sm90 import compile_for_sm90, signature
    assert not kr._INTERPRET
    index_ptrs = {"idx_ptr": "*i64", "order_ptr": "*i64", "starts_ptr": "*i64", "valid_ptr": "*u8",
                  "w_ptr": "*fp32", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dw_ptr": "*fp32"}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        largest, warps = kr._launch_shape(dtype, 32)
        consts = dict(HAS_WEIGHT=True, HAS_VALID=True, NEED_WEIGHT_GRAD=True,
                      DOT_PREC="tf32" if name == "bf16" else "ieee", INTERP_BF16=False,
                      BLOCK_M=largest, BLOCK_N=largest, BLOCK_DQK=32, BLOCK_DV=32)
        for fn in (kr._forward_kernel, kr._backward_dq_kernel, kr._backward_dkv_kernel):
            sig = signature(fn, consts, lambda a: index_ptrs.get(a, "*" + name), {"scale": "fp32"})
            compile_for_sm90(fn, sig, consts, warps)
"""


def test_kernels_compile_for_sm90():
    if DEVICE == "cuda":
        pytest.skip("the tests above compile and run the kernels on this GPU")
    assert_compiles_for_sm90(_COMPILE_FOR_SM90, timeout=300)
