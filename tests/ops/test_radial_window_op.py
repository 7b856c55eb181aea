import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effnn
from effnn.ops import radial_window as rw
from effnn.ops.radial_window import (
    cart2sphere,
    exponential_split,
    radial_window_attention,
    window_attention,
    window_partition,
)
from tests.naive import exponential_split_naive, window_attention_naive

A = 0.0125  # SphereFormer's first range bin (0.05 * 0.25 m)


def cloud(n, clouds=2, spread=(8.0, 8.0, 1.0), dtype=torch.float64):
    xyz = torch.randn(n, 3, dtype=dtype) * torch.tensor(spread, dtype=dtype)
    return xyz, torch.randint(0, clouds, (n,))


def qkv(n, h, d, dtype=torch.float64):
    return [torch.randn(n, h, d, dtype=dtype, requires_grad=True) for _ in range(3)]


def tables(rows, h, d, dtype=torch.float64):
    return [(0.3 * torch.randn(rows, 3, h, d, dtype=dtype)).requires_grad_() for _ in range(3)]


@pytest.fixture(params=["one_chunk", "many_chunks"])
def chunking(request, monkeypatch):
    # the reference cuts every bucket into chunks of windows; tiny chunks exercise the stitching
    if request.param == "many_chunks":
        monkeypatch.setattr(rw, "_CHUNK_SLOTS", 1)
    return request.param


# ---- exponential split and coordinates ---------------------------------------------------------


def test_exponential_split_matches_hand_computed_official_formula():
    # idx = 2 floor(log2((|r| + 2a) / a)) - 2, +1 if (3 * 2^(idx//2) - 2) a <= |r|, mirrored to -idx-1
    # for r < 0 (SphereFormer model/spherical_transformer.py, exponential_split), computed by hand:
    rel = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.06, 0.1, 0.15, 1.0, 10.0, 100.0, 200.0,
                        -0.01, -0.02, -0.06, -100.0, -200.0], dtype=torch.float32)
    expected = [0, 0, 1, 2, 3, 4, 5, 10, 17, 23, 25, -1, -2, -4, -24, -26]
    assert exponential_split(rel, A).tolist() == expected
    # the table row SphereFormer uses: + 24, clamped to [0, 2L - 1] = [0, 47] for L = 24
    rows = (exponential_split(rel, A) + 24).clamp(0, 47).tolist()
    assert rows == [24, 24, 25, 26, 27, 28, 29, 34, 41, 47, 47, 23, 22, 20, 0, 0]


def test_exponential_split_matches_bin_definition():
    # "starting from 0, the split length doubles once used twice": edges 0, a, 2a, 4a, 6a, 10a, ...
    # (values on the edges themselves are excluded: there log2 rounding decides)
    rel = (torch.rand(4000, dtype=torch.float64) - 0.5) * 40
    assert torch.equal(exponential_split(rel, A), exponential_split_naive(rel, A))
    edges = torch.tensor([1, 2, 4, 6, 10, 14, 22, 30], dtype=torch.float64) * A
    assert exponential_split(edges * (1 + 1e-9), A).tolist() == list(range(1, 9))
    assert exponential_split(edges * (1 - 1e-9), A).tolist() == list(range(0, 8))


def test_exponential_split_is_exact_on_the_bin_edges():
    # with a = 0.5 the edges a, 2a, 4a, 6a, 10a, 14a, 22a, 30a are exact floats: each opens its bin
    edges = torch.tensor([0.5, 1, 2, 3, 5, 7, 11, 15])
    for dtype in (torch.float32, torch.float64):
        assert exponential_split(edges.to(dtype), 0.5).tolist() == list(range(1, 9))
        assert exponential_split(-edges.to(dtype), 0.5).tolist() == list(range(-2, -10, -1))


def test_chunks_bound_the_temporaries():
    # every chunk holds at most _CHUNK_SLOTS values per (head, slot, key or table row), so the
    # peak memory is the O(N) saved tensors plus one chunk, however large the windows
    xyz, batch = cloud(3000, clouds=3, spread=(20.0, 20.0, 2.0), dtype=torch.float32)
    layout = rw._Layout(cart2sphere(xyz), batch, [8.0, 8.0, 120.0], "fixed", heads=2)
    assert sum(int(v.sum()) for _, v in layout.chunks) == 3000
    for pos, _ in layout.chunks:
        W, n = pos.shape
        assert W == 1 or 2 * W * n * (n + rw._ROW_WIDTH) <= rw._CHUNK_SLOTS


