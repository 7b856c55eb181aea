"""Triton window-attention kernels (effnn.kernels.radial_window) through the registered op with
backend="triton", against the reference op computed in float64 on the same float32 coordinates
(so that windows, codes and exponential-split bins are the same): outputs, lse and every gradient
(q, k, v and the three position tables).

On a CPU-only machine these run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton is
imported); on a CUDA machine without the interpreter they run the compiled kernels. The kernels'
tiles are 16 points: the windows below (1 to 34 points) cover single-point windows, several query
tiles and several key blocks per window. The interpreter is slow: shapes are tiny and most cases
use one head.
"""

import pytest
import torch

pytest.importorskip("triton")

import effnn  # noqa: E402
from effnn.kernels import radial_window as kr  # noqa: E402  (needs triton)
from effnn.ops import radial_window as rw  # noqa: E402
from tests.sm90 import assert_compiles_for_sm90  # noqa: E402
from tests.tolerances import assert_close_scaled, assert_within_2x  # noqa: E402

if kr._INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.triton

NAMES = ("out", "lse", "grad_q", "grad_k", "grad_v", "grad_table_q", "grad_table_k", "grad_table_v")
CUBIC = [2.0, 2.0, 2.0]
RADIAL = [30.0, 30.0, 10.0]  # (azimuth deg, polar deg, range) coordinates, given directly


