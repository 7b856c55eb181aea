"""Benchmark cases of ``RadialWindowAttention`` (SphereFormer) against padded window attention.

The cloud is one sweep of a synthetic rotating 64-beam scanner (:func:`scanner_cloud`): beams at
elevations -24.8 .. +2 deg (HDL-64-like), 1.73 m above a ground plane, with box-shaped buildings
and cars around it, so the point density falls with range as on real LiDAR. Radial windows of
2 deg x 2 deg x 120 m (SphereFormer's nuScenes level-1 windows), 2 heads x 16 dims.

- effnn: ``RadialWindowAttention(32, 2, (2, 2, 120), rel_pos="exp_split")`` -- the qkv
  projection, radial-window attention with the contextual exponential-split position encoding,
  the output projection.
- baseline: the same projections and the same windows, every window padded to the largest one,
  ``F.scaled_dot_product_attention`` with a key-padding mask, no position encoding.

Shape spec ``POINTS`` (e.g. 100000). Defaults: 20k and 100k points (``--quick``: 20k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn.bench.registry import (
    BASELINE,
    FORWARD,
    TRAIN,
    Case,
    Layer,
    Setting,
    Workload,
    parse_ints,
    register_layer,
)
from effnn.nn.radial_window import RadialWindowAttention
from effnn.ops._dispatch import BackendError
from effnn.ops.radial_window import cart2sphere, window_partition

FORMAT = "POINTS (e.g. 100000)"
DIM, HEADS = 32, 2
WINDOW = (2.0, 2.0, 120.0)


def scanner_cloud(n_points: int, beams: int = 64, seed: int = 0, max_range: float = 100.0,
                  device=None, dtype=torch.float32) -> Tensor:
    """(n_points, 3) sensor-centred xyz of one sweep of a rotating ``beams``-beam scanner.

    Each ray (beam elevation x azimuth step) returns the nearest hit among the ground plane
    (z = -1.73 m), 24 building faces (one wall per 15 deg azimuth sector at 12-60 m, 3-15 m high)
    and 40 cars (axis-aligned 4.5 x 1.8 x 1.5 m boxes within 5-50 m), with 2 cm range noise; rays
    without a hit within ``max_range`` are dropped. The azimuth resolution is chosen so that the
    sweep has at least ``n_points`` returns, which are then subsampled uniformly to exactly
    ``n_points``.
    """
    g = torch.Generator().manual_seed(seed)
    elev = torch.deg2rad(torch.linspace(-24.8, 2.0, beams, dtype=torch.float64))
    # building faces: distance and height per azimuth sector
    wall_dist = 12 + 48 * torch.rand(24, generator=g, dtype=torch.float64)
    wall_h = 3 + 12 * torch.rand(24, generator=g, dtype=torch.float64)
    car_c = torch.rand(40, 2, generator=g, dtype=torch.float64)
    car_r = 5 + 45 * car_c[:, 0]
    car_phi = 2 * math.pi * car_c[:, 1]
    car_lo = torch.stack([car_r * torch.cos(car_phi) - 2.25, car_r * torch.sin(car_phi) - 0.9,
                          torch.full_like(car_r, -1.73)], -1)
    car_hi = car_lo + torch.tensor([4.5, 1.8, 1.5], dtype=torch.float64)
    steps = max(64, math.ceil(n_points / beams / 0.6))
    while True:
        az = 2 * math.pi * torch.arange(steps, dtype=torch.float64) / steps
        e, a = torch.meshgrid(elev, az, indexing="ij")
        dirs = torch.stack([torch.cos(e) * torch.cos(a), torch.cos(e) * torch.sin(a), torch.sin(e)], -1)
        dirs = dirs.reshape(-1, 3)
        t = torch.full((dirs.shape[0],), math.inf, dtype=torch.float64)
        down = dirs[:, 2] < 0
        t[down] = -1.73 / dirs[down, 2]
        sector = (torch.atan2(dirs[:, 1], dirs[:, 0]) % (2 * math.pi) / (2 * math.pi) * 24).long() % 24
        horiz = dirs[:, :2].norm(dim=-1)
        t_wall = wall_dist[sector] / horiz
        hit_wall = t_wall * dirs[:, 2] <= wall_h[sector] - 1.73
        t = torch.where(hit_wall & (t_wall < t), t_wall, t)
        # slab test against each car box
        inv = 1 / torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
        t0 = (car_lo[None] * inv[:, None]).transpose(0, 1)  # (cars, rays, 3)
        t1 = (car_hi[None] * inv[:, None]).transpose(0, 1)
        t_near = torch.minimum(t0, t1).amax(-1)
        t_far = torch.maximum(t0, t1).amin(-1)
        t_car = torch.where((t_near <= t_far) & (t_near > 0), t_near, torch.full_like(t_near, math.inf))
        t = torch.minimum(t, t_car.amin(0))
        t = t + 0.02 * torch.randn(t.shape, generator=g, dtype=torch.float64)
        keep = torch.isfinite(t) & (t < max_range)
        if int(keep.sum()) >= n_points:
            break
        steps = math.ceil(steps * 1.2 * n_points / max(1, int(keep.sum())))
    xyz = dirs[keep] * t[keep, None]
    pick = torch.randperm(xyz.shape[0], generator=g)[:n_points]
    return xyz[pick].to(device=device, dtype=dtype)


class PaddedWindowAttention(nn.Module):
    """The baseline: RadialWindowAttention's projections and radial windows, each window padded to
    the largest one, ``scaled_dot_product_attention`` with a key-padding mask, no position
    encoding."""

    def __init__(self, dim: int, num_heads: int, window_size=WINDOW, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.window_size = num_heads, window_size
        self.qkv = nn.Linear(dim, 3 * dim, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, xyz: Tensor, batch: Tensor) -> Tensor:
        N, C = x.shape
        h = self.num_heads
        order, window, counts = window_partition(cart2sphere(xyz), batch, self.window_size)
        n_max = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(N, device=x.device) - starts[window]
        qkv = self.qkv(x)[order].view(N, 3, h, C // h)
        padded = qkv.new_zeros(counts.shape[0], n_max, 3, h, C // h)
        padded[window, slot] = qkv
        valid = torch.arange(n_max, device=x.device) < counts[:, None]
        q, k, v = padded.permute(2, 0, 3, 1, 4)  # (W, h, n, d) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        out = out.transpose(1, 2)[window, slot].reshape(N, C)
        y = torch.empty_like(out)
        y[order] = out
        return self.proj(y)


def window_pairs(xyz: Tensor, batch: Tensor, window_size=WINDOW) -> tuple[int, int]:
    """(sum of n_w^2, windows * n_max^2): the within-window pairs and the padded baseline's slots."""
    _, _, counts = window_partition(cart2sphere(xyz), batch, window_size)
    return int((counts * counts).sum()), counts.numel() * int(counts.max()) ** 2


