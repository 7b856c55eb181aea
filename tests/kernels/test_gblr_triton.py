"""Triton forward and backward of the packed GBLR product (effnn.kernels.gblr) against the
reference structured op and the dense-mask computation (fp64).

On a CPU-only machine these run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton is
imported); on a CUDA machine without the interpreter they run the compiled kernels on the GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from effnn.kernels import gblr as kg  # noqa: E402  (needs triton)
from effnn.nn.gblr import GaudiGBLRLinear  # noqa: E402
from effnn.ops import gblr as gblr_ops  # noqa: E402
from effnn.ops._dispatch import BackendError  # noqa: E402
from effnn.ops.gblr import gblr_dense_weight, gblr_structured, pack_structure  # noqa: E402
from tests.sm90 import assert_compiles_for_sm90  # noqa: E402
from tests.tolerances import assert_within_2x  # noqa: E402

if kg._INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.triton

F64 = torch.float64


def _boxcars(starts, lengths, n):
    """(K, n) float64 cyclic boxcars 1[s <= i < s + L (mod n)]."""
    idx = torch.arange(n)
    s, L = torch.as_tensor(starts)[:, None], torch.as_tensor(lengths)[:, None]
    return (((idx - s) % n) < L).to(F64)


def _random_structure(K, r, n, m, seed, empty_every=0):
    """Factors and boxcar masks at random starts and lengths (wrapping ones included); every
    ``empty_every``-th component has an empty input or output mask."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(K, r, n, generator=g, dtype=F64)
    w2 = torch.randn(K, m, r, generator=g, dtype=F64)
    lin, lout = torch.randint(1, n + 1, (K,), generator=g), torch.randint(1, m + 1, (K,), generator=g)
    if empty_every:
        lin[::empty_every] = 0
        lout[1::empty_every] = 0
    mask_in = _boxcars(torch.randint(0, n, (K,), generator=g), lin, n)
    mask_out = _boxcars(torch.randint(0, m, (K,), generator=g), lout, m)
    return w1, w2, mask_in, mask_out


def _splr_structure(n, m, r, seed):
    """The official 'splr' initialisation at location 0, eval-mode masks."""
    torch.manual_seed(seed)
    layer = GaudiGBLRLinear(n, m, rank_per_component=r, sigma=None, dtype=F64).eval()
    mask_in, mask_out = layer.masks()
    return layer.lr_weight1.detach(), layer.lr_weight2.detach(), mask_in, mask_out


STRUCTURES = {
    # name: (factory, T, n, m)
    "splr_r1": (lambda: _splr_structure(24, 20, 1, 0), 9, 24, 20),
    "splr_r2_odd": (lambda: _splr_structure(37, 29, 2, 1), 13, 37, 29),
    "random_wrap": (lambda: _random_structure(9, 2, 41, 35, 2), 11, 41, 35),
    "random_empty": (lambda: _random_structure(12, 1, 33, 47, 3, empty_every=3), 7, 33, 47),
    "all_empty": (lambda: _random_structure(4, 1, 19, 23, 4, empty_every=1), 5, 19, 23),
    "full_width": (lambda: (*_random_structure(3, 3, 20, 18, 5)[:2], torch.ones(3, 20, dtype=F64),
                            torch.ones(3, 18, dtype=F64)), 17, 20, 18),
}


def _case(name, dtype, seed=0, split=False):
    """(packed on DEVICE, x, bias, fp64 dense-mask product). ``split``: pack without the group
    overhead of the cost model, so that components land in many (overlapping, wrapping) groups
    instead of the one group small shapes otherwise get."""
    factory, T, n, m = STRUCTURES[name]
    w1, w2, mask_in, mask_out = factory()
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(T, n, generator=g, dtype=F64)
    bias = torch.randn(m, generator=g, dtype=F64)
    dense = x @ gblr_dense_weight(w1, w2, mask_in, mask_out).t() + bias
    overhead = gblr_ops.GROUP_OVERHEAD_ROWS
    gblr_ops.GROUP_OVERHEAD_ROWS = 0 if split else overhead
    try:
        packed = pack_structure(w1.to(dtype), w2.to(dtype), mask_in, mask_out)
    finally:
        gblr_ops.GROUP_OVERHEAD_ROWS = overhead
    packed.in_factor, packed.out_factor = packed.in_factor.to(DEVICE), packed.out_factor.to(DEVICE)
    packed.in_meta, packed.out_meta, packed.perm = (t.to(DEVICE) for t in (packed.in_meta, packed.out_meta,
                                                                           packed.perm))
    return packed, x.to(DEVICE, dtype), bias.to(DEVICE, dtype), dense


