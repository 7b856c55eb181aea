"""Tests of the CUDA kernel of window attention (csrc/window_attention_cuda.cu), the ``ext``
backend of ``effnn::window_attention`` for CUDA tensors.

effnn._C gets the CUDA kernels when it is built with
``EFFNN_BUILD_EXT=1 EFFNN_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .``.
Without a GPU: the registration is checked (CI builds with EFFNN_BUILD_CUDA=1 exported, and then
a build without the CUDA kernels fails the test instead of skipping it), and the CUDA source runs
in a host emulation (window_attention_cuda_emulation.cpp: one OS thread per CUDA thread) against
the reference. On a GPU (benchmarks/gpu_check.sh on the lent H200): the public op with
``backend="ext"`` against the reference, forward and every gradient, the position tables
included, fp64/fp32/bf16.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

_C = pytest.importorskip("effnn._C")

from effnn.ops import radial_window as rw  # noqa: E402
from effnn.ops._dispatch import ext_cuda_reasons  # noqa: E402
from effnn.ops.radial_window import window_attention  # noqa: E402
from tests.tolerances import assert_close_scaled, assert_within_2x  # noqa: E402

pytestmark = pytest.mark.ext

OPS = ("effnn_ext::window_attention_forward", "effnn_ext::window_attention_backward")


def _built_with_cuda() -> bool:
    """Whether effnn._C was linked as a CUDA extension (it then needs torch's libc10_cuda)."""
    with open(_C.__file__, "rb") as f:
        return b"libc10_cuda.so" in f.read()


def test_cuda_kernels_registered_when_built_with_cuda():
    if not _built_with_cuda():
        if os.environ.get("EFFNN_BUILD_CUDA") == "1":
            pytest.fail("EFFNN_BUILD_CUDA=1 is set but effnn._C was built without CUDA")
        pytest.skip("effnn._C was built without CUDA (EFFNN_BUILD_EXT=1 EFFNN_BUILD_CUDA=1 "
                    "pip install --no-build-isolation --no-deps -e .)")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    assert ext_cuda_reasons(OPS[0]) == []
    assert rw._ext_reasons(torch.device("cuda")) == []
    # the CPU kernel still serves CPU tensors
    assert rw.choose_backend(torch.zeros(3, 2, 4)) == "ext"


def test_reasons_name_the_cuda_build_when_missing():
    if _built_with_cuda():
        pytest.skip("effnn._C has its CUDA kernels")
    reasons = rw._ext_reasons(torch.device("cuda"))
    assert reasons and "EFFNN_BUILD_CUDA=1" in reasons[0]


# ------------------------------------------------------------------------------------------------
# Cases (shared by the emulation and the GPU tests)
# ------------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available() or not _built_with_cuda(),
    reason="needs a CUDA device and effnn._C built with EFFNN_BUILD_CUDA=1 (benchmarks/gpu_check.sh)",
)


