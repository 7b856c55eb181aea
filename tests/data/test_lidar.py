import math

import pytest
import torch

from effnn.data import CLASS_NAMES, LidarScene, beam_elevations, lidar_scene
from effnn.data.lidar import BUILDING, CAR, GROUND, POLE, VEGETATION
from tests.threads import single_thread

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes() -> list[LidarScene]:
    with single_thread():
        return [lidar_scene(64, seed=s) for s in range(3)]


def _horizontal_range(scene: LidarScene) -> torch.Tensor:
    return scene.points[:, :2].norm(dim=1)


def test_deterministic_per_seed():
    a, b, c = lidar_scene(32, seed=3), lidar_scene(32, seed=3), lidar_scene(32, seed=4)
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
    assert a.points.shape != c.points.shape or not torch.equal(a.points, c.points)


@pytest.mark.parametrize("num_beams", [64, 32])
def test_shapes_dtypes_and_classes(num_beams):
    scene = lidar_scene(num_beams, seed=0)
    n = scene.points.shape[0]
    assert scene.points.shape == (n, 3) and scene.points.dtype == torch.float32
    assert scene.labels.shape == (n,) and scene.labels.dtype == torch.int64
    assert scene.class_names == CLASS_NAMES == ("ground", "building", "car", "pole", "vegetation")
    assert scene.sensor_height == 1.73
    assert torch.isfinite(scene.points).all()
    # one return per ray at most
    assert n <= num_beams * round(360 / (0.17 if num_beams == 64 else 0.16))
    counts = torch.bincount(scene.labels, minlength=len(CLASS_NAMES))
    assert counts.numel() == len(CLASS_NAMES) and (counts > 0).all(), counts


def test_every_class_in_default_scenes(scenes):
    for scene in scenes:
        assert (torch.bincount(scene.labels, minlength=5) > 0).all()


def test_points_lie_on_the_beams():
    # without range noise every point is on one of the rays: a beam elevation and an azimuth step
    res = 0.5
    scene = lidar_scene(64, seed=1, azimuth_res_deg=res, range_noise=0.0)
    p = scene.points.double()
    elev = torch.rad2deg(torch.atan2(p[:, 2], p[:, :2].norm(dim=1)))
    assert (elev[:, None] - beam_elevations(64)).abs().amin(1).max() < 1e-4
    az = torch.rad2deg(torch.atan2(p[:, 1], p[:, 0])) % 360 / res
    assert (az - az.round()).abs().max() < 1e-3


def test_ground_height(scenes):
    for scene in scenes:
        z = scene.points[:, 2] + scene.sensor_height
        ground = scene.labels == GROUND
        assert z[ground].abs().max() < 0.15  # a few cm of undulation plus range noise
        assert z[~ground].min() > -0.15  # nothing below the ground
        # cars are at most 1.8 m tall, poles 9 m; buildings rise from the ground
        assert z[scene.labels == CAR].max() < 1.85
        assert z[scene.labels == POLE].max() < 9.1
        assert z[scene.labels == BUILDING].min() < 0.5


def test_density_falls_with_range(scenes):
    for scene in scenes:
        r = _horizontal_range(scene)[scene.labels == GROUND]

        near, mid, far = (int(((r >= lo) & (r < hi)).sum()) / (math.pi * (hi * hi - lo * lo))
                          for lo, hi in ((5, 10), (15, 20), (30, 40)))
        assert near > 3 * mid > 0 and mid > 3 * far > 0, (near, mid, far)


def test_distant_objects_get_points(scenes):
    for scene in scenes:
        far = _horizontal_range(scene) > 40
        for label, least in ((CAR, 50), (POLE, 10), (BUILDING, 50), (VEGETATION, 50)):
            assert int((far & (scene.labels == label)).sum()) >= least, CLASS_NAMES[label]


def test_max_range(scenes):
    for scene in scenes:
        assert scene.points.norm(dim=1).max() < 80.0
    short = lidar_scene(64, seed=0, max_range=30.0)
    assert short.points.norm(dim=1).max() < 30.0
    assert short.points.shape[0] < scenes[0].points.shape[0]


@pytest.mark.parametrize("kwargs, name", [
    ({"num_beams": 16}, "num_beams"),
    ({"azimuth_res_deg": 0.0}, "azimuth_res_deg"),
    ({"max_range": -1.0}, "max_range"),
    ({"sensor_height": math.inf}, "sensor_height"),
    ({"range_noise": math.nan}, "range_noise"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lidar_scene(**kwargs)


def _marched(d: torch.Tensor, inside) -> torch.Tensor:
    """First t on a 1 mm grid along each ray where ``inside(points)`` holds; inf if none."""
    t = torch.arange(1, 20001, dtype=torch.float64) * 1e-3
    hit = inside(d[:, None, :] * t[:, None])
    first = torch.where(hit.any(1), t[hit.int().argmax(1)], math.inf)
    return first


@pytest.mark.parametrize("shape", ["box", "cylinder", "ellipsoid"])
def test_intersections_match_ray_marching(shape):
    from effnn.data.lidar import _box_hit, _cylinder_hit, _ellipsoid_hit

    g = torch.Generator().manual_seed(0)
    d = torch.randn(300, 3, generator=g, dtype=torch.float64)
    d[:, 0] = d[:, 0].abs() + 2.5  # mostly towards +x, where the objects are
    d = d / d.norm(dim=1, keepdim=True)
    if shape == "box":
        center, half, yaw = (8.0, 1.0, -0.5), (2.2, 0.9, 0.75), 0.6
        t = _box_hit(d, center, half, yaw)
        c, s = math.cos(yaw), math.sin(yaw)

        def inside(p):
            q = p - torch.tensor(center, dtype=p.dtype)
            local = torch.stack([c * q[..., 0] + s * q[..., 1], -s * q[..., 0] + c * q[..., 1],
                                 q[..., 2]], -1)
            return (local.abs() <= torch.tensor(half, dtype=p.dtype)).all(-1)
    elif shape == "cylinder":
        t = _cylinder_hit(d, 7.0, -1.0, 1.5, -1.73, 3.0)

        def inside(p):
            r = ((p[..., 0] - 7.0) ** 2 + (p[..., 1] + 1.0) ** 2).sqrt()
            return (r <= 1.5) & (p[..., 2] >= -1.73) & (p[..., 2] <= 3.0)
    else:
        center, axes = (9.0, 0.5, 1.0), (2.0, 3.0, 1.5)
        t = _ellipsoid_hit(d, center, axes)

        def inside(p):
            q = (p - torch.tensor(center, dtype=p.dtype)) / torch.tensor(axes, dtype=p.dtype)
            return (q * q).sum(-1) <= 1

    ref = _marched(d, inside)
    hit = torch.isfinite(ref)
    assert 30 < int(hit.sum()) < 280  # both hits and misses are exercised
    assert torch.equal(torch.isfinite(t), hit)
    assert (t[hit] - ref[hit]).abs().max() < 2e-3