def _max_err(a, ref):
    return (a.detach().cpu().double() - ref).abs().max().item() if ref.numel() else 0.0


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("name", list(STRUCTURES))
def test_fp32_matches_reference_and_dense_mask(name, split):
    packed, x, bias, dense = _case(name, torch.float32, split=split)
    y = gblr_structured(x, packed, bias, backend="triton")
    y_ref = gblr_structured(x.cpu(), _cpu(packed), bias.cpu(), backend="ref")
    assert y.dtype == torch.float32 and y.shape == dense.shape
    scale = max(1.0, dense.abs().max().item())
    assert _max_err(y, y_ref.double()) <= 2e-5 * scale
    assert _max_err(y, dense) <= 2e-5 * scale


def _cpu(packed):
    fields = (packed.in_factor, packed.in_meta, packed.out_factor, packed.out_meta, packed.perm)
    return type(packed)(*(t.cpu() for t in fields), packed.in_features, packed.out_features)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["splr_r2_odd", "random_wrap", "random_empty"])
def test_low_precision_two_x_rule(dtype, name):
    """Error vs the fp64 dense-mask product <= 2x the reference op's own error in `dtype` + an
    eps slack."""
    packed, x, bias, dense = _case(name, dtype, seed=1, split=True)
    y = gblr_structured(x, packed, bias, backend="triton")
    y_ref = gblr_structured(x.cpu(), _cpu(packed), bias.cpu(), backend="ref")
    assert y.dtype == dtype
    assert_within_2x(y, y_ref, dense, f"{name} {dtype}")


def _grads(packed, x, bias, backend, grad_seed=0):
    xs = x.clone().requires_grad_()
    a = packed.in_factor.clone().requires_grad_()
    b = packed.out_factor.clone().requires_grad_()
    p = type(packed)(a, packed.in_meta, b, packed.out_meta, packed.perm, packed.in_features,
                     packed.out_features)
    y = gblr_structured(xs, p, bias, backend=backend)
    g = torch.Generator().manual_seed(grad_seed)
    y.backward(torch.randn(y.shape, generator=g, dtype=F64).to(y.device, y.dtype))
    return y.detach(), xs.grad, a.grad, b.grad


def _dense_grads(packed, x, grad_seed=0):
    """fp64 gradients through the packed product written as dense matrices (autograd)."""
    cpu = _cpu(packed)
    a = cpu.in_factor.double().requires_grad_()
    b = cpu.out_factor.double().requires_grad_()
    xs = x.detach().cpu().double().requires_grad_()
    p = type(cpu)(a, cpu.in_meta, b, cpu.out_meta, cpu.perm, cpu.in_features, cpu.out_features)
    y = gblr_structured(xs, p, None, backend="ref")
    g = torch.Generator().manual_seed(grad_seed)
    y.backward(torch.randn(y.shape, generator=g, dtype=F64))
    return xs.grad, a.grad, b.grad


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_fp32_gradients_match_reference(name):
    """The Triton backward (transposed stages + factor-gradient kernel): gradients of x and of both
    packed factors equal the fp64 reference's, for overlapping, wrapping and empty groups."""
    packed, x, bias, _ = _case(name, torch.float32, split=True)
    _, gx, ga, gb = _grads(packed, x, bias, "triton")
    for got, want, what in zip((gx, ga, gb), _dense_grads(packed, x), ("x", "in_factor", "out_factor"), strict=True):
        scale = max([1.0, *want.abs().flatten().tolist()])
        assert got.dtype == torch.float32 and got.shape == want.shape, what
        assert _max_err(got, want) <= 2e-5 * scale, f"{name}: grad {what}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_two_x_rule(dtype):
    packed, x, bias, _ = _case("random_wrap", dtype, seed=2, split=True)
    want = _dense_grads(packed, x)
    got = _grads(packed, x, bias, "triton")[1:]
    ref = _grads(_cpu(packed), x.cpu(), bias.cpu(), "ref")[1:]
    for g, r, w, what in zip(got, ref, want, ("x", "in_factor", "out_factor"), strict=True):
        assert_within_2x(g, r, w, f"grad {what} {dtype}")