def test_cart2sphere_convention():
    xyz = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 2], [3, 0, -4], [-1, -1e-9, 0]],
                       dtype=torch.float64)
    s = cart2sphere(xyz)
    # azimuth = atan2(y, x) + 180 deg; polar angle from +z; range
    assert torch.allclose(s[:, 0], torch.tensor([180.0, 270, 90, 180, 180, 0], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(s[:, 1], torch.tensor([90.0, 90, 90, 0, 90 + math.degrees(math.atan2(4, 3)), 90],
                                                dtype=torch.float64))
    assert torch.allclose(s[:, 2], torch.tensor([1.0, 1, 1, 2, 5, 1], dtype=torch.float64))


def test_window_partition_sorts_points_by_window():
    coords = torch.tensor([[0.5, 0.5, 0.5], [2.5, 0.1, 0.1], [0.2, 0.9, 0.3], [0.5, 0.5, 0.5]])
    batch = torch.tensor([0, 0, 0, 1])
    order, window, counts = window_partition(coords, batch, [1.0, 1.0, 1.0])
    assert counts.tolist() == [2, 1, 1]  # cloud 0: {0, 2} and {1}; cloud 1: {3}
    assert window.tolist() == [0, 0, 1, 2]
    assert sorted(order[:2].tolist()) == [0, 2] and order[2:].tolist() == [1, 3]


# ---- attention against the dense brute force -------------------------------------------------


def _check_against_naive(out, ref, ins, atol=1e-10):
    assert torch.allclose(out, ref, atol=atol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, ins, g)
    want = torch.autograd.grad(ref, ins, g)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=atol)


@pytest.mark.parametrize("origin", ["fixed", "batch_min"])
@pytest.mark.parametrize("window", [(40.0, 30.0, 120.0), (10.0, 10.0, 120.0), (90.0, 60.0, 6.0)])
def test_radial_exp_split_matches_naive(origin, window):
    N, h, d, L = 90, 2, 5, 4
    xyz, batch = cloud(N)
    q, k, v = qkv(N, h, d)
    T = tables(2 * L, h, d)
    quant = [w / L for w in window]
    out = radial_window_attention(q, k, v, xyz, batch, window, table_q=T[0], table_k=T[1],
                                  table_v=T[2], quant_size=quant, a=0.5, origin=origin)
    ref = window_attention_naive(q, k, v, cart2sphere(xyz), batch, window, d**-0.5, origin, T,
                                 quant, 0.5)
    _check_against_naive(out, ref, [q, k, v, *T])


@pytest.mark.parametrize("origin", ["fixed", "batch_min"])
def test_cubic_windows_match_naive(origin, chunking):
    N, h, d, L = 80, 3, 4, 3
    xyz, batch = cloud(N, spread=(2.0, 2.0, 1.0))
    q, k, v = qkv(N, h, d)
    T = tables(2 * L - 1, h, d)
    # backend="ref": the chunk stitching is the reference's (auto picks ext when it is built)
    out = window_attention(q, k, v, xyz, batch, 1.5, table_q=T[0], table_k=T[1], table_v=T[2],
                           quant_size=0.5, origin=origin, scale=0.3, backend="ref")
    ref = window_attention_naive(q, k, v, xyz, batch, [1.5] * 3, 0.3, origin, T, [0.5] * 3)
    _check_against_naive(out, ref, [q, k, v, *T])


def test_without_position_encoding_matches_naive():
    N, h, d = 60, 2, 7
    xyz, batch = cloud(N, spread=(2.0, 2.0, 2.0))
    q, k, v = qkv(N, h, d)
    out = window_attention(q, k, v, xyz, batch, [1.0, 2.0, 1.5])
    ref = window_attention_naive(q, k, v, xyz, batch, [1.0, 2.0, 1.5], d**-0.5)
    _check_against_naive(out, ref, [q, k, v])


def test_official_sizes_match_naive():
    # SphereFormer level 1: 2 x 2 deg x 120 m windows, 24 bins, a = 0.0125, head_dim 16
    N, h, d, L = 120, 1, 16, 24
    ang = torch.rand(N, 2, dtype=torch.float64)
    r = 2 + 60 * torch.rand(N, dtype=torch.float64)
    az = torch.deg2rad(4 * ang[:, 0])  # a 4 deg x 4 deg patch of the sky: a few windows
    el = torch.deg2rad(-2 - 4 * ang[:, 1])
    xyz = torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], -1) * r[:, None]
    batch = torch.zeros(N, dtype=torch.long)
    q, k, v = qkv(N, h, d)
    T = tables(2 * L, h, d)
    out = radial_window_attention(q, k, v, xyz, batch, (2.0, 2.0, 120.0), table_q=T[0],
                                  table_k=T[1], table_v=T[2], origin="batch_min")
    ref = window_attention_naive(q, k, v, cart2sphere(xyz), batch, [2.0, 2.0, 120.0], 0.25,
                                 "batch_min", T, [2 / 24, 2 / 24, 5.0], A)
    _check_against_naive(out, ref, [q, k, v, *T])


