"""Procedural LiDAR sweeps with per-point labels: a rotating 64- or 32-beam scanner in a street.

One sweep is ray cast analytically: every ray (beam elevation x azimuth step) returns the nearest
hit among a ground plane with small undulations, building blocks (boxes along both sides of the
street), cars (oriented boxes on the ground), poles (vertical cylinders) and vegetation (trees:
a cylinder trunk under a porous ellipsoid crown; bushes: porous ellipsoids), with Gaussian range
noise; rays without a hit within ``max_range`` return nothing. Because the rays are spread over
fixed angles, the points thin out with range as on a real sweep: the ground density falls roughly
as 1 / r^3, and a car 60 m away is hit by a few to a few dozen rays (next to the sensor:
thousands). No data is downloaded.

The rays are computed all at once per object (a Python loop over the 100-130 objects, none over
rays); each object only sees the azimuth columns its bounding circle covers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["CLASS_NAMES", "LidarScene", "beam_elevations", "lidar_scene"]

CLASS_NAMES = ("ground", "building", "car", "pole", "vegetation")
GROUND, BUILDING, CAR, POLE, VEGETATION = range(len(CLASS_NAMES))

# Azimuth step of each scanner at 10 Hz (HDL-64E: about 0.17 deg; HDL-32E: about 0.16 deg).
_DEFAULT_AZIMUTH_RES = {64: 0.17, 32: 0.16}


class LidarScene(NamedTuple):
    """One labelled sweep. ``points`` (N, 3) float32, metres, sensor at the origin, z up, the
    street along x; ``labels`` (N,) int64 indices into ``class_names``; the ground is near
    z = -``sensor_height``."""

    points: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    sensor_height: float


def beam_elevations(num_beams: int) -> Tensor:
    """Elevation angles (degrees, float64, top beam first) of a ``num_beams`` spinning scanner.

    64: HDL-64E-like, two blocks of 32 lasers: +2.0 .. -8.33 deg (1/3 deg apart) and
    -8.83 .. -24.9 deg (about 1/2 deg apart); the real sensor's per-laser calibration differs
    slightly. 32: HDL-32E, +10.67 .. -30.67 deg evenly (1.33 deg apart).
    """
    if num_beams == 64:
        upper = torch.linspace(2.0, -8.33, 32, dtype=torch.float64)
        lower = torch.linspace(-8.83, -24.9, 32, dtype=torch.float64)
        return torch.cat([upper, lower])
    if num_beams == 32:
        return torch.linspace(10.67, -30.67, 32, dtype=torch.float64)
    raise ValueError(f"num_beams: expected 32 or 64, got {num_beams!r}")


# --- analytic ray intersections; rays start at the origin, d (..., 3); inf where missed ---------

def _box_hit(d: Tensor, center: tuple[float, float, float], half: tuple[float, float, float],
             yaw: float) -> Tensor:
    """Nearest positive t of the box |R(-yaw) (x - center)| <= half (slab test in the box frame)."""
    c, s = math.cos(yaw), math.sin(yaw)
    dl = torch.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2]], -1)
    cx, cy, cz = center
    o = torch.tensor([-(c * cx + s * cy), -(-s * cx + c * cy), -cz], dtype=d.dtype)
    h = torch.tensor(half, dtype=d.dtype)
    # a zero direction component gives +-inf, which the slab test handles (the ray is either
    # inside that slab for all t or never)
    t1 = (-h - o) / dl
    t2 = (h - o) / dl
    t_near = torch.minimum(t1, t2).amax(-1)
    t_far = torch.maximum(t1, t2).amin(-1)
    return torch.where((t_near <= t_far) & (t_near > 0), t_near, math.inf)


def _cylinder_hit(d: Tensor, cx: float, cy: float, radius: float, z0: float, z1: float) -> Tensor:
    """Nearest positive t on the side of the vertical cylinder around (cx, cy), z0 <= z <= z1."""
    a = d[..., 0] ** 2 + d[..., 1] ** 2
    b = d[..., 0] * cx + d[..., 1] * cy
    disc = b * b - a * (cx * cx + cy * cy - radius * radius)
    t = (b - disc.clamp_min(0).sqrt()) / a.clamp_min(1e-12)
    z = t * d[..., 2]
    return torch.where((disc >= 0) & (t > 0) & (z >= z0) & (z <= z1), t, math.inf)


def _ellipsoid_hit(d: Tensor, center: tuple[float, float, float],
                   axes: tuple[float, float, float]) -> Tensor:
    """Nearest positive t of the axis-aligned ellipsoid sum(((x - center) / axes)^2) <= 1."""
    s = torch.tensor(axes, dtype=d.dtype)
    ds = d / s
    cs = torch.tensor(center, dtype=d.dtype) / s
    a = (ds * ds).sum(-1)
    b = (ds * cs).sum(-1)
    disc = b * b - a * (float((cs * cs).sum()) - 1)
    t = (b - disc.clamp_min(0).sqrt()) / a
    return torch.where((disc >= 0) & (t > 0), t, math.inf)


class _Object(NamedTuple):
    label: int
    kind: str  # "box" | "cylinder" | "ellipsoid"
    params: tuple
    bound: tuple[float, float, float]  # (x, y, radius) of a circle containing it in xy
    porosity: float = 0.0  # probability that a ray passes through (foliage)
    depth: float = 0.0  # hits land uniformly up to this far inside (foliage)


def _street(g: torch.Generator, h: float, length: float) -> list[_Object]:
    """A straight street along x: road, sidewalks, building blocks, cars, poles, trees, bushes;
    one cross street. The sensor sits on the road at the origin."""

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

    objs: list[_Object] = []
    road = u(5.0, 8.0)  # half width of the road
    y_mid = u(-1.5, 1.5)  # street centre line (the sensor is in some lane)
    walk = u(2.5, 5.0)  # sidewalk width
    cross = (u(12.0, 45.0) * (1 if u(0, 1) < 0.5 else -1), u(10.0, 16.0))  # cross street x, width
    ground = -h

    def in_cross(x0: float, x1: float, margin: float = 0.0) -> bool:
        return x1 > cross[0] - cross[1] / 2 - margin and x0 < cross[0] + cross[1] / 2 + margin

    for side in (-1.0, 1.0):
        curb = y_mid + side * road
        face = curb + side * walk
        # building blocks with gaps, set back a little from the sidewalk
        x = -length
        while x < length:
            size, depth, height = u(8.0, 30.0), u(8.0, 20.0), u(4.0, 22.0)
            x0, x1 = x, x + size
            x = x1 + (u(1.0, 8.0) if u(0, 1) < 0.4 else 0.0)
            if in_cross(x0, x1):
                continue
            y0 = face + side * u(0.0, 1.5)
            cy = y0 + side * depth / 2
            cx = (x0 + x1) / 2
            objs.append(_Object(BUILDING, "box",
                                ((cx, cy, ground + height / 2), (size / 2, depth / 2, height / 2), 0.0),
                                (cx, cy, math.hypot(size, depth) / 2)))
        # parked cars along the curb, nose to tail with gaps
        x = -length
        while x < length:
            size = (u(3.8, 4.9), u(1.6, 1.9), u(1.35, 1.7))
            cx = x + size[0] / 2
            x += size[0] + u(0.8, 12.0)
            if u(0, 1) < 0.35 or in_cross(cx - 3, cx + 3):
                continue
            cy = curb - side * (size[1] / 2 + u(0.1, 0.4))
            objs.append(_car(cx, cy, size, u(-0.06, 0.06), ground))
        # poles on the sidewalk near the curb
        x = -length + u(0.0, 20.0)
        while x < length:
            if not in_cross(x, x):
                cy = curb + side * u(0.4, 0.8)
                r, top = u(0.08, 0.2), u(4.0, 9.0)
                objs.append(_Object(POLE, "cylinder", (x, cy, r, ground, ground + top), (x, cy, r)))
            x += u(15.0, 30.0)
        # trees between the poles, bushes against the buildings
        x = -length + u(0.0, 10.0)
        while x < length:
            if u(0, 1) < 0.65 and not in_cross(x, x, 3.0):
                cy = curb + side * u(1.0, max(1.2, walk - 1.0))
                trunk_r, trunk_h = u(0.12, 0.3), u(1.8, 3.5)
                crown = (u(1.5, 3.0), u(1.5, 3.0), u(1.5, 3.5))
                objs.append(_Object(VEGETATION, "cylinder",
                                    (x, cy, trunk_r, ground, ground + trunk_h + crown[2]),
                                    (x, cy, trunk_r)))
                cz = ground + trunk_h + crown[2] * 0.8
                objs.append(_Object(VEGETATION, "ellipsoid", ((x, cy, cz), crown),
                                    (x, cy, max(crown[:2])), porosity=0.25, depth=0.4))
            if u(0, 1) < 0.3 and not in_cross(x, x, 3.0):
                axes = (u(0.8, 2.5), u(0.5, 1.0), u(0.5, 1.1))
                cy = face - side * axes[1]
                objs.append(_Object(VEGETATION, "ellipsoid", ((x + 5, cy, ground + 0.3), axes),
                                    (x + 5, cy, axes[0]), porosity=0.15, depth=0.2))
            x += u(8.0, 16.0)
    # a few cars driving in the lanes (not on the sensor's own spot) and in the cross street
    for _ in range(int(u(4, 9))):
        cx = u(-length, length)
        if abs(cx) < 8.0 or in_cross(cx - 3, cx + 3):
            continue
        size = (u(3.8, 4.9), u(1.6, 1.9), u(1.35, 1.7))
        cy = y_mid + u(-road + 2.5, road - 2.5)
        objs.append(_car(cx, cy, size, u(-0.05, 0.05) + (math.pi if cy > y_mid else 0.0), ground))
    for _ in range(int(u(1, 4))):
        size = (u(3.8, 4.9), u(1.6, 1.9), u(1.35, 1.7))
        cx = cross[0] + u(-cross[1] / 2 + 1.5, cross[1] / 2 - 1.5)
        cy = y_mid + (1 if u(0, 1) < 0.5 else -1) * u(road + walk + 6.0, length)
        objs.append(_car(cx, cy, size, math.pi / 2 + u(-0.05, 0.05), ground))
    return objs


def _car(cx: float, cy: float, size: tuple[float, float, float], yaw: float,
         ground: float) -> _Object:
    half = (size[0] / 2, size[1] / 2, size[2] / 2)
    return _Object(CAR, "box", ((cx, cy, ground + half[2] + 0.05), half, yaw),
                   (cx, cy, math.hypot(size[0], size[1]) / 2))


def lidar_scene(num_beams: int = 64, seed: int = 0, *, azimuth_res_deg: float | None = None,
                max_range: float = 80.0, sensor_height: float = 1.73,
                range_noise: float = 0.02, street_length: float = 100.0) -> LidarScene:
    """Ray cast one labelled sweep of a rotating ``num_beams`` scanner in a procedural street.

    Args:
        num_beams: 64 (HDL-64E-like, +2 .. -24.9 deg) or 32 (HDL-32E, +10.67 .. -30.67 deg);
            see :func:`beam_elevations`.
        seed: the scene layout and the noise are a function of the seed alone.
        azimuth_res_deg: azimuth step; default 0.17 (64 beams) or 0.16 (32 beams), the sensors'
            steps at 10 Hz.
        max_range: rays whose hit (after noise) is at or beyond this many metres return nothing.
        sensor_height: metres above the ground plane (KITTI's HDL-64E: 1.73).
        range_noise: standard deviation of the Gaussian range noise, metres.
        street_length: objects are placed for |x| <= street_length metres.

    Returns:
        :class:`LidarScene` with ``points`` (N, 3) float32 and ``labels`` (N,) int64 into
        ``CLASS_NAMES`` = (ground, building, car, pole, vegetation). Rays with no hit are dropped,
        so every point has a class.

    Example::

        >>> scene = lidar_scene(64, seed=0)
        >>> scene.points.shape[1], scene.labels.dtype
        (3, torch.int64)
    """
    elev_deg = beam_elevations(num_beams)
    res = _DEFAULT_AZIMUTH_RES[num_beams] if azimuth_res_deg is None else float(azimuth_res_deg)
    if not (0.0 < res <= 10.0):
        raise ValueError(f"azimuth_res_deg: expected a value in (0, 10], got {azimuth_res_deg!r}")
    for name, value in (("max_range", max_range), ("sensor_height", sensor_height),
                        ("street_length", street_length)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    if not (math.isfinite(range_noise) and range_noise >= 0):
        raise ValueError(f"range_noise: expected a finite number >= 0, got {range_noise!r}")

    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    A = int(round(360.0 / res))
    az = 2 * math.pi * torch.arange(A, dtype=f64) / A
    elev = torch.deg2rad(elev_deg)
    # rays as a (beams, azimuth steps) grid, so an object only touches its columns
    d = torch.stack([elev.cos()[:, None] * az.cos(), elev.cos()[:, None] * az.sin(),
                     elev.sin()[:, None].expand(-1, A)], -1)

    # ground: z = -h + a gentle undulation of a few centimetres
    k = torch.rand(4, generator=g, dtype=f64)
    down = d[..., 2] < -1e-9
    t = torch.where(down, -sensor_height / d[..., 2].clamp(max=-1e-9), math.inf)
    x, y = t * d[..., 0], t * d[..., 1]
    bump = 0.03 * torch.sin(0.15 * x + 6.3 * k[0]) * torch.cos(0.11 * y + 6.3 * k[1]) \
        + 0.02 * torch.sin(0.05 * (x + y) + 6.3 * k[2])
    t = torch.where(down, (-sensor_height + bump) / d[..., 2].clamp(max=-1e-9), math.inf)
    labels = torch.full(t.shape, GROUND, dtype=torch.int64)

    for obj in _street(g, sensor_height, street_length):
        bx, by, br = obj.bound
        dist = math.hypot(bx, by)
        if dist - br >= max_range:
            continue
        if dist <= br + 1e-6:
            cols = torch.arange(A)
        else:
            phi, half = math.atan2(by, bx) % (2 * math.pi), math.asin(br / dist)
            lo, hi = math.floor((phi - half) * A / (2 * math.pi)), math.ceil((phi + half) * A / (2 * math.pi))
            cols = torch.arange(lo, hi + 1) % A if hi - lo + 1 < A else torch.arange(A)
        dc = d[:, cols]
        if obj.kind == "box":
            t_obj = _box_hit(dc, *obj.params)
        elif obj.kind == "cylinder":
            t_obj = _cylinder_hit(dc, *obj.params)
        else:
            t_obj = _ellipsoid_hit(dc, *obj.params)
        if obj.porosity > 0:  # foliage: some rays pass through, the others stop somewhere inside
            through = torch.rand(t_obj.shape, generator=g, dtype=f64) < obj.porosity
            t_obj = torch.where(through, math.inf, t_obj)
            t_obj = t_obj + obj.depth * torch.rand(t_obj.shape, generator=g, dtype=f64)
        closer = t_obj < t[:, cols]
        t[:, cols] = torch.where(closer, t_obj, t[:, cols])
        labels[:, cols] = torch.where(closer, obj.label, labels[:, cols])

    t = t + range_noise * torch.randn(t.shape, generator=g, dtype=f64)
    keep = torch.isfinite(t) & (t > 0) & (t < max_range)
    points = (d[keep] * t[keep, None]).to(torch.float32)
    return LidarScene(points, labels[keep], CLASS_NAMES, float(sensor_height))
