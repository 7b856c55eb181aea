"""SphereFormer's radial-window attention (``RadialWindowAttention``), its official pairing with
cubic windows (``SphereFormerAttention``, the official ``SparseMultiheadSASphereConcat``), and
cubic windows on every head (``CubicWindowAttention``, the baseline)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from effnn.ops._dispatch import BACKENDS
from effnn.ops.radial_window import (
    ORIGINS,
    cart2sphere,
    quant_grid_length,
    window_attention,
)

# SphereFormer's quant_size_scale: 24 position bins per window along each axis
QUANT_SCALE = 24
REL_POS = ("exp_split", "linear", None)


def _triple(name: str, value, owner: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        out = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {name} must be a number or 3 numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(x) and x > 0 for x in out):
        raise ValueError(f"{owner}: {name} must be 3 positive finite numbers, got {value!r}")
    return out


def _check_heads(owner: str, dim: int, num_heads: int, min_heads: int = 1) -> None:
    for name, value in (("dim", dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    if num_heads < min_heads:
        raise ValueError(f"{owner}: num_heads must be >= {min_heads}, got {num_heads}")
    if dim % num_heads:
        raise ValueError(f"{owner}: dim={dim} is not divisible by num_heads={num_heads}")


def _tables(rows: int, heads: int, head_dim: int, factory) -> list[nn.Parameter]:
    return [nn.Parameter(torch.empty(rows, 3, heads, head_dim, **factory)) for _ in range(3)]


def _batch_index(owner: str, x: Tensor, xyz: Tensor, batch: Tensor | None,
                 offset: Tensor | None) -> Tensor:
    """Validate (x, xyz) and return the batch index (N,) from ``batch`` or ``offset``."""
    if not isinstance(x, Tensor) or not isinstance(xyz, Tensor):
        raise TypeError(f"{owner}: x and xyz must be Tensors")
    N = x.shape[0]
    if xyz.dim() != 2 or tuple(xyz.shape) != (N, 3):
        raise ValueError(f"{owner}: xyz must have shape ({N}, 3) (sensor-centred coordinates of the "
                         f"{N} points), got {tuple(xyz.shape)}")
    if not xyz.is_floating_point():
        raise TypeError(f"{owner}: xyz must be a floating-point tensor, got {xyz.dtype}")
    if batch is not None and offset is not None:
        raise ValueError(f"{owner}: give batch (N,) or offset (B,), not both")
    if offset is not None:
        if not isinstance(offset, Tensor) or offset.dim() != 1 or offset.is_floating_point():
            raise ValueError(f"{owner}: offset must be a 1-D integer tensor of cumulative cloud ends "
                             f"(B,), got {offset!r}")
        ends = offset.long()
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        if offset.numel() == 0 or int(ends[-1]) != N or bool((counts < 0).any()):
            raise ValueError(f"{owner}: offset must be non-decreasing cumulative cloud ends ending at "
                             f"N={N}, got {offset.tolist()}")
        return torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
    if batch is None:
        return torch.zeros(N, dtype=torch.long, device=x.device)
    return batch


class RadialWindowAttention(nn.Module):
    r"""Radial-window self-attention on LiDAR points (Lai et al., "Spherical Transformer for
    LiDAR-based 3D Recognition", CVPR 2023).

    Points are grouped into windows that are narrow in azimuth and polar angle and long in range
    (``window_size`` = (azimuth deg, polar deg, range m); SphereFormer uses (2, 2, 120) on
    nuScenes and (2, 2, 80) on SemanticKITTI), so sparse distant points attend to dense near ones
    along their beam direction. Within a window: softmax attention with the contextual relative
    position encoding of Stratified Transformer / sptr (learned query, key and value tables indexed
    by the quantised in-window offset; 24 bins per window along each angle; along range SphereFormer's
    exponential split, bins of ``a`` metres doubling every two bins). See
    :mod:`effnn.ops.radial_window` for the exact formulas.

    Args:
        dim: feature channels C. num_heads: heads (any head_dim = C / num_heads).
        window_size: (azimuth deg, polar deg, range) of a window.
        rel_pos: "exp_split" (SphereFormer), "linear" (range quantised like the angles) or None.
        quant_size: bin sizes of the position encoding (default window_size / 24).
        a: width of the first range bin of the exponential split (SphereFormer: 0.0125 m).
        origin: "fixed" (windows anchored at azimuth 0, polar 0, range 0; a cloud's windows do
            not depend on the rest of the batch) or "batch_min" (anchored at the batch minimum, as
            the official code).
        qkv_bias, qk_scale: as the official layer (scale default head_dim ** -0.5).
        proj_drop: dropout after the output projection.
        backend: "auto", "ref", "triton" (CUDA tensors) or "ext" (the compiled kernel of
            effnn._C); see :func:`effnn.ops.radial_window.choose_backend`.

    Parameters: ``qkv`` Linear(C, 3C), ``proj`` Linear(C, C) and, with ``rel_pos``,
    ``relative_pos_query_table``, ``relative_pos_key_table``, ``relative_pos_value_table`` of shape
    (2L, 3, num_heads, head_dim) for "exp_split", (2L-1, ...) for "linear".

    Shape: ``x`` (N, C), ``xyz`` (N, 3) sensor-centred, and ``batch`` (N,) cloud index or ``offset``
    (B,) cumulative cloud ends (Pointcept convention; neither: one cloud) -> (N, C).

    Example::

        >>> attn = RadialWindowAttention(32, 2, window_size=(2, 2, 120))
        >>> xyz = torch.randn(1000, 3) * 20
        >>> attn(torch.randn(1000, 32), xyz, offset=torch.tensor([600, 1000])).shape
        torch.Size([1000, 32])
    """

    def __init__(
        self, dim: int, num_heads: int, window_size=(2.0, 2.0, 120.0),
        rel_pos: str | None = "exp_split", quant_size=None, a: float = 0.0125,
        origin: str = "fixed", qkv_bias: bool = True, qk_scale: float | None = None,
        proj_drop: float = 0.0, device=None, dtype=None, backend: str = "auto",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_heads(owner, dim, num_heads)
        if rel_pos not in REL_POS:
            raise ValueError(f"{owner}: rel_pos must be one of {REL_POS}, got {rel_pos!r}")
        if origin not in ORIGINS:
            raise ValueError(f"{owner}: origin must be one of {ORIGINS}, got {origin!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
        if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
            raise ValueError(f"{owner}: a must be a positive number, got {a!r}")
        self.dim, self.num_heads, self.rel_pos, self.origin, self.backend = dim, num_heads, rel_pos, origin, backend
        self.window_size = _triple("window_size", window_size, owner)
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.a = float(a)
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos is None:
            self.quant_size = None
            self.register_parameter("relative_pos_query_table", None)
            self.register_parameter("relative_pos_key_table", None)
            self.register_parameter("relative_pos_value_table", None)
        else:
            self.quant_size = (tuple(w / QUANT_SCALE for w in self.window_size) if quant_size is None
                               else _triple("quant_size", quant_size, owner))
            L = quant_grid_length(self.window_size[0], self.quant_size[0])
            axes = 2 if rel_pos == "exp_split" else 3
            lengths = [quant_grid_length(w, q) for w, q in zip(self.window_size, self.quant_size, strict=True)][:axes]
            if L < 1 or any(x != L for x in lengths):
                raise ValueError(f"{owner}: window_size / quant_size must give the same number of "
                                 f"bins >= 1 on the quantised axes, got {lengths}")
            rows = 2 * L if rel_pos == "exp_split" else 2 * L - 1
            (self.relative_pos_query_table, self.relative_pos_key_table,
             self.relative_pos_value_table) = _tables(rows, num_heads, head_dim, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        self.proj.reset_parameters()
        for t in (self.relative_pos_query_table, self.relative_pos_key_table, self.relative_pos_value_table):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)  # as the official layer (timm trunc_normal_)

    def forward(self, x: Tensor, xyz: Tensor, batch: Tensor | None = None,
                offset: Tensor | None = None) -> Tensor:
        owner = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{owner}: x must have shape (N, {self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        batch = _batch_index(owner, x, xyz, batch, offset)
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, C // self.num_heads).unbind(1)
        coords = cart2sphere(xyz if xyz.dtype in (torch.float32, torch.float64) else xyz.float())
        out = window_attention(
            q, k, v, coords, batch, self.window_size, table_q=self.relative_pos_query_table,
            table_k=self.relative_pos_key_table, table_v=self.relative_pos_value_table,
            quant_size=self.quant_size, exp_split_a=self.a if self.rel_pos == "exp_split" else None,
            origin=self.origin, scale=self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out.reshape(N, C).to(x.dtype)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"rel_pos={self.rel_pos!r}, a={self.a}, origin={self.origin!r}")


class SphereFormerAttention(nn.Module):
    r"""SphereFormer's attention layer (official ``SparseMultiheadSASphereConcat``, Lai et al.,
    CVPR 2023): the first ``num_heads // 2`` heads attend within cubic windows on xyz, the others
    within radial windows on (azimuth, polar, range); both with contextual relative position
    encoding (exponential split along range in the radial branch); the heads' outputs are
    concatenated and go through one output projection.

    Parameter names and shapes are the official ones, so official SphereFormer checkpoints load
    with ``load_state_dict`` (prefix ``...attn.``): ``qkv``, ``proj``,
    ``relative_pos_{query,key,value}_table`` (2L-1, 3, num_heads // 2, head_dim) and
    ``relative_pos_{query,key,value}_table_sphere`` (2L, 3, num_heads - num_heads // 2, head_dim).

    Args:
        dim, num_heads: channels and heads (num_heads >= 2; SphereFormer uses head_dim 16).
        window_size: cubic window edge in the units of xyz (number or 3 numbers; SphereFormer:
            6 voxels, e.g. 0.3 m on SemanticKITTI).
        window_size_sphere: radial window (azimuth deg, polar deg, range).
        quant_size, quant_size_sphere: position-encoding bins (default window / 24).
        a: first range bin of the exponential split. origin, qkv_bias, qk_scale, proj_drop,
        backend: as :class:`RadialWindowAttention`.

    Shape: ``x`` (N, C), ``xyz`` (N, 3) sensor-centred, ``batch`` (N,) or ``offset`` (B,) -> (N, C).

    Example::

        >>> attn = SphereFormerAttention(32, 2, window_size=0.3, window_size_sphere=(2, 2, 80))
        >>> attn(torch.randn(500, 32), torch.randn(500, 3) * 10).shape
        torch.Size([500, 32])
    """

    def __init__(
        self, dim: int, num_heads: int, window_size=0.3, window_size_sphere=(2.0, 2.0, 120.0),
        quant_size=None, quant_size_sphere=None, a: float = 0.0125, origin: str = "fixed",
        qkv_bias: bool = True, qk_scale: float | None = None, proj_drop: float = 0.0,
        device=None, dtype=None, backend: str = "auto",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_heads(owner, dim, num_heads, min_heads=2)
        if origin not in ORIGINS:
            raise ValueError(f"{owner}: origin must be one of {ORIGINS}, got {origin!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
        if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
            raise ValueError(f"{owner}: a must be a positive number, got {a!r}")
        self.dim, self.num_heads, self.origin, self.backend, self.a = dim, num_heads, origin, backend, float(a)
        self.window_size = _triple("window_size", window_size, owner)
        self.window_size_sphere = _triple("window_size_sphere", window_size_sphere, owner)
        self.quant_size = (tuple(w / QUANT_SCALE for w in self.window_size) if quant_size is None
                           else _triple("quant_size", quant_size, owner))
        self.quant_size_sphere = (tuple(w / QUANT_SCALE for w in self.window_size_sphere)
                                  if quant_size_sphere is None
                                  else _triple("quant_size_sphere", quant_size_sphere, owner))
        L = quant_grid_length(self.window_size[0], self.quant_size[0])
        Ls = quant_grid_length(self.window_size_sphere[0], self.quant_size_sphere[0])
        cubic = [quant_grid_length(w, q) for w, q in zip(self.window_size, self.quant_size, strict=True)]
        sphere = [quant_grid_length(w, q) for w, q in zip(self.window_size_sphere, self.quant_size_sphere, strict=True)][:2]
        if L < 1 or Ls < 1 or any(x != L for x in cubic) or any(x != Ls for x in sphere):
            raise ValueError(f"{owner}: window / quant sizes must give one number of bins >= 1 per "
                             f"branch, got cubic {cubic} and radial {sphere}")
        head_dim = dim // num_heads
        self.num_heads_brc1 = num_heads // 2
        self.scale = qk_scale or head_dim**-0.5
        factory = {"device": device, "dtype": dtype}
        # registration order as the official layer: cubic tables, radial tables, qkv, proj
        (self.relative_pos_query_table, self.relative_pos_key_table,
         self.relative_pos_value_table) = _tables(2 * L - 1, self.num_heads_brc1, head_dim, factory)
        (self.relative_pos_query_table_sphere, self.relative_pos_key_table_sphere,
         self.relative_pos_value_table_sphere) = _tables(2 * Ls, num_heads - self.num_heads_brc1,
                                                         head_dim, factory)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in ("query", "key", "value"):
            for suffix in ("", "_sphere"):
                nn.init.trunc_normal_(getattr(self, f"relative_pos_{name}_table{suffix}"), std=0.02)
        self.qkv.reset_parameters()
        self.proj.reset_parameters()

    def forward(self, x: Tensor, xyz: Tensor, batch: Tensor | None = None,
                offset: Tensor | None = None) -> Tensor:
        owner = type(self).__name__
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{owner}: x must have shape (N, {self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        batch = _batch_index(owner, x, xyz, batch, offset)
        N, C = x.shape
        h1 = self.num_heads_brc1
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, C // self.num_heads).unbind(1)
        pts = xyz if xyz.dtype in (torch.float32, torch.float64) else xyz.float()
        common = {"origin": self.origin, "scale": self.scale, "backend": self.backend}
        out_cubic = window_attention(
            q[:, :h1], k[:, :h1], v[:, :h1], pts, batch, self.window_size,
            table_q=self.relative_pos_query_table, table_k=self.relative_pos_key_table,
            table_v=self.relative_pos_value_table, quant_size=self.quant_size, **common)
        out_radial = window_attention(
            q[:, h1:], k[:, h1:], v[:, h1:], cart2sphere(pts), batch, self.window_size_sphere,
            table_q=self.relative_pos_query_table_sphere, table_k=self.relative_pos_key_table_sphere,
            table_v=self.relative_pos_value_table_sphere, quant_size=self.quant_size_sphere,
            exp_split_a=self.a, **common)
        out = torch.cat([out_cubic, out_radial], 1).reshape(N, C)
        return self.proj_drop(self.proj(out.to(x.dtype)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads} (cubic {self.num_heads_brc1}), "
                f"window_size={self.window_size}, window_size_sphere={self.window_size_sphere}, "
                f"a={self.a}, origin={self.origin!r}")


class CubicWindowAttention(nn.Module):
    r"""Window attention with every head in cubic windows on xyz and sptr's contextual relative
    position encoding (the cubic branch of SphereFormer's ``SparseMultiheadSASphereConcat`` over
    all heads; sptr's ``VarLengthMultiheadSA`` with ``pe_type="contextual"``): the baseline that
    SphereFormer's radial windows are measured against.

    Args:
        dim, num_heads: channels and heads (any head_dim).
        window_size: cube edge in the units of xyz (number or 3 numbers).
        quant_size: position bins (default window_size / 24).
        origin, qkv_bias, qk_scale, backend: as :class:`effnn.SphereFormerAttention`.

    Parameters: ``qkv``, ``proj``, ``relative_pos_{query,key,value}_table`` (2L-1, 3, num_heads,
    head_dim).

    Shape: ``x`` (N, C), ``xyz`` (N, 3), ``batch`` (N,) -> (N, C).
    """

    def __init__(self, dim: int, num_heads: int, window_size=0.3, quant_size=None,
                 origin: str = "fixed", qkv_bias: bool = True, qk_scale: float | None = None,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_heads(owner, dim, num_heads)
        if origin not in ORIGINS:
            raise ValueError(f"{owner}: origin must be one of {ORIGINS}, got {origin!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
        self.dim, self.num_heads, self.origin, self.backend = dim, num_heads, origin, backend
        self.window_size = _triple("window_size", window_size, owner)
        self.quant_size = (tuple(w / 24 for w in self.window_size) if quant_size is None
                           else _triple("quant_size", quant_size, owner))
        lengths = [quant_grid_length(w, q) for w, q in zip(self.window_size, self.quant_size, strict=True)]
        if lengths[0] < 1 or any(x != lengths[0] for x in lengths):
            raise ValueError(f"{owner}: window_size / quant_size must give one number of bins >= 1, "
                             f"got {lengths}")
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        factory = {"device": device, "dtype": dtype}
        (self.relative_pos_query_table, self.relative_pos_key_table,
         self.relative_pos_value_table) = _tables(2 * lengths[0] - 1, num_heads, head_dim, factory)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for t in (self.relative_pos_query_table, self.relative_pos_key_table, self.relative_pos_value_table):
            nn.init.trunc_normal_(t, std=0.02)
        self.qkv.reset_parameters()
        self.proj.reset_parameters()

    def forward(self, x: Tensor, xyz: Tensor, batch: Tensor) -> Tensor:
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, C // self.num_heads).unbind(1)
        out = window_attention(
            q, k, v, xyz if xyz.dtype in (torch.float32, torch.float64) else xyz.float(), batch,
            self.window_size, table_q=self.relative_pos_query_table,
            table_k=self.relative_pos_key_table, table_v=self.relative_pos_value_table,
            quant_size=self.quant_size, origin=self.origin, scale=self.scale, backend=self.backend)
        return self.proj(out.reshape(N, C).to(x.dtype))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"origin={self.origin!r}")