def test_gradients_without_tokens_and_input_grad():
    packed, x, bias, _ = _case("splr_r2_odd", torch.float32)
    _, gx, ga, gb = _grads(packed, x[:0], bias, "triton")
    assert gx.shape == (0, packed.in_features)
    assert torch.count_nonzero(ga) == 0 and torch.count_nonzero(gb) == 0
    a = packed.in_factor.clone().requires_grad_()
    p = type(packed)(a, packed.in_meta, packed.out_factor, packed.out_meta, packed.perm,
                     packed.in_features, packed.out_features)
    gblr_structured(x, p, bias, backend="triton").sum().backward()  # x needs no gradient
    a_ref = packed.in_factor.cpu().clone().requires_grad_()
    p_ref = type(packed)(a_ref, *(t.cpu() for t in (packed.in_meta, packed.out_factor, packed.out_meta,
                                                     packed.perm)), packed.in_features, packed.out_features)
    gblr_structured(x.cpu(), p_ref, bias.cpu(), backend="ref").sum().backward()
    torch.testing.assert_close(a.grad.cpu(), a_ref.grad, rtol=1e-5, atol=1e-5)


def test_leading_dims_no_bias_and_no_tokens():
    packed, x, _, _ = _case("splr_r1", torch.float32)
    x3 = x[:8].reshape(2, 4, -1)
    y = gblr_structured(x3, packed, None, backend="triton")
    torch.testing.assert_close(y, gblr_structured(x3, packed, None, backend="ref"), rtol=1e-5, atol=1e-5)
    empty = gblr_structured(x[:0], packed, None, backend="triton")
    assert empty.shape == (0, packed.out_features)


def test_structured_module_runs_triton():
    torch.manual_seed(0)
    layer = GaudiGBLRLinear(21, 26, width_init=0.4, location_init="unif", sigma=None).eval()
    x = torch.randn(6, 21)
    module = layer.to_structured(backend="triton").to(DEVICE)
    torch.testing.assert_close(module(x.to(DEVICE)).cpu(), layer(x), rtol=1e-5, atol=1e-5)


def test_forced_backend_errors(monkeypatch):
    packed, x, bias, _ = _case("splr_r1", torch.float32)
    p64 = type(packed)(packed.in_factor.double(), packed.in_meta, packed.out_factor.double(),
                       packed.out_meta, packed.perm, packed.in_features, packed.out_features)
    with pytest.raises(BackendError, match="float64"):
        gblr_structured(x.double(), p64, None, backend="triton")
    assert gblr_structured(x.double(), p64, None).dtype == F64  # auto falls back to ref
    if DEVICE == "cpu":  # without the interpreter, CPU tensors have no Triton backend
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendError, match="TRITON_INTERPRET"):
            gblr_structured(x, packed, bias, backend="triton")


# The kernels compiled for sm_90 without a GPU (tests/sm90.py): both factor layouts, fp32 and bf16.
_COMPILE_FOR_SM90 = """
    from effnn.kernels import gblr as kg
    from tests.sm90 import compile_for_sm90, signature
    assert not kg._INTERPRET
    ints = ("meta_ptr", "tile_group_ptr", "tile_row_ptr", "tile_col_ptr", "perm_ptr", "src_ptr")
    blocks = {kg._stage1_kernel: dict(zip(("BLOCK_R", "BLOCK_T", "BLOCK_C"), kg._S1)),
              kg._stage2_kernel: dict(zip(("BLOCK_M", "BLOCK_T", "BLOCK_Q"), kg._S2)),
              kg._factor_grad_kernel: dict(zip(("BLOCK_R", "BLOCK_C", "BLOCK_T"), kg._FG))}
    for name, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        for transposed in (False, True):
            for fn, tiles in blocks.items():
                consts = dict(TRANSPOSED=transposed, HAS_BIAS=True, HAS_SRC=True, DOT_PREC=prec,
                              INTERP_BF16=False, **tiles)
                sig = signature(fn, consts, lambda a: "*i64" if a in ints else "*" + name)
                compile_for_sm90(fn, sig, consts, kg._WARPS)
"""


def test_kernels_compile_for_sm90():
    if DEVICE == "cuda":
        pytest.skip("the tests above compile and run the kernels on this GPU")
    assert_compiles_for_sm90(_COMPILE_FOR_SM90, timeout=300)
