"""Sparse 3-D convolution on voxel sets in plain PyTorch: ``SubMConv3d``, ``SparseConv3d`` and
``SparseInverseConv3d`` with spconv's semantics, module names and weight layout, for voxel U-Nets
such as SphereFormer's (Lai et al., CVPR 2023) on any device, without spconv.

A sparse tensor (:class:`SparseConvTensor`) is a set of occupied voxels: ``indices`` (N, 4)
integer (batch, x, y, z), all >= 0 and distinct, and ``features`` (N, C). For kernel offsets
``k`` of a ``kernel_size`` cube (flattened x-major, then y, then z, as spconv), stride ``s`` and
padding ``p``, an input site ``i`` and an output site ``o`` are paired by offset ``k`` when

    i = s * o - p + k                                                         (per axis)

which is ``torch.nn.functional.conv3d``'s cross-correlation; then ``out[o] = bias + sum over the
pairs (i, o, k) of W[k] @ in[i]``:

- :class:`SubMConv3d` (submanifold, odd kernel, s = 1, p = kernel_size // 2): the output sites are
  the input sites, i.e. a dense convolution evaluated at the occupied sites with zeros elsewhere.
- :class:`SparseConv3d`: the output sites are every cell ``o >= 0`` that some input site reaches
  (for kernel_size == stride: the downsampled occupied cells ``indices // stride``), i.e. a dense
  strided convolution at those cells. A sparse tensor has no spatial bounds, so unlike spconv the
  outputs are not clipped to a spatial shape on the high side.
- :class:`SparseInverseConv3d`: the transpose of an earlier ``SparseConv3d`` (found by
  ``indice_key``), back onto that convolution's input sites with its kernel map: a dense
  transposed convolution evaluated at those sites.

Kernel maps (the (input row, output row) pairs of each offset) are built without Python loops over
points: voxel keys (batch, x, y, z) packed into int64, one sort, and ``searchsorted`` of the
neighbours' keys for all offsets at once (submanifold), or ``torch.unique`` of the output cells
(strided). They are cached in ``SparseConvTensor.indice_dict``, which tensors on the same sites
share (``replace_feature``), as spconv caches them by ``indice_key``. The convolution loops over
the k^3 offsets: gather the paired input rows, one matmul with that offset's weight, ``index_add_``
into the output rows (spconv's "native" algorithm); the centre offset of a submanifold convolution
pairs every site with itself and is a plain matmul. Autograd differentiates it as it stands.

Weights use spconv 2.x's layout (``KRSC``: (out_channels, kx, ky, kz, in_channels)) and names
(``weight``, ``bias``), so spconv state dicts load as they are; ``weight.permute(0, 4, 1, 2, 3)``
is the ``conv3d`` weight and ``weight.permute(4, 0, 1, 2, 3)`` the ``conv_transpose3d`` weight.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import MutableMapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "SparseConvTensor",
    "SparseModule",
    "SparseSequential",
    "SubMConv3d",
    "SparseConv3d",
    "SparseInverseConv3d",
]

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class KernelMapCache(MutableMapping):
    """The kernel maps of one set of sites, by key (spconv's ``indice_dict``). A mapping but
    deliberately not a dict: hooks that walk a module's outputs for tensors (FSDP2) descend into
    dicts, and the maps refer back to caches (an inverse convolution restores its input's), which
    would make a cycle. Wraps ``maps`` without copying it."""

    __slots__ = ("_maps",)

    def __init__(self, maps: dict | None = None) -> None:
        self._maps = {} if maps is None else maps

    def __getitem__(self, key):
        return self._maps[key]

    def __setitem__(self, key, value) -> None:
        self._maps[key] = value

    def __delitem__(self, key) -> None:
        del self._maps[key]

    def __iter__(self):
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


# A dataclass, so that hooks that look for tensors in a module's outputs find the features: FSDP2
# re-gathers a sharded module's parameters before its backward only through hooks on its output
# tensors, found by walking tuples, dicts, NamedTuples and dataclasses.
@dataclasses.dataclass(eq=False, repr=False)
class SparseConvTensor:
    """Occupied voxels: ``features`` (N, C) and ``indices`` (N, 4) integer (batch, x, y, z), all
    >= 0, each site once. ``indice_dict`` caches the kernel maps of these sites (and, under an
    ``indice_key``, the map of the strided convolution that produced them); tensors made with
    :meth:`replace_feature` share it. ``batch_size``: None means max batch index + 1."""

    features: Tensor
    indices: Tensor
    batch_size: int | None = None
    indice_dict: KernelMapCache = dataclasses.field(default_factory=KernelMapCache)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        features, indices = self.features, self.indices
        if not isinstance(features, Tensor) or not isinstance(indices, Tensor):
            raise TypeError(f"{owner}: features and indices must be Tensors, got "
                            f"{type(features).__name__} and {type(indices).__name__}")
        if features.dim() != 2:
            raise ValueError(f"{owner}: features must be 2-D (N, C), got shape {tuple(features.shape)}")
        if indices.dim() != 2 or indices.shape[1] != 4 or indices.shape[0] != features.shape[0]:
            raise ValueError(f"{owner}: indices must have shape ({features.shape[0]}, 4) "
                             f"(batch, x, y, z per site), got {tuple(indices.shape)}")
        if indices.dtype not in _INT_DTYPES:
            raise TypeError(f"{owner}: indices must be an integer tensor, got {indices.dtype}")
        if indices.device != features.device:
            raise ValueError(f"{owner}: indices are on {indices.device} but features on "
                             f"{features.device}; use one device")
        if not isinstance(self.indice_dict, KernelMapCache):
            self.indice_dict = KernelMapCache(self.indice_dict)

    def replace_feature(self, features: Tensor) -> SparseConvTensor:
        """The same sites (and kernel-map cache) with new ``features`` (N, C')."""
        return SparseConvTensor(features, self.indices, self.batch_size, self.indice_dict)

    def dense(self, spatial_shape) -> Tensor:
        """(batch_size, C, X, Y, Z) with zeros at the empty cells (for tests and small grids)."""
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = int(self.indices[:, 0].max()) + 1 if self.indices.shape[0] else 0
        out = self.features.new_zeros(batch_size, *spatial_shape, self.features.shape[1])
        b, x, y, z = self.indices.long().unbind(1)
        out[b, x, y, z] = self.features
        return out.permute(0, 4, 1, 2, 3)

    def __repr__(self) -> str:
        return (f"SparseConvTensor(sites={self.indices.shape[0]}, channels={self.features.shape[1]}, "
                f"dtype={self.features.dtype}, device={self.features.device})")


class KernelMap(NamedTuple):
    """Pairs of a convolution, grouped by kernel offset: ``in_rows[j]`` of the input feeds
    ``out_rows[j]`` of the output through offset ``k`` for the ``counts[k]`` pairs of offset k
    (the submanifold centre offset is left out: it pairs every site with itself).
    ``in_indices`` / ``in_dict`` are the input sites and their cache (where an inverse
    convolution goes back to); ``out_indices`` the output sites."""

    in_rows: Tensor
    out_rows: Tensor
    counts: list[int]
    in_indices: Tensor
    in_dict: KernelMapCache
    out_indices: Tensor
    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]


def _offsets(kernel_size: tuple[int, int, int], device) -> Tensor:
    """(K, 3) kernel offsets, x-major then y then z (spconv's and conv3d's weight order)."""
    axes = [torch.arange(k, device=device) for k in kernel_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _pack(batch: Tensor, cells: Tensor, extent: list[int]) -> Tensor:
    """int64 key of (batch, x, y, z) with 0 <= cells < extent: batch-major, then x, y, z."""
    return ((batch * extent[0] + cells[..., 0]) * extent[1] + cells[..., 1]) * extent[2] + cells[..., 2]


def _extent(owner: str, cells_max: Tensor, n_batch: int) -> list[int]:
    extent = (cells_max + 1).tolist()
    if n_batch * math.prod(extent) >= 2**62:
        raise ValueError(f"{owner}: {n_batch} clouds x {extent} voxels per axis do not fit a 64-bit "
                         "voxel key; the indices span far more voxels than a sparse tensor should")
    return extent


def _check_indices(owner: str, x: SparseConvTensor) -> Tensor:
    idx = x.indices.long()
    if idx.shape[0] and int(idx.min()) < 0:
        raise ValueError(f"{owner}: indices must be >= 0 (batch, x, y, z), got minimum {int(idx.min())}")
    return idx


def _submanifold_map(owner: str, x: SparseConvTensor, kernel_size: tuple[int, int, int]) -> KernelMap:
    idx = _check_indices(owner, x)
    N, dev = idx.shape[0], idx.device
    center = torch.tensor([k // 2 for k in kernel_size], device=dev)
    offsets = _offsets(kernel_size, dev)
    # the centre (the middle of the x-major order, K // 2 for odd sizes) pairs each site with itself
    offsets = torch.cat([offsets[:offsets.shape[0] // 2], offsets[offsets.shape[0] // 2 + 1:]])
    empty = idx.new_empty(0)
    if N == 0 or offsets.shape[0] == 0:
        return KernelMap(empty, empty, [0] * offsets.shape[0], x.indices, x.indice_dict, x.indices,
                         kernel_size, (1, 1, 1), tuple(k // 2 for k in kernel_size))
    cells = idx[:, 1:]
    extent = _extent(owner, cells.amax(0), int(idx[:, 0].max()) + 1)
    keys, order = torch.sort(_pack(idx[:, 0], cells, extent))
    if bool((keys[1:] == keys[:-1]).any()):
        raise ValueError(f"{owner}: indices hold the same site more than once; a sparse tensor needs "
                         "distinct (batch, x, y, z) (average duplicates first, e.g. with voxelize)")
    # the input site of output site o through offset k is o + k - centre (conv3d correlation)
    nbr = cells[None] + (offsets - center)[:, None]  # (K, N, 3)
    inside = ((nbr >= 0) & (nbr < torch.tensor(extent, device=dev))).all(-1)
    nkeys = _pack(idx[:, 0], nbr.clamp(min=0), extent)
    pos = torch.searchsorted(keys, nkeys).clamp_(max=N - 1)
    found = inside & (keys[pos] == nkeys)
    in_rows = order[pos[found]]
    out_rows = torch.arange(N, device=dev).expand_as(found)[found]
    return KernelMap(in_rows, out_rows, found.sum(1).tolist(), x.indices, x.indice_dict, x.indices,
                     kernel_size, (1, 1, 1), tuple(k // 2 for k in kernel_size))


def _strided_map(owner: str, x: SparseConvTensor, kernel_size, stride, padding) -> KernelMap:
    idx = _check_indices(owner, x)
    dev = idx.device
    K = math.prod(kernel_size)
    if idx.shape[0] == 0:
        empty = idx.new_empty(0)
        return KernelMap(empty, empty, [0] * K, x.indices, x.indice_dict, idx.new_empty(0, 4),
                         kernel_size, stride, padding)
    s = torch.tensor(stride, device=dev)
    # output o of input i through offset k: s * o = i + p - k, when divisible and o >= 0
    num = idx[None, :, 1:] + torch.tensor(padding, device=dev) - _offsets(kernel_size, dev)[:, None]
    valid = ((num >= 0) & (num % s == 0)).all(-1)  # (K, N)
    cells = num[valid] // s
    batch = idx[:, 0].expand_as(valid)[valid]
    extent = _extent(owner, cells.amax(0), int(idx[:, 0].max()) + 1)
    keys, out_rows = torch.unique(_pack(batch, cells, extent), sorted=True, return_inverse=True)
    # decode the sorted keys back to (batch, x, y, z)
    z = keys % extent[2]
    y = keys.div(extent[2], rounding_mode="floor") % extent[1]
    xk = keys.div(extent[2] * extent[1], rounding_mode="floor") % extent[0]
    b = keys.div(extent[2] * extent[1] * extent[0], rounding_mode="floor")
    out_indices = torch.stack([b, xk, y, z], 1).to(x.indices.dtype)
    in_rows = torch.arange(idx.shape[0], device=dev).expand_as(valid)[valid]
    return KernelMap(in_rows, out_rows, valid.sum(1).tolist(), x.indices, x.indice_dict, out_indices,
                     kernel_size, stride, padding)


def _segments(K: int, centre: int | None, counts: list[int]):
    """(offset, first pair, pairs) of the offsets that have pairs (the centre has none listed)."""
    start = 0
    for k, c in zip([k for k in range(K) if k != centre], counts, strict=True):
        if c:
            yield k, start, c
        start += c


class _SparseConvFunction(torch.autograd.Function):
    """out[scatter_j] += W[k_j] @ features[gather_j] over the pairs j (grouped by offset k), plus
    W[centre] @ features for a submanifold centre. One gather, one matmul per offset into one
    buffer, one scatter; the backward re-gathers instead of saving the M gathered rows (spconv
    does the same), so a convolution keeps only its input for the backward."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, gather: Tensor, scatter: Tensor,
                counts: list[int], n_out: int, centre: int | None) -> Tensor:
        C_out, C_in = weight.shape[0], weight.shape[-1]
        w = weight.reshape(C_out, -1, C_in)
        # half-precision products are summed over the offsets in float32
        acc = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
        if centre is None:
            out = features.new_zeros(n_out, C_out, dtype=acc)
        else:
            out = (features @ w[:, centre].T).to(acc)
        if gather.numel():
            xg = features.index_select(0, gather)
            y = features.new_empty(gather.shape[0], C_out)
            for k, a, c in _segments(w.shape[1], centre, counts):
                torch.mm(xg[a:a + c], w[:, k].T, out=y[a:a + c])
            out.index_add_(0, scatter, y.to(acc))
        ctx.save_for_backward(features, weight, gather, scatter)
        ctx.counts, ctx.centre = counts, centre
        return out.to(features.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        features, weight, gather, scatter = ctx.saved_tensors
        centre, counts = ctx.centre, ctx.counts
        C_out, C_in = weight.shape[0], weight.shape[-1]
        w = weight.reshape(C_out, -1, C_in)
        grad_out = grad_out.to(features.dtype).contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        if need_x:
            grad_x = features.new_zeros(features.shape) if centre is None else grad_out @ w[:, centre]
        if need_w:
            gw = features.new_zeros(w.shape[1], C_out, C_in)
            if centre is not None:
                torch.mm(grad_out.T, features, out=gw[centre])
        if gather.numel():
            gy = grad_out.index_select(0, scatter)
            xg = features.index_select(0, gather) if need_w else None
            gxg = features.new_empty(gather.shape[0], C_in) if need_x else None
            for k, a, c in _segments(w.shape[1], centre, counts):
                if need_x:
                    torch.mm(gy[a:a + c], w[:, k], out=gxg[a:a + c])
                if need_w:
                    torch.mm(gy[a:a + c].T, xg[a:a + c], out=gw[k])
            if need_x:
                grad_x.index_add_(0, gather, gxg)
        if need_w:
            grad_w = gw.permute(1, 0, 2).reshape(weight.shape)
        return grad_x, grad_w, None, None, None, None, None


def _apply(features: Tensor, weight: Tensor, bias: Tensor | None, gather: Tensor, scatter: Tensor,
           counts: list[int], n_out: int, centre: int | None) -> Tensor:
    """sum over the pairs (gather_j -> scatter_j, offset k) of W[k] @ features[gather_j], + bias;
    ``centre``: the offset whose pairs are the identity (a plain matmul of all rows)."""
    if torch.is_autocast_enabled(features.device.type):
        dtype = torch.get_autocast_dtype(features.device.type)
        features, weight = features.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif weight.dtype != features.dtype:
        raise TypeError(f"sparse convolution: features have dtype {features.dtype} but the weight "
                        f"{weight.dtype}; use one dtype (or torch.autocast)")
    out = _SparseConvFunction.apply(features, weight, gather, scatter, counts, n_out, centre)
    return out if bias is None else out + bias


def _triple(owner: str, name: str, value, minimum: int) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * 3
    if (not isinstance(value, (tuple, list)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)):
        raise ValueError(f"{owner}: {name} must be an int >= {minimum} or 3 such ints, got {value!r}")
    return tuple(value)


class SparseModule(nn.Module):
    """Base of the modules that take and return a :class:`SparseConvTensor` (spconv's
    ``SparseModule``); :class:`SparseSequential` hands the others the features only."""


class SparseSequential(nn.Sequential):
    """``nn.Sequential`` over a :class:`SparseConvTensor`: sparse modules get the tensor, any other
    module (BatchNorm1d, ReLU, ...) the features (spconv's ``SparseSequential``; the same state-dict
    keys)."""

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        for module in self:
            x = module(x) if isinstance(module, SparseModule) else x.replace_feature(module(x.features))
        return x


class _SparseConv(SparseModule):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, bias: bool,
                 device=None, dtype=None) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _triple(owner, "kernel_size", kernel_size, 1)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        # as nn.Conv3d (and spconv): uniform with bound 1/sqrt(fan_in), fan_in = k^3 * in_channels
        bound = 1 / math.sqrt(math.prod(self.kernel_size) * self.in_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _check_input(self, x) -> None:
        owner = type(self).__name__
        if not isinstance(x, SparseConvTensor):
            raise TypeError(f"{owner}: input must be a SparseConvTensor, got {type(x).__name__}")
        if x.features.shape[1] != self.in_channels:
            raise ValueError(f"{owner}: input has {x.features.shape[1]} channels, expected "
                             f"in_channels={self.in_channels}")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
                f"{'' if self.bias is not None else ', bias=False'}")


class SubMConv3d(_SparseConv):
    r"""Submanifold sparse 3-D convolution (Graham et al., "3D Semantic Segmentation with
    Submanifold Sparse Convolutional Networks", CVPR 2018; spconv's ``SubMConv3d``): a dense
    ``conv3d`` with padding kernel_size // 2 evaluated only at the occupied sites, with zeros at
    the empty ones; the output sites are the input sites.

    Args:
        in_channels, out_channels: channels.
        kernel_size: odd int or 3 odd ints.
        bias: learn a bias (spconv's default True; SphereFormer's convolutions use False).

    Parameters: ``weight`` (out_channels, kx, ky, kz, in_channels) (spconv's layout), ``bias``
    (out_channels,). The kernel map is cached in the input's ``indice_dict``.

    Shape: :class:`SparseConvTensor` (N, in_channels) -> (N, out_channels) on the same sites.

    Example::

        >>> conv = SubMConv3d(4, 32, 3, bias=False)
        >>> idx = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 5, 5, 5]])
        >>> conv(SparseConvTensor(torch.randn(3, 4), idx)).features.shape
        torch.Size([3, 32])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias, device, dtype)
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"SubMConv3d: kernel_size must be odd (the output sites are the input "
                             f"sites, centred), got {self.kernel_size}")
        self.reset_parameters()

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        self._check_input(x)
        key = ("subm", self.kernel_size)
        kmap = x.indice_dict.get(key)
        if kmap is None:
            kmap = x.indice_dict[key] = _submanifold_map(type(self).__name__, x, self.kernel_size)
        centre = math.prod(self.kernel_size) // 2
        out = _apply(x.features, self.weight, self.bias, kmap.in_rows, kmap.out_rows, kmap.counts,
                     x.features.shape[0], centre)
        return x.replace_feature(out)


class SparseConv3d(_SparseConv):
    r"""Strided sparse 3-D convolution (spconv's ``SparseConv3d``): a dense ``conv3d`` with
    ``stride`` and ``padding`` evaluated at every output cell (>= 0) that some occupied input site
    reaches; with kernel_size == stride (SphereFormer's downsampling: 2, 2), the output sites are
    the occupied cells of the coarser grid, ``indices // stride``.

    Args:
        in_channels, out_channels, bias: as :class:`SubMConv3d`.
        kernel_size, stride: int or 3 ints (>= 1). padding: int or 3 ints (>= 0).
        indice_key: name under which the kernel map is stored in the output's ``indice_dict``, for
            a :class:`SparseInverseConv3d` with the same key (spconv's convention).

    Parameters: ``weight`` (out_channels, kx, ky, kz, in_channels), ``bias`` (out_channels,).

    Shape: :class:`SparseConvTensor` (N, in_channels) -> (M, out_channels) on the output sites
    (sorted by batch, then x, y, z).

    Example::

        >>> down = SparseConv3d(32, 64, kernel_size=2, stride=2, bias=False, indice_key="spconv1")
        >>> idx = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 4, 4, 4]])
        >>> down(SparseConvTensor(torch.randn(3, 32), idx)).indices.tolist()
        [[0, 0, 0, 0], [0, 2, 2, 2]]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, indice_key: str | None = None, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias, device, dtype)
        owner = type(self).__name__
        self.stride = _triple(owner, "stride", stride, 1)
        self.padding = _triple(owner, "padding", padding, 0)
        if any(p >= k for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(f"{owner}: padding must be < kernel_size per axis (a larger padding "
                             f"reaches no input), got padding={self.padding}, "
                             f"kernel_size={self.kernel_size}")
        self.indice_key = indice_key
        self.reset_parameters()

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        self._check_input(x)
        kmap = _strided_map(type(self).__name__, x, self.kernel_size, self.stride, self.padding)
        out = _apply(x.features, self.weight, self.bias, kmap.in_rows, kmap.out_rows, kmap.counts,
                     kmap.out_indices.shape[0], None)
        indice_dict = {} if self.indice_key is None else {self.indice_key: kmap}
        return SparseConvTensor(out, kmap.out_indices, x.batch_size, indice_dict)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", stride={self.stride}, padding={self.padding}"
                + (f", indice_key={self.indice_key!r}" if self.indice_key else ""))


class SparseInverseConv3d(_SparseConv):
    r"""Inverse of a strided sparse convolution (spconv's ``SparseInverseConv3d``): a dense
    ``conv_transpose3d`` with the forward convolution's stride and padding, evaluated at the
    forward convolution's input sites, through its kernel map (found under ``indice_key`` in the
    input's ``indice_dict``). The output shares the kernel-map cache of those sites, so the
    decoder reuses the encoder's submanifold maps.

    Args:
        in_channels, out_channels, bias: as :class:`SubMConv3d`.
        kernel_size: the forward convolution's kernel size.
        indice_key: the ``indice_key`` of the :class:`SparseConv3d` to invert.

    Parameters: ``weight`` (out_channels, kx, ky, kz, in_channels), ``bias`` (out_channels,).

    Shape: :class:`SparseConvTensor` (M, in_channels) on the forward convolution's output sites ->
    (N, out_channels) on its input sites (in their order).

    Example::

        >>> down = SparseConv3d(32, 64, 2, stride=2, indice_key="spconv1")
        >>> up = SparseInverseConv3d(64, 32, 2, indice_key="spconv1")
        >>> idx = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 4, 4, 4]])
        >>> up(down(SparseConvTensor(torch.randn(3, 32), idx))).indices.tolist()
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 4, 4, 4]]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, indice_key: str,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias, device, dtype)
        if not isinstance(indice_key, str):
            raise ValueError(f"SparseInverseConv3d: indice_key must name the SparseConv3d to invert, "
                             f"got {indice_key!r}")
        self.indice_key = indice_key
        self.reset_parameters()

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        owner = type(self).__name__
        self._check_input(x)
        kmap = x.indice_dict.get(self.indice_key)
        if kmap is None:
            raise ValueError(f"{owner}: no kernel map under indice_key={self.indice_key!r} in the "
                             f"input (found {sorted(map(str, x.indice_dict))}); the input must come "
                             "from a SparseConv3d with that indice_key (through modules that keep "
                             "its sites)")
        if kmap.kernel_size != self.kernel_size:
            raise ValueError(f"{owner}: kernel_size={self.kernel_size} differs from the forward "
                             f"convolution's {kmap.kernel_size} (indice_key={self.indice_key!r})")
        if x.indices.shape[0] != kmap.out_indices.shape[0]:
            raise ValueError(f"{owner}: input has {x.indices.shape[0]} sites, the forward "
                             f"convolution produced {kmap.out_indices.shape[0]}")
        out = _apply(x.features, self.weight, self.bias, kmap.out_rows, kmap.in_rows, kmap.counts,
                     kmap.in_indices.shape[0], None)
        return SparseConvTensor(out, kmap.in_indices, x.batch_size, kmap.in_dict)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", indice_key={self.indice_key!r}"
