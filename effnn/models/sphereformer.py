"""SphereFormer's LiDAR segmentation network (Lai et al., "Spherical Transformer for LiDAR-based 3D
Recognition", CVPR 2023): a sparse-convolution voxel U-Net with one SphereFormer block (radial +
cubic window attention) after the encoder blocks of every level, built from
:mod:`effnn.nn.sparse_conv` and :class:`effnn.SphereFormerAttention`.

The structure and the state-dict keys are those of the official
``model/unet_spherical_transformer.py`` (``Semantic``, ``UBlock``, ``ResidualBlock``) and
``model/spherical_transformer.py`` (``SphereFormer``, ``Mlp``) of dvlab-research/SphereFormer, and
the convolution weights use spconv 2.x's layout, so an official checkpoint's ``state_dict`` has
the same keys and shapes (one level, ``unet.`` + ``u.`` * (level - 1)):

- ``input_conv.0``: SubMConv3d(in_channels, 32, 3) without bias.
- ``blocks.block{0,1}``: residual blocks: ``conv_branch`` = BatchNorm1d (eps 1e-4) - ReLU -
  SubMConv3d(3) - BatchNorm1d - ReLU - SubMConv3d(3) (keys ``.0 .2 .3 .5``), plus the input
  (``i_branch.0``: SubMConv3d(1) when the channels change).
- ``transformer_block``: ``norm1`` (LayerNorm), ``attn`` (:class:`effnn.SphereFormerAttention`:
  ``qkv``, ``proj``, the cubic and radial position tables), ``norm2``, ``mlp.fc1``/``mlp.fc2``
  (ratio 4, GELU); pre-norm residuals with stochastic depth; head_dim 16.
- ``conv``: BatchNorm1d - ReLU - SparseConv3d(2, stride 2) (``conv.0``, ``conv.2``); ``u``: the
  next level; ``deconv``: BatchNorm1d - ReLU - SparseInverseConv3d(2) (``deconv.0``,
  ``deconv.2``); ``blocks_tail.block{0,1}``: residual blocks on the concatenated skip (2C -> C,
  then C -> C).
- ``output_layer.0``: BatchNorm1d, then ReLU; ``linear``: Linear(32, num_classes).

Windows per level l = 0..4: cubic ``window_size * window_size_scale[0] ** l`` (the official
``window_size`` of 6 voxels: 0.3 m on SemanticKITTI, 0.6 m on nuScenes), radial
``(azimuth, polar) * window_size_scale[1] ** l`` by the fixed range extent; position bins
window / 24. The voxel xyz of a coarser level is the mean xyz of the finer voxels merged into it
(the official ``get_downsample_info``).

Defaults are the official SemanticKITTI configuration (``config/semantic_kitti/
semantic_kitti_unet32_spherical_transformer.yaml``): channels 32, 64, 128, 256, 256, 2 blocks per
level, cubic 0.3 m (0.05 m voxels) x 2 per level, radial (2 deg, 2 deg, 80 m) x 1.5 per level,
a = 0.0125 m. With its 4 input channels and 19 classes the model has **32,311,715 parameters**,
the number of the official log (SphereFormer issue #48). nuScenes: ``window_size=0.6,
window_size_sphere=(2, 2, 120), window_size_scale=(2, 2)``, 16 classes: 32,311,616.

``windows="cubic"`` is the paper's baseline: every head attends in cubic windows
(:class:`CubicWindowAttention`); the rest of the network is unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor, nn

from effnn.models.biformer import drop_path
from effnn.nn.radial_window import CubicWindowAttention, SphereFormerAttention, _triple
from effnn.nn.sparse_conv import (
    SparseConv3d,
    SparseConvTensor,
    SparseInverseConv3d,
    SparseModule,
    SparseSequential,
    SubMConv3d,
)

__all__ = [
    "ResidualBlock",
    "SphereFormerBlock",
    "SphereFormerUNet",
    "UBlock",
    "Voxels",
    "sphereformer_unet",
    "voxelize",
]

WINDOWS = ("radial+cubic", "cubic")


def _norm(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-4, momentum=0.1)  # the official norm_fn


class ResidualBlock(SparseModule):
    """Pre-activation residual block (official ``ResidualBlock``): BN - ReLU - SubMConv3d(3) -
    BN - ReLU - SubMConv3d(3), plus the input (through SubMConv3d(1) when the channels change)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.i_branch = SparseSequential(
            nn.Identity() if in_channels == out_channels
            else SubMConv3d(in_channels, out_channels, 1, bias=False))
        self.conv_branch = SparseSequential(
            _norm(in_channels), nn.ReLU(), SubMConv3d(in_channels, out_channels, 3, bias=False),
            _norm(out_channels), nn.ReLU(), SubMConv3d(out_channels, out_channels, 3, bias=False))

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        out = self.conv_branch(x)
        return out.replace_feature(out.features + self.i_branch(x).features)