def _points(sizes, window, clouds=2, seed=0, dtype=torch.float32):
    """Points in len(sizes) distinct cells of ``window`` (window i: sizes[i] points uniform in
    its cell, cloud i % clouds), shuffled so that no window is contiguous in the input."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(window, dtype=torch.float64)
    coords, batch = [], []
    for i, n in enumerate(sizes):
        cell = torch.tensor([i, (i * 7) % 5, (i * 3) % 4], dtype=torch.float64)
        coords.append((cell + 0.01 + 0.98 * torch.rand(n, 3, generator=g, dtype=torch.float64)) * w)
        batch.append(torch.full((n,), i % clouds))
    perm = torch.randperm(sum(sizes), generator=g)
    return torch.cat(coords)[perm].to(dtype), torch.cat(batch)[perm]


def _case(sizes, heads, head_dim, *, exp, L, origin="fixed", tables=True, a=0.5, seed=0,
          coords_dtype=torch.float32):
    """float64 values (q, k, v, tables, output cotangent) on float32 coordinates, and the op's
    static arguments."""
    g = torch.Generator().manual_seed(seed + 1)
    coords, batch = _points(sizes, RADIAL if exp else CUBIC, seed=seed, dtype=coords_dtype)
    window = RADIAL if exp else CUBIC
    n = coords.shape[0]
    q, k, v, grad_out = (torch.randn(n, heads, head_dim, generator=g, dtype=torch.float64)
                         for _ in range(4))
    rows = 2 * L if exp else 2 * L - 1
    T = [0.5 * torch.randn(rows, 3, heads, head_dim, generator=g, dtype=torch.float64)
         for _ in range(3)] if tables else [None] * 3
    static = (window, [x / L for x in window] if tables else None, a if exp and tables else None,
              origin, head_dim ** -0.5)
    return (q, k, v, *T, grad_out), (coords, batch), static


def _reference(values, points, static):
    """The eight results of the reference op (float64 when the values are float64)."""
    q, k, v, tq, tk, tv, go = values
    out, lse = rw.window_attention_ref(q, k, v, *points, tq, tk, tv, *static)
    grads = rw.window_attention_backward_ref(go, q, k, v, out, lse, *points, tq, tk, tv, *static)
    return out, lse, *grads


def _kernel(values, points, static, dtype):
    """The same eight results from the registered op with backend="triton" and its autograd."""
    leaves = [None if t is None else t.to(DEVICE, dtype).requires_grad_() for t in values[:6]]
    coords, batch = (t.to(DEVICE) for t in points)
    out, lse = torch.ops.effnn.window_attention(*leaves[:3], coords, batch, *leaves[3:], *static,
                                                "triton")
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    inputs = [t for t in leaves if t is not None]
    grads = list(torch.autograd.grad(out, inputs, values[6].to(DEVICE, dtype)))
    assert all(gr.dtype == dtype for gr in grads)
    return out, lse, *grads, *([None] * (8 - 2 - len(grads)))


def _check(got, ref, tol, label):
    for what, a, r in zip(NAMES, got, ref, strict=True):
        if r is None:
            assert a is None, f"{label} {what}"
        else:
            assert_close_scaled(a, r, tol, f"{label} {what}")


# name: (window sizes, heads, head_dim), options. Every case has a window of one point and a
# window of more than one 16-point tile; head dims are odd or not powers of two.
CASES = {
    "cubic": (([1, 17, 3], 1, 5), dict(exp=False, L=3)),
    "cubic_batch_min_official_L": (([17, 1, 4], 1, 3), dict(exp=False, L=24, origin="batch_min")),
    "radial": (([1, 18, 4], 1, 6), dict(exp=True, L=4)),
    # SphereFormer's L = 24 and a = 0.0125 m (range bins up to ~50 m), 34 points in one window
    "radial_batch_min_official": (([34, 1, 5], 1, 16),
                                  dict(exp=True, L=24, a=0.0125, origin="batch_min")),
    "no_position_encoding": (([1, 19, 5], 2, 7), dict(exp=False, L=3, tables=False)),
    # float64 coordinates: the exponential split evaluated in float64, as the reference does
    "radial_float64_coords": (([1, 17, 2], 1, 4), dict(exp=True, L=3, coords_dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name):
    (sizes, heads, head_dim), opts = CASES[name]
    values, points, static = _case(sizes, heads, head_dim, **opts)
    ref = _reference(values, points, static)
    _check(_kernel(values, points, static, torch.float32), ref, 2e-5, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    """Error vs float64 <= 2x the reference's own error in ``dtype`` + a one-ulp slack, for the
    output and every gradient (the flash-attention rule)."""
    values, points, static = _case([1, 17, 2], 1, 6, exp=True, L=4, seed=1)
    exact = _reference(values, points, static)
    ref_low = _reference([t.to(dtype) for t in values], points, static)
    got = _kernel(values, points, static, dtype)
    for what, a, rl, r64 in zip(NAMES, got, ref_low, exact, strict=True):
        if what == "lse":  # float32 in both
            assert_close_scaled(a, r64, 1e-2, f"{dtype} lse")
        else:
            assert_within_2x(a, rl, r64, f"{dtype} {what}")


def test_window_order_is_the_reference_partition():
    # radial windows are sorted by range inside each window; the windows themselves, their
    # order and their points are window_partition's
    coords, batch = _points([3, 9, 1, 6], RADIAL)
    plan = kr._Plan(torch.zeros(19, 1, 4), coords, batch, *[torch.zeros(8, 3, 1, 4)] * 3, RADIAL,
                    [7.5, 7.5, 2.5], 0.5, "fixed")
    order, window, counts = rw.window_partition(coords, batch, RADIAL)
    assert torch.equal(plan.counts, counts)
    for w in range(counts.numel()):
        lo, hi = int(plan.starts[w]), int(plan.starts[w + 1])
        mine = plan.order[lo:hi]
        assert torch.equal(mine.sort().values, order[window == w].sort().values)
        assert bool((coords[mine, 2].diff() >= 0).all())


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter runs the programs one after another")
def test_point_gradients_are_deterministic():
    # dq, dk, dv are sums within a window in a fixed order (the table gradients use atomics)
    values, points, static = _case([1, 40, 5], 2, 16, exp=True, L=24, a=0.0125)
    first = _kernel(values, points, static, torch.float32)
    second = _kernel(values, points, static, torch.float32)
    for what, a, b in zip(NAMES[:5], first, second, strict=True):
        assert torch.equal(a, b), what


def test_dispatch(monkeypatch):
    q = torch.zeros(3, 2, 4, device=DEVICE)
    assert rw.choose_backend(q, "triton") == "triton"
    with pytest.raises(effnn.BackendError, match="float64 is not supported"):
        rw.choose_backend(q.double(), "triton")
    assert "exceeds 256" in " ".join(kr.unsupported_reasons(torch.empty(1, 1, 257)))
    if DEVICE == "cpu":
        assert rw.choose_backend(q) != "triton"  # "auto" never interprets
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(effnn.BackendError, match="TRITON_INTERPRET=1"):
            rw.choose_backend(q, "triton")
    else:
        assert rw.choose_backend(q) == "triton"


def test_opcheck_with_the_triton_backend():
    values, points, static = _case([5, 2], 1, 4, exp=True, L=2)
    q, k, v, tq, tk, tv, _ = (t.to(DEVICE, torch.float32) for t in values)
    coords, batch = (t.to(DEVICE) for t in points)
    torch.library.opcheck(torch.ops.effnn.window_attention.default,
                          (q, k, v, coords, batch, tq, tk, tv, *static, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


def _same_module_results(ref, tri, x, xyz, batch):
    tri.load_state_dict(ref.state_dict())
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yt = ref(xr, xyz, batch), tri(xt, xyz, batch)
    torch.testing.assert_close(yt, yr, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(yr)
    yr.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (name, pr), pt in zip(ref.named_parameters(), tri.parameters(), strict=True):
        torch.testing.assert_close(pt.grad, pr.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_radial_window_attention_module():
    # sensor-centred xyz -> radial windows with the exponential split (SphereFormer's L = 24);
    # q, k, v are strided views of the qkv projection, read in place
    xyz = torch.randn(18, 3, device=DEVICE) * torch.tensor([6.0, 6.0, 1.0], device=DEVICE)
    batch = torch.randint(0, 2, (18,), device=DEVICE)
    kw = dict(window_size=(180.0, 90.0, 20.0), device=DEVICE)
    ref = effnn.RadialWindowAttention(8, 2, backend="ref", **kw)
    tri = effnn.RadialWindowAttention(8, 2, backend="triton", **kw)
    _same_module_results(ref, tri, torch.randn(18, 8, device=DEVICE), xyz, batch)


def test_sphereformer_attention_module():
    # half the heads in cubic windows, half in radial windows (head slices of the projection)
    xyz = torch.randn(16, 3, device=DEVICE) * 3
    batch = torch.zeros(16, dtype=torch.long, device=DEVICE)
    kw = dict(window_size=6.0, window_size_sphere=(180.0, 90.0, 20.0), origin="batch_min",
              device=DEVICE)
    ref = effnn.SphereFormerAttention(8, 2, backend="ref", **kw)
    tri = effnn.SphereFormerAttention(8, 2, backend="triton", **kw)
    _same_module_results(ref, tri, torch.randn(16, 8, device=DEVICE), xyz, batch)


# The three kernels compiled for sm_90 without a GPU (tests/sm90.py): SphereFormer's shapes
# (head_dim 16, L = 24), radial windows (every code path of the cubic ones plus the exponential
# axis), bf16.
_COMPILE_FOR_SM90 = """
    from effnn.kernels import radial_window as kr
    from tests.sm90 import compile_for_sm90, signature
    assert not kr._INTERPRET
    ptrs = {"order_ptr": "*i64", "starts_ptr": "*i64", "tile_win_ptr": "*i32",
            "tile_row_ptr": "*i64", "codes_ptr": "*i32", "r_ptr": "*fp32", "ab_ptr": "*fp32",
            "lse_ptr": "*fp32", "delta_ptr": "*fp32"}

    def pointer_type(arg):  # q, k, v, do, out, grads: bf16; tables: fp32
        return ptrs.get(arg, "*fp32" if arg[:2] in ("tq", "tk", "tv", "dt") else "*bf16")

    block, warps = kr._launch_shape()
    consts = dict(REL=True, EXP=True, R64=False, DOT_PREC="ieee", INTERP_BF16=False,
                  BLOCK_M=block, BLOCK_N=block, BLOCK_D=16, BLOCK_L=32, BLOCK_R=64)
    for fn in (kr._forward_kernel, kr._backward_dq_kernel, kr._backward_dkv_kernel):
        compile_for_sm90(fn, signature(fn, consts, pointer_type, {"scale": "fp32"}), consts, warps)
"""


def test_kernels_compile_for_sm90():
    if DEVICE == "cuda":
        pytest.skip("the tests above compile and run the kernels on this GPU")
    assert_compiles_for_sm90(_COMPILE_FOR_SM90)
