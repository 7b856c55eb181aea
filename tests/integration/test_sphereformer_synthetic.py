"""A shortened run of examples/sphereformer_synthetic.py: the reduced SphereFormer learns to
segment synthetic sweeps (the loss falls), in both window variants."""

from __future__ import annotations

import statistics

import pytest

from tests.examples import load_example


@pytest.fixture
def example():
    return load_example("sphereformer_synthetic.py")


@pytest.mark.parametrize("windows", ["radial+cubic", "cubic"])
def test_shortened_run_learns(example, one_thread, windows):
    # coarse sweeps (1.5 deg azimuth steps, about 17k points) and voxels (0.5 m, about 2.8k)
    # keep a training step near 0.3 s on one idle thread
    cfg = example.Config(windows=windows, steps=16, azimuth_res_deg=1.5, voxel_size=0.5, num_test=1)
    result = example.train(cfg, seed=0)
    losses = result["losses"]
    assert len(losses) == 16
    first, last = statistics.mean(losses[:4]), statistics.mean(losses[-4:])
    assert first > 1.3  # about ln(5) = 1.61 at the start
    assert last < 0.8 * first, (first, last)  # about 0.67 x here
    assert result["miou"] > 0.25  # about 0.33 here
