"""Synthetic data for tests, benchmarks and examples (nothing is downloaded)."""

from effnn.data.lidar import CLASS_NAMES, LidarScene, beam_elevations, lidar_scene

__all__ = ["CLASS_NAMES", "LidarScene", "beam_elevations", "lidar_scene"]
