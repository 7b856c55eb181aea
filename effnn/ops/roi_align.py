"""RoIAlign (He et al., "Mask R-CNN", ICCV 2017) and its FPN multi-scale form, in plain PyTorch.

:func:`roi_align` computes what ``torchvision.ops.roi_align`` computes (the same sample points,
the same border rules, the same average) for all regions at once: the sample coordinates of every
region are built as one tensor and read with one ``grid_sample``. :func:`multi_scale_roi_align`
assigns each region to a pyramid level as ``torchvision.ops.MultiScaleRoIAlign`` does
(``LevelMapper``: k = floor(4 + log2(sqrt(area) / 224 + 1e-6)), clamped to the levels present).
No torchvision needed; tests compare both with torchvision when it is installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["multi_scale_roi_align", "roi_align", "roi_levels"]


def _axis_samples(start: Tensor, length: Tensor, pooled: int, ratio: int) -> Tensor:
    """Sample coordinates along one axis: start, length (...) -> (..., pooled * ratio), bin by bin."""
    bins = length / pooled
    k = torch.arange(pooled * ratio, device=start.device, dtype=start.dtype)
    # sample (p, i) of bin p lies at start + p * bin + (i + 0.5) * bin / ratio = start + (k + 0.5) * bin / ratio
    return start[..., None] + (k + 0.5) * (bins / ratio)[..., None]


def roi_align(
    x: Tensor,
    boxes: Tensor,
    output_size: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign of N regions per image: x (B, C, H, W); boxes (B, N, 4) xyxy in input pixels ->
    (B, N, C, output_size, output_size).

    Equals ``torchvision.ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio,
    aligned)`` with ``rois`` the boxes and their image indices, for ``sampling_ratio`` > 0 (a fixed
    number of samples per bin, as FPN detectors use; torchvision's adaptive ``sampling_ratio <= 0``
    varies the count per region and is not provided). The samples are read with one
    ``grid_sample`` (border padding = torchvision's clamping to the map) and zeroed where
    torchvision zeroes them (beyond one cell outside the map)."""
    if sampling_ratio < 1:
        raise ValueError(f"roi_align: sampling_ratio must be >= 1, got {sampling_ratio}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != x.shape[0]:
        raise ValueError(f"roi_align: boxes must be (B={x.shape[0]}, N, 4) xyxy, got {tuple(boxes.shape)}")
    B, C, H, W = x.shape
    N, S = boxes.shape[1], output_size * sampling_ratio
    offset = 0.5 if aligned else 0.0
    b = boxes.to(x.dtype) * spatial_scale - offset
    size = b[..., 2:] - b[..., :2]
    if not aligned:  # torchvision: force malformed (or tiny) regions to 1x1 cells
        size = size.clamp(min=1.0)
    ys = _axis_samples(b[..., 1], size[..., 1], output_size, sampling_ratio)  # (B, N, S) cell coordinates
    xs = _axis_samples(b[..., 0], size[..., 0], output_size, sampling_ratio)
    inside = ((ys >= -1) & (ys <= H))[..., :, None] & ((xs >= -1) & (xs <= W))[..., None, :]  # (B, N, S, S)
    # cell coordinate c -> grid_sample's normalised (2 c + 1) / size - 1 (align_corners=False)
    gx = ((2 * xs + 1) / W - 1)[..., None, :].expand(B, N, S, S)
    gy = ((2 * ys + 1) / H - 1)[..., :, None].expand(B, N, S, S)
    grid = torch.stack([gx, gy], -1).reshape(B, N * S, S, 2)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, C, N S, S)
    v = v.view(B, C, N * S, S) * inside.view(B, 1, N * S, S).to(v.dtype)
    v = F.avg_pool2d(v, sampling_ratio)  # the mean of the sampling_ratio^2 samples of each bin
    return v.view(B, C, N, output_size, output_size).transpose(1, 2)


def roi_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4) -> Tensor:
    """The FPN level index (0 = k_min) of xyxy boxes (..., 4), ``torchvision.ops.poolers.LevelMapper``
    (Lin et al., FPN, eq. 1): floor(k0 + log2(sqrt(area) / s0 + 1e-6)) clamped to [k_min, k_max]."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    k = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale + 1e-6))
    return (k.clamp(min=k_min, max=k_max) - k_min).long()


def multi_scale_roi_align(
    features: Sequence[Tensor],
    strides: Sequence[int],
    boxes: Tensor,
    output_size: int = 7,
    sampling_ratio: int = 2,
) -> Tensor:
    """FPN RoIAlign: ``features`` [P_k ...] (B, C, H_k, W_k) of strides 2^k (finest first), boxes
    (B, N, 4) xyxy pixels -> (B, N, C, output_size, output_size).

    As ``torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)`` (aligned=False),
    whose level scales are inferred from the map sizes (2^round(log2(map / image))): here they are
    the given strides, which is the same for maps of an image padded to a multiple of the largest
    stride. Each level pools its regions with one :func:`roi_align` (rows padded to the image with the
    most regions on that level)."""
    k = [math.log2(s) for s in strides]
    if not all(v == int(v) for v in k) or list(k) != sorted(k):
        raise ValueError(f"multi_scale_roi_align: strides must be increasing powers of 2, got {list(strides)}")
    levels = roi_levels(boxes, int(k[0]), int(k[-1]))
    B, N, _ = boxes.shape
    out = features[0].new_zeros(B, N, features[0].shape[1], output_size, output_size)
    for lvl, (f, s) in enumerate(zip(features, strides, strict=True)):  # one call per level
        mine = levels == lvl
        n = int(mine.sum(1).max()) if N else 0
        if n == 0:
            continue
        # this level's regions first in every row (stable), the first n columns pooled
        order = torch.sort((~mine).to(torch.uint8), dim=1, stable=True).indices[:, :n]
        v = roi_align(f, boxes.gather(1, order[..., None].expand(B, n, 4)), output_size, 1.0 / s, sampling_ratio)
        keep = mine.gather(1, order)
        b_idx = torch.arange(B, device=boxes.device)[:, None].expand(B, n)
        out = out.index_put((b_idx[keep], order[keep]), v[keep])
    return out