def test_gradcheck():
    N, h, d, L = 10, 2, 3, 2
    xyz, batch = cloud(N, spread=(3.0, 3.0, 1.0))
    q, k, v = qkv(N, h, d)
    T = tables(2 * L, h, d)

    def f(q, k, v, tq, tk, tv):
        return radial_window_attention(q, k, v, xyz, batch, (90.0, 90.0, 120.0), table_q=tq,
                                       table_k=tk, table_v=tv, quant_size=(45.0, 45.0, 60.0), a=0.3)

    assert torch.autograd.gradcheck(f, (q, k, v, *T))


def test_fixed_origin_windows_do_not_depend_on_the_rest_of_the_batch():
    N, h, d, L = 50, 2, 4, 4
    xyz, _ = cloud(N, clouds=1)
    # a cloud above the sensor: it holds the batch minimum of the polar angle
    other = torch.randn(30, 3, dtype=torch.float64) * 0.3 + torch.tensor([0.5, 0.5, 3.0], dtype=torch.float64)
    q, k, v = qkv(N + 30, h, d)
    T = tables(2 * L, h, d)
    window, quant = (20.0, 20.0, 120.0), (5.0, 5.0, 30.0)

    def run(points, batch, origin, n):
        return radial_window_attention(q[:n], k[:n], v[:n], points, batch, window, table_q=T[0],
                                       table_k=T[1], table_v=T[2], quant_size=quant, a=0.5,
                                       origin=origin)[:N]

    both = torch.cat([xyz, other])
    batch = torch.cat([torch.zeros(N, dtype=torch.long), torch.ones(30, dtype=torch.long)])
    alone = run(xyz, torch.zeros(N, dtype=torch.long), "fixed", N)
    assert torch.allclose(run(both, batch, "fixed", N + 30), alone, atol=1e-12)
    # sptr's batch minimum moves this cloud's windows when another cloud is added
    assert not torch.allclose(run(both, batch, "batch_min", N + 30),
                              run(xyz, torch.zeros(N, dtype=torch.long), "batch_min", N), atol=1e-3)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 25), h=st.integers(1, 3), d=st.integers(1, 6), clouds=st.integers(1, 3),
    L=st.integers(1, 3), exp=st.booleans(), origin=st.sampled_from(["fixed", "batch_min"]),
)
def test_property_matches_naive(n, h, d, clouds, L, exp, origin):
    xyz, batch = cloud(n, clouds, spread=(2.0, 2.0, 2.0))
    q, k, v = qkv(n, h, d)
    T = tables(2 * L if exp else 2 * L - 1, h, d)
    window = [1.5, 2.0, 2.5]
    quant = [w / L for w in window]
    a = 0.2 if exp else None
    out = window_attention(q, k, v, xyz, batch, window, table_q=T[0], table_k=T[1], table_v=T[2],
                           quant_size=quant, exp_split_a=a, origin=origin)
    ref = window_attention_naive(q, k, v, xyz, batch, window, d**-0.5, origin, T, quant, a)
    _check_against_naive(out, ref, [q, k, v, *T])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_close_to_float64(dtype):
    N, h, d, L = 64, 2, 16, 4
    xyz, batch = cloud(N)
    q, k, v = qkv(N, h, d)
    T = tables(2 * L, h, d)
    kw = {"quant_size": (10.0, 7.5, 30.0), "a": 0.5}
    ref = radial_window_attention(q, k, v, xyz, batch, (40.0, 30.0, 120.0), table_q=T[0],
                                  table_k=T[1], table_v=T[2], **kw)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, *T)]
    out = radial_window_attention(*low[:3], xyz, batch, (40.0, 30.0, 120.0), table_q=low[3],
                                  table_k=low[4], table_v=low[5], **kw)
    assert out.dtype == dtype
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}[dtype]
    assert torch.allclose(out.double(), ref, atol=tol, rtol=tol)
    out.double().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in low)