def sphereformer_case(spec: str) -> Case:
    (points,) = parse_ints(spec, 1, FORMAT)

    def build(provider: str, s: Setting) -> Workload:
        n = s.tokens if s.tokens is not None else points
        factory = {"device": s.device, "dtype": s.dtype}
        xyz = scanner_cloud(n, device=s.device)
        batch = torch.zeros(n, dtype=torch.long, device=s.device)
        x = torch.randn(n, DIM, **factory)
        pairs, slots = window_pairs(xyz, batch)
        proj_macs = n * 4 * DIM * DIM
        if provider == BASELINE:
            layer: nn.Module = PaddedWindowAttention(DIM, HEADS, **factory)
            macs = proj_macs + 2 * slots * DIM
            fn = lambda x: layer(x, xyz, batch)  # noqa: E731
            return Workload(fn, (x,), {FORWARD: 2.0 * macs, TRAIN: 6.0 * macs}, n,
                            params=list(layer.parameters()), backend="torch")
        if provider == "triton" and s.device.type != "cuda":  # the interpreter is for tests only
            raise BackendError("sphereformer: the Triton kernels are timed on CUDA tensors only")
        layer = RadialWindowAttention(DIM, HEADS, WINDOW, backend=provider, **factory)
        # q.k, p.v and the q.T_q, k.T_k, T_v terms per pair: 2d + 3*(2 gathers) ~ count 2d
        macs = proj_macs + 2 * pairs * DIM
        fn = lambda x: layer(x, xyz, batch=batch)  # noqa: E731
        return Workload(fn, (x,), {FORWARD: 2.0 * macs, TRAIN: 6.0 * macs}, n,
                        params=list(layer.parameters()))

    return Case("sphereformer", f"{points}", f"{points} points, 64 beams, 2x2 deg windows, h2 d16",
                build, cost=points)


SPHEREFORMER = register_layer(
    Layer(
        name="sphereformer",
        title="RadialWindowAttention (exp-split RPE) vs padded SDPA windows (no RPE)",
        baseline="padded-sdpa",
        shape_format=FORMAT,
        parse=sphereformer_case,
        defaults=("20000", "100000"),
        quick=("20000",),
        backends=("ref", "ext", "triton"),
    )
)