def _inputs(kind, n, h, d, seed=0):
    """float64 CPU leaves of a case (q, k, v, the three tables), coordinates, batch and keyword
    arguments. The quantised axes hold odd multiples of a quarter bin, never near a window or
    code boundary, so that both devices partition the points alike."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, 2, (n,), generator=g)
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    if kind == "radial":  # (azimuth, polar, range) with the exponential split along range
        window, quant, cells = (8.0, 8.0, 60.0), (1.0, 1.0, 1.0), 96
        kw = dict(exp_split_a=0.5)
    elif kind == "one_window":  # every cloud in one window of ~150 points: several tiles
        window, quant, cells = (40.0, 40.0, 40.0), (8.0, 8.0, 8.0), 16
        kw = {}
    else:
        window, quant, cells = (2.0, 2.0, 2.0), (0.5, 0.5, 0.5), 24
        kw = {}
    coords = (torch.randint(0, cells, (n, 3), generator=g) + 0.5).double() * (quant[0] / 4)
    if kind == "radial":
        coords[:, 2] = torch.rand(n, generator=g, dtype=torch.float64) * 30
    L = rw.quant_grid_length(window[0], quant[0])
    rows = 2 * L if kind == "radial" else 2 * L - 1
    tables = [0.3 * torch.randn(rows, 3, h, d, generator=g, dtype=torch.float64) for _ in range(3)]
    return [q, k, v, *tables], coords, batch, dict(window_size=window, quant_size=quant, **kw)


def _run(leaves, coords, batch, kw, backend, fused=False):
    """Output and gradients of q, k, v and the three tables for a fixed output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    q, k, v, tq, tk, tv = leaves
    if fused:  # q, k, v as strided views of one projection, read in place by the kernel
        q, k, v = torch.stack([q, k, v], 1).unbind(1)
    out = window_attention(q, k, v, coords, batch, table_q=tq, table_k=tk, table_v=tv,
                           backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def _on_cuda(leaves, coords, batch, dtype):
    coords = coords.to(torch.float64 if dtype is torch.float64 else torch.float32)
    return [t.to("cuda", dtype) for t in leaves], coords.cuda(), batch.cuda()


def _exact(leaves, coords, batch, kw):
    """The float64 reference on the CPU for the (rounded) CUDA inputs and the same coordinates."""
    return _run([t.double().cpu() for t in leaves], coords.cpu(), batch.cpu(), kw, "ref")


NAMES = ("out", "dq", "dk", "dv", "dtable_q", "dtable_k", "dtable_v")


# ------------------------------------------------------------------------------------------------
# Without a GPU: the CUDA source run in a host emulation, against the reference
# ------------------------------------------------------------------------------------------------

_EMULATION = Path(__file__).with_name("window_attention_cuda_emulation.cpp")
_CSRC = Path(__file__).parents[2] / "csrc"


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    """The ops of csrc/window_attention_cuda.cu compiled as C++ (about 35 s on 2 cores)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the GPU tests below run the kernels themselves")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler for the emulation of the CUDA kernels")
    from torch.utils.cpp_extension import load

    load(name="effnn_cuda_emu", sources=[str(_EMULATION)], is_python_module=False,
         extra_cflags=["-std=c++20", "-O1", f"-I{_CSRC}"],
         build_directory=str(tmp_path_factory.mktemp("cuda_emulation")))
    return torch.ops.effnn_cuda_emu


def _emulated(ops, leaves, coords, batch, kw, dtype):
    """Output and gradients (as _run) from the emulated kernels for inputs in ``dtype``."""
    q, k, v, tq, tk, tv = leaves
    window, quant, a = list(kw["window_size"]), list(kw["quant_size"]), kw.get("exp_split_a")
    qkv = [t.to(dtype) for t in (q, k, v)]
    order, starts, codes, r, tables, L = rw._ext_prepare(qkv[0], coords, batch, tq, tk, tv, window,
                                                        quant, a, "fixed")
    scale = q.shape[-1] ** -0.5
    out, lse = ops.window_attention_forward(*qkv, order, starts, codes, r, *tables, L, a, scale)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    first = ops.window_attention_backward(grad, *qkv, out, lse, order, starts, codes, r, *tables,
                                          L, a, scale)
    again = ops.window_attention_backward(grad, *qkv, out, lse, order, starts, codes, r, *tables,
                                          L, a, scale)
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x, y), "the backward is not deterministic"
    return [out, *first[:3], *(t.permute(2, 1, 0, 3) for t in first[3:])]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "dtype"), [("cubic", torch.float64), ("radial", torch.float32),
                                             ("one_window", torch.float32),
                                             ("radial", torch.bfloat16)])
def test_emulated_cuda_kernels_match_reference(emulated_ops, kind, dtype):
    leaves, coords, batch, kw = _inputs(kind, 300 if kind == "one_window" else 200, 2, 5)
    if dtype is not torch.float64:
        coords = coords.float()
    # the exact values of the rounded inputs (tables stay in float64 or float32, the kernels' dtype)
    rounded = [t.to(dtype).double() for t in leaves[:3]] + leaves[3:]
    exact = _run(rounded, coords, batch, kw, "ref")
    tables = [t.to(torch.promote_types(dtype, torch.float32)) for t in leaves[3:]]
    got = _emulated(emulated_ops, rounded[:3] + tables, coords, batch, kw, dtype)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    for name, a, e in zip(NAMES, got, exact, strict=True):
        assert_close_scaled(a, e, tol, name)


# ------------------------------------------------------------------------------------------------
# On a GPU: the public op against the reference
# ------------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("kind", ["cubic", "radial", "one_window"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_reference(kind, dtype):
    leaves, coords, batch, kw = _inputs(kind, 300, 2, 16)
    dev = _on_cuda(leaves, coords, batch, dtype)
    exact = _exact(*dev, kw)
    got = _run(*dev, kw, "ext")
    if dtype is torch.bfloat16:
        low = _run(*dev, kw, "ref")  # the reference's own bf16 error: the bound is twice it
        for name, a, lo, e in zip(NAMES, got, low, exact, strict=True):
            assert a.dtype == dtype and a.is_cuda, name
            assert_within_2x(a, lo, e, name)
    else:
        tol = 1e-10 if dtype is torch.float64 else 2e-5
        for name, a, e in zip(NAMES, got, exact, strict=True):
            assert a.dtype == dtype and a.is_cuda, name
            assert_close_scaled(a, e, tol, name)


@cuda_only
def test_fused_qkv_views_and_determinism():
    leaves, coords, batch, kw = _inputs("radial", 400, 2, 8, seed=3)
    dev = _on_cuda(leaves, coords, batch, torch.float32)
    first = _run(*dev, kw, "ext", fused=True)
    second = _run(*dev, kw, "ext")
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"{name}: the kernel is not deterministic (or strides matter)"
    for name, a, e in zip(NAMES, first, _exact(*dev, kw), strict=True):
        assert_close_scaled(a, e, 2e-5, name)


@cuda_only
def test_without_tables_and_auto_on_cuda_is_not_the_kernel():
    leaves, coords, batch, _ = _inputs("cubic", 200, 3, 5)
    dev, coords, batch = _on_cuda(leaves, coords, batch, torch.float32)
    q, k, v = (t.requires_grad_() for t in dev[:3])
    outs = []
    for backend in ("ext", "ref"):
        out = window_attention(q, k, v, coords, batch, 2.0, backend=backend)
        outs.append([out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))])
    for name, a, b in zip(NAMES[:4], *outs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
    # "auto" does not pick the untested-in-CI CUDA kernel (docs/sphereformer.md, CUDA kernel)
    assert rw.choose_backend(q) != "ext"


@cuda_only
def test_bounds_are_checked_on_the_device():
    n, h, d = 10, 1, 4
    q = torch.randn(n, h, d, device="cuda")
    order = torch.arange(n, device="cuda")
    starts = torch.tensor([0, n], device="cuda")
    empty_codes = torch.empty(0, dtype=torch.int32, device="cuda")
    empty_r = torch.empty(0, device="cuda")
    fwd = torch.ops.effnn_ext.window_attention_forward
    with pytest.raises(RuntimeError, match="permutation"):
        fwd(q, q, q, torch.zeros_like(order), starts, empty_codes, empty_r, None, None, None, 0,
            None, 0.5)
    with pytest.raises(RuntimeError, match="starts must run"):
        fwd(q, q, q, order, torch.tensor([0, n - 1], device="cuda"), empty_codes, empty_r, None,
            None, None, 0, None, 0.5)
    tables = [torch.zeros(3, 3, h, d, device="cuda") for _ in range(3)]  # L = 2: rows 2L-1
    codes = torch.full((n, 3), 2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="codes must be in"):
        fwd(q, q, q, order, starts, codes, empty_r, *tables, 2, None, 0.5)