class Mlp(nn.Module):
    """Linear - GELU - Linear (official ``Mlp``, keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SphereFormerBlock(nn.Module):
    """Pre-norm transformer block on voxel features (official ``SphereFormer``):
    x + DropPath(attn(LN(x))), then + DropPath(MLP(LN(.))), MLP ratio 4."""

    def __init__(self, dim: int, num_heads: int, window_size, window_size_sphere, windows: str,
                 a: float, origin: str, drop_path: float, mlp_ratio: float, backend: str) -> None:
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        if windows == "radial+cubic":
            self.attn = SphereFormerAttention(dim, num_heads, window_size, window_size_sphere, a=a,
                                              origin=origin, backend=backend)
        else:
            self.attn = CubicWindowAttention(dim, num_heads, window_size, origin=origin, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, xyz: Tensor, batch: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x), xyz, batch), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


def _downsample_xyz(xyz: Tensor, down: SparseConvTensor, key: str) -> Tensor:
    """Mean xyz of the finer voxels paired with each coarser voxel by the strided convolution
    (official ``get_downsample_info``: scatter_mean over the kernel map's pairs)."""
    kmap = down.indice_dict[key]
    n = down.indices.shape[0]
    total = xyz.new_zeros(n, 3).index_add_(0, kmap.out_rows, xyz.index_select(0, kmap.in_rows))
    count = xyz.new_zeros(n).index_add_(0, kmap.out_rows, xyz.new_ones(kmap.out_rows.shape[0]))
    return total / count[:, None]


class UBlock(nn.Module):
    """One U-Net level and, recursively, the levels below it (official ``UBlock``)."""

    def __init__(self, channels: tuple[int, ...], level: int, block_reps: int, head_dim: int,
                 window_size: tuple[float, float, float], window_size_sphere: tuple[float, float, float],
                 window_size_scale: tuple[float, float], windows: str, a: float, origin: str,
                 drop_path: list[float], mlp_ratio: float, backend: str) -> None:
        super().__init__()
        C = channels[0]
        self.level, self.key = level, f"spconv{level}"
        self.blocks = SparseSequential(OrderedDict(
            (f"block{i}", ResidualBlock(C, C)) for i in range(block_reps)))
        self.transformer_block = SphereFormerBlock(
            C, C // head_dim, window_size, window_size_sphere, windows, a, origin, drop_path[0],
            mlp_ratio, backend)
        if len(channels) > 1:
            D = channels[1]
            self.conv = SparseSequential(_norm(C), nn.ReLU(), SparseConv3d(
                C, D, 2, stride=2, bias=False, indice_key=self.key))
            s_cubic, s_sphere = window_size_scale
            self.u = UBlock(
                channels[1:], level + 1, block_reps, head_dim,
                tuple(w * s_cubic for w in window_size),
                (window_size_sphere[0] * s_sphere, window_size_sphere[1] * s_sphere, window_size_sphere[2]),
                window_size_scale, windows, a, origin, drop_path[1:], mlp_ratio, backend)
            self.deconv = SparseSequential(_norm(D), nn.ReLU(), SparseInverseConv3d(
                D, C, 2, indice_key=self.key, bias=False))
            self.blocks_tail = SparseSequential(OrderedDict(
                (f"block{i}", ResidualBlock(C * (2 if i == 0 else 1), C)) for i in range(block_reps)))

    def forward(self, x: SparseConvTensor, xyz: Tensor) -> SparseConvTensor:
        out = self.blocks(x)
        out = out.replace_feature(self.transformer_block(out.features, xyz, out.indices[:, 0]))
        if not hasattr(self, "u"):
            return out
        down = self.conv(out)
        down = self.u(down, _downsample_xyz(xyz, down, self.key))
        up = self.deconv(down)  # back on out's sites, in out's order
        return self.blocks_tail(out.replace_feature(torch.cat([out.features, up.features], 1)))


class SphereFormerUNet(nn.Module):
    r"""SphereFormer's semantic segmentation network (official ``Semantic``; Lai et al., CVPR
    2023): a sparse voxel U-Net (:mod:`effnn.nn.sparse_conv`) with one SphereFormer block after the
    encoder blocks of every level. See the module docstring for the layout and state-dict keys.

    Args:
        in_channels: input features per voxel (official: 4, xyz + intensity).
        num_classes: output classes (SemanticKITTI 19, nuScenes 16).
        channels: channels per level (official: 32, 64, 128, 256, 256).
        block_reps: residual blocks per level, in the encoder and in the decoder (official: 2).
        head_dim: channels per attention head (official: 16); level l has channels[l] // head_dim
            heads, at least 2 for ``windows="radial+cubic"`` (half cubic, half radial).
        window_size: cubic window edge at level 0, in the units of xyz (official: 6 voxels).
        window_size_sphere: radial window (azimuth deg, polar deg, range) at level 0.
        window_size_scale: (cubic, radial-angle) growth per level (KITTI: 2, 1.5; nuScenes: 2, 2).
        windows: "radial+cubic" (SphereFormer) or "cubic" (every head in cubic windows: the
            paper's baseline; nothing else changes).
        a: first range bin of the exponential split (official 0.0125 m).
        origin: window origin, "fixed" (default; a cloud's output does not depend on the rest of
            the batch) or "batch_min" (the official batch minimum, for parity with checkpoints).
        drop_path_rate: stochastic depth; level l uses linspace(0, rate, 7)[l] as the official
            code (the official training uses 0.3).
        mlp_ratio: hidden width of the blocks' MLP (official 4).
        backend: attention backend ("auto" | "ref" | "ext").

    Shape: ``forward(features, indices, xyz)``: ``features`` (V, in_channels) and ``indices``
    (V, 4) (batch, x, y, z; >= 0, distinct) of the voxels, ``xyz`` (V, 3) their sensor-centred
    coordinates in metres (the mean of their points; :func:`voxelize` gives all three)
    -> logits (V, num_classes).

    Example::

        >>> model = sphereformer_unet(4, 19)  # SemanticKITTI: 32,311,715 parameters
        >>> points, intensity = torch.randn(5000, 3) * 20, torch.rand(5000, 1)
        >>> vox = voxelize(points, 0.05, features=torch.cat([points, intensity], 1))
        >>> logits = model(vox.features, vox.indices, vox.xyz)  # (V, 19) per voxel
        >>> logits[vox.point_to_voxel].shape  # per point
        torch.Size([5000, 19])
    """

    def __init__(
        self, in_channels: int, num_classes: int, channels=(32, 64, 128, 256, 256),
        block_reps: int = 2, head_dim: int = 16, window_size=0.3,
        window_size_sphere=(2.0, 2.0, 80.0), window_size_scale=(2.0, 1.5),
        windows: str = "radial+cubic", a: float = 0.0125, origin: str = "fixed",
        drop_path_rate: float = 0.0, mlp_ratio: float = 4.0, backend: str = "auto",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        channels = tuple(channels)
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("block_reps", block_reps), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
        if windows not in WINDOWS:
            raise ValueError(f"{owner}: windows must be one of {WINDOWS}, got {windows!r}")
        min_heads = 2 if windows == "radial+cubic" else 1
        if (not channels or len(channels) > 7
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels)):
            raise ValueError(f"{owner}: channels must be 1 to 7 positive ints (7 drop-path rates, as the official code), got {channels!r}")
        if any(c % head_dim or c // head_dim < min_heads for c in channels):
            raise ValueError(f"{owner}: every level's channels must be a multiple of head_dim={head_dim} "
                             f"giving >= {min_heads} heads for windows={windows!r}, got {channels}")
        if len(tuple(window_size_scale)) != 2:
            raise ValueError(f"{owner}: window_size_scale must be (cubic, radial), got {window_size_scale!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{owner}: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.in_channels, self.num_classes, self.channels, self.windows = in_channels, num_classes, channels, windows
        dpr = [drop_path_rate * i / 6 for i in range(7)]  # linspace(0, rate, 7) as the official code
        m = channels[0]
        self.input_conv = SparseSequential(SubMConv3d(in_channels, m, 3, bias=False))
        self.unet = UBlock(
            channels, 1, block_reps, head_dim, _triple("window_size", window_size, owner),
            _triple("window_size_sphere", window_size_sphere, owner),
            tuple(float(s) for s in window_size_scale), windows, a, origin, dpr, mlp_ratio, backend)
        self.output_layer = SparseSequential(_norm(m), nn.ReLU())
        self.linear = nn.Linear(m, num_classes)

    def forward(self, features: Tensor, indices: Tensor, xyz: Tensor) -> Tensor:
        owner = type(self).__name__
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != self.in_channels:
            raise ValueError(f"{owner}: features must have shape (V, {self.in_channels}), got "
                             f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        if not isinstance(xyz, Tensor) or tuple(xyz.shape) != (features.shape[0], 3):
            raise ValueError(f"{owner}: xyz must have shape ({features.shape[0]}, 3), got "
                             f"{tuple(xyz.shape) if isinstance(xyz, Tensor) else type(xyz).__name__}")
        x = self.input_conv(SparseConvTensor(features, indices))
        x = self.output_layer(self.unet(x, xyz))
        return self.linear(x.features)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"channels={self.channels}, windows={self.windows!r}")


def sphereformer_unet(in_channels: int = 4, num_classes: int = 19, channels=(32, 64, 128, 256, 256),
                      **kwargs) -> SphereFormerUNet:
    """:class:`SphereFormerUNet`, by default the official SemanticKITTI configuration (4 input
    channels, 19 classes: 32,311,715 parameters); keyword arguments as the class."""
    return SphereFormerUNet(in_channels, num_classes, channels, **kwargs)


class Voxels(NamedTuple):
    """Points grouped into voxels: ``indices`` (V, 4) int64 (batch, x, y, z; each cloud's grid
    starts at its own minimum corner, so >= 0), ``xyz`` (V, 3) and ``features`` (V, C) the means
    of the voxel's points, ``point_to_voxel`` (P,) the voxel of each point (``logits[point_to_voxel]``
    maps voxel outputs back to the points). Voxels are sorted by batch, then x, y, z."""

    indices: Tensor
    xyz: Tensor
    features: Tensor
    point_to_voxel: Tensor


def voxelize(points: Tensor, voxel_size: float, batch: Tensor | None = None,
             features: Tensor | None = None) -> Voxels:
    """Group ``points`` (P, 3) (sensor-centred, metres) of the clouds ``batch`` (P,) into cubes of
    ``voxel_size``: voxel = floor((point - min over its cloud) / voxel_size), as the official
    ``data_prepare``; xyz and ``features`` (P, C; default the xyz) averaged per voxel (the official
    evaluation; its training keeps one random point per voxel instead)."""
    fn = "voxelize"
    if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] != 3 or not points.is_floating_point():
        raise ValueError(f"{fn}: points must be a floating-point (P, 3) tensor, got "
                         f"{tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__}")
    if not (isinstance(voxel_size, (int, float)) and voxel_size > 0):
        raise ValueError(f"{fn}: voxel_size must be a positive number, got {voxel_size!r}")
    P = points.shape[0]
    if P and not bool(torch.isfinite(points).all()):
        raise ValueError(f"{fn}: points contain NaN or inf")
    batch = torch.zeros(P, dtype=torch.long, device=points.device) if batch is None else batch.long()
    if tuple(batch.shape) != (P,) or (P and int(batch.min()) < 0):
        raise ValueError(f"{fn}: batch must be (P,) = ({P},) cloud indices >= 0, got shape {tuple(batch.shape)}")
    features = points if features is None else features
    if features.dim() != 2 or features.shape[0] != P:
        raise ValueError(f"{fn}: features must have shape ({P}, C), got {tuple(features.shape)}")
    if P == 0:
        empty = points.new_zeros(0, 3)
        return Voxels(batch.new_zeros(0, 4), empty, features.new_zeros(0, features.shape[1]), batch.new_zeros(0))
    n_batch = int(batch.max()) + 1
    lo = points.new_full((n_batch, 3), float("inf")).scatter_reduce(
        0, batch[:, None].expand(-1, 3), points, "amin")
    cells = torch.floor((points - lo[batch]) / voxel_size).long()
    extent = (cells.amax(0) + 1).tolist()
    key = ((batch * extent[0] + cells[:, 0]) * extent[1] + cells[:, 1]) * extent[2] + cells[:, 2]
    _, inverse, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    V = counts.shape[0]
    indices = torch.cat([batch[:, None], cells], 1).new_zeros(V, 4).index_copy_(
        0, inverse, torch.cat([batch[:, None], cells], 1))
    inv_count = 1.0 / counts.to(points.dtype)
    xyz = points.new_zeros(V, 3).index_add_(0, inverse, points) * inv_count[:, None]
    feats = features.new_zeros(V, features.shape[1]).index_add_(0, inverse, features)
    feats = feats * inv_count.to(features.dtype)[:, None]
    return Voxels(indices, xyz, feats, inverse)