def test_empty_input():
    q, k, v = qkv(0, 2, 4)
    out = window_attention(q, k, v, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 1.0)
    assert out.shape == (0, 2, 4)
    out.sum().backward()
    assert q.grad.shape == (0, 2, 4)


def test_opcheck():
    N, h, d, L = 20, 2, 3, 2
    xyz, batch = cloud(N, spread=(2.0, 2.0, 2.0), dtype=torch.float32)
    q, k, v = qkv(N, h, d, torch.float32)
    T = tables(2 * L, h, d, torch.float32)
    args = (q, k, v, xyz, batch, *T, [2.0, 2.0, 2.0], [1.0, 1.0, 1.0], 0.5, "fixed", 0.5, "ref")
    torch.library.opcheck(torch.ops.effnn.window_attention.default, args)


# ---- bad input ------------------------------------------------------------------------------------


def test_errors():
    N, h, d = 10, 2, 4
    xyz, batch = cloud(N, dtype=torch.float32)
    q, k, v = qkv(N, h, d, torch.float32)
    T = tables(8, h, d, torch.float32)
    with pytest.raises(ValueError, match="q must be 3-D"):
        window_attention(q[0], k, v, xyz, batch, 1.0)
    with pytest.raises(ValueError, match="k must have q's shape"):
        window_attention(q, k[:5], v, xyz, batch, 1.0)
    with pytest.raises(ValueError, match=r"coords must have shape \(10, 3\)"):
        window_attention(q, k, v, xyz[:, :2], batch, 1.0)
    with pytest.raises(ValueError, match=r"batch must have shape \(10,\)"):
        window_attention(q, k, v, xyz, batch[:3], 1.0)
    with pytest.raises(TypeError, match="batch must be an integer tensor"):
        window_attention(q, k, v, xyz, batch.float(), 1.0)
    with pytest.raises(TypeError, match="k has dtype"):
        window_attention(q, k.double(), v, xyz, batch, 1.0)
    with pytest.raises(ValueError, match="window_size must be 3 positive"):
        window_attention(q, k, v, xyz, batch, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="origin must be one of"):
        window_attention(q, k, v, xyz, batch, 1.0, origin="center")
    with pytest.raises(ValueError, match="all three tables"):
        window_attention(q, k, v, xyz, batch, 1.0, table_q=T[0], quant_size=0.25)
    with pytest.raises(ValueError, match="quant_size is required"):
        window_attention(q, k, v, xyz, batch, 1.0, table_q=T[0], table_k=T[1], table_v=T[2])
    with pytest.raises(ValueError, match=r"table_q must have shape \(7, 3, 2, 4\)"):
        window_attention(q, k, v, xyz, batch, 1.0, table_q=T[0], table_k=T[1], table_v=T[2],
                         quant_size=0.25)
    with pytest.raises(ValueError, match="same|one number of bins"):
        window_attention(q, k, v, xyz, batch, 1.0, table_q=T[0], table_k=T[1], table_v=T[2],
                         quant_size=[0.25, 0.5, 0.25], exp_split_a=0.1)
    with pytest.raises(ValueError, match="exp_split_a must be a positive"):
        window_attention(q, k, v, xyz, batch, 1.0, exp_split_a=-1.0)
    bad = xyz.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        window_attention(q, k, v, bad, batch, 1.0)
    with pytest.raises(ValueError, match="batch indices must be >= 0"):
        window_attention(q, k, v, xyz, batch - 5, 1.0)
    with pytest.raises(effnn.BackendError, match="float64 is not supported"):
        window_attention(q.double(), k.double(), v.double(), xyz, batch, 1.0, backend="triton")
    with pytest.raises(ValueError, match="64-bit window key"):
        window_partition(torch.tensor([[0.0, 0, 0], [1e7, 1e7, 1e7]]), torch.zeros(2, dtype=torch.long),
                         [1e-3] * 3)
