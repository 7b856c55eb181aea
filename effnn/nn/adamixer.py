"""AdaMixer's decoder stage (Gao et al., "AdaMixer: A Fast-Converging Query-Based Object Detector",
CVPR 2022) as ASAG uses it, and the pieces it shares with ASAG's RoI query initialiser.

Boxes travel as AdaMixer's *xyzr* on the finest (stride-4) grid: x, y the centre in stride-4
cells, z = log2(sqrt(w h)), r = log2(sqrt(h / w)) (w, h in stride-4 cells), so a box is
(x -+ 2^(z - r) / 2, y -+ 2^(z + r) / 2). Parameter names and initialisation follow ASAG's port
(iSEE-Laboratory/ASAG ``models/adamixer_decoder.py``: ``AdaMixerDecoderStage``,
``AdaptiveSamplingMixing``; ``models/adamixer_decoder_utils.py``: ``AdaptiveMixing``,
``sampling_3d``, ``position_embedding``, ``decode_box``, ``make_sample_points``), which is
MCG-NJU/AdaMixer's ``adaptive_mixing_operator.py`` with a configurable activation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AdaMixerDecoderStage",
    "AdaptiveMixing",
    "AdaptiveSamplingMixing",
    "boxes_to_xyzr",
    "iof_self_attention",
    "refine_xyzr",
    "sampling_3d",
    "xyzr_position_embedding",
    "xyzr_to_boxes",
]


def activation_layer(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"activation must be 'relu', 'gelu' or 'silu', got {name!r}")


class MLP(nn.Module):
    """The official ``MLP`` (``layers.{i}``, activation between layers)."""

    def __init__(self, dims: Sequence[int], activation: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.activations = nn.ModuleList(activation_layer(activation) for _ in range(len(dims) - 2))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.activations):
                x = self.activations[i](x)
        return x


def head_fcs(dim: int, n: int, activation: str) -> nn.ModuleList:
    """``n`` x (Linear without bias, LayerNorm, activation): the official ``cls_fcs`` / ``reg_fcs``."""
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), activation_layer(activation)]
    return nn.ModuleList(layers)


# ---- xyzr ---------------------------------------------------------------------------------------


def boxes_to_xyzr(boxes_xyxy: Tensor, stride: float) -> Tensor:
    """xyxy pixels (..., 4) -> xyzr on the ``stride`` grid (``RelationBlock.forward``: the 1e-7
    terms keep degenerate boxes finite)."""
    b = boxes_xyxy / stride
    xy = (b[..., :2] + b[..., 2:]) / 2
    wh = b[..., 2:] - b[..., :2]
    z = torch.log2(wh.prod(-1, keepdim=True) + 1e-7) / 2
    r = torch.log2(wh[..., 1:] / (wh[..., :1] + 1e-7) + 1e-7) / 2
    return torch.cat([xy, z, r], -1)


def xyzr_to_boxes(xyzr: Tensor) -> Tensor:
    """xyzr (..., 4) -> xyxy (..., 4) in grid cells (``decode_box``)."""
    scale = torch.exp2(xyzr[..., 2:3])
    wh = scale * torch.exp2(torch.cat([-xyzr[..., 3:4], xyzr[..., 3:4]], -1))
    return torch.cat([xyzr[..., :2] - wh / 2, xyzr[..., :2] + wh / 2], -1)


def refine_xyzr(xyzr: Tensor, delta: Tensor) -> Tensor:
    """The regression head's update: centre moves by delta_xy 2^z (box-size units), z and r add."""
    xy = xyzr[..., :2] + delta[..., :2] * torch.exp2(xyzr[..., 2:3])
    return torch.cat([xy, xyzr[..., 2:] + delta[..., 2:]], -1)


def xyzr_position_embedding(xyzr: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of xyzr (..., 4) -> (..., 4 num_feats) (``position_embedding``: x, y
    divided by 1000, z, r as they are; sin on even, cos on odd frequencies, interleaved)."""
    t = xyzr / xyzr.new_tensor([1000.0, 1000.0, 1.0, 1.0])
    k = torch.arange(num_feats, device=xyzr.device, dtype=torch.float32)
    dim_t = (temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)).to(xyzr.dtype)
    pos = t[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(-3)


def iof_self_attention(
    attn: nn.MultiheadAttention, query: Tensor, xyzr: Tensor, iof_tau: Tensor, valid: Tensor | None
) -> Tensor:
    """AdaMixer's self-attention with the IoF bias, as ASAG runs it: q = k = v = query + PE(xyzr),
    attention logits + tau_h log(IoF(i, j) + 1e-7) (IoF = intersection / area of query i's box),
    and the residual adds the *sum* query + PE (the official ``query_content += query_content_attn``).
    ``valid`` (B, N): valid queries do not attend to padding (padding rows see all, so no row is
    empty), as the official ``dn_masks``. query (B, N, C) -> (B, N, C), before the norm."""
    B, N, C = query.shape
    with torch.no_grad():
        boxes = xyzr_to_boxes(xyzr)
        lt = torch.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
        rb = torch.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        log_iof = torch.log(inter / area[..., :, None].clamp(min=1e-6) + 1e-7)  # (bbox_overlaps, "iof")
        pe = xyzr_position_embedding(xyzr, C // 4).to(query.dtype)
    bias = log_iof[:, None] * iof_tau.view(1, -1, 1, 1)  # (B, heads, N, N)
    if valid is not None:
        hide = valid[:, :, None] & ~valid[:, None, :]
        bias = bias.masked_fill(hide[:, None], float("-inf"))
    x = query + pe
    out = attn(x, x, x, attn_mask=bias.flatten(0, 1).to(x.dtype), need_weights=False)[0]
    return out + x


# ---- adaptive 3-D sampling and mixing -----------------------------------------------------------


def sampling_3d(points: Tensor, features: Sequence[Tensor], strides: Sequence[int], n_groups: int, tau: float = 2.0) -> Tensor:
    """AdaMixer's adaptive 3-D sampling (``sampling_3d``): points (B, N, G * P, 3) = (x, y) in
    stride-``strides[0]`` cells and z a continuous level index; each point reads every level
    bilinearly (``grid_sample``, zero padding, align_corners=False; group g reads channel group g)
    weighted by softmax_l(-(z - l)^2 / tau). Returns (B, N, G, P, C / G)."""
    B, N, GP, _ = points.shape
    P = GP // n_groups
    xy = points[..., :2] * strides[0]  # pixels
    w = torch.softmax(-((points[..., 2:3] - torch.arange(len(features), device=points.device, dtype=points.dtype)) ** 2) / tau, -1)
    # (B, N, G, P, L) -> (B * G, 1, N, P, L): the layout of grid_sample's output
    w = w.view(B, N, n_groups, P, -1).permute(0, 2, 1, 3, 4).flatten(0, 1)[:, None]
    grid_px = xy.view(B, N, n_groups, P, 2).permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B G, N, P, 2)
    out = None
    for lvl, (f, s) in enumerate(zip(features, strides, strict=True)):  # one grid_sample per level
        _, C, H, W = f.shape
        extent = grid_px.new_tensor([W * s, H * s])
        v = F.grid_sample(f.reshape(B * n_groups, C // n_groups, H, W), grid_px / extent * 2 - 1,
                          mode="bilinear", padding_mode="zeros", align_corners=False)
        v = v * w[..., lvl]
        out = v if out is None else out + v
    return out.view(B, n_groups, -1, N, P).permute(0, 3, 1, 4, 2)


class AdaptiveMixing(nn.Module):
    """AdaMixer's adaptive mixing: from each query, a Linear generates per group a channel mixer
    M (C/G x C/G) and a spatial mixer S (out_points x in_points); sampled features (P x C/G) go
    through x M, LayerNorm over (P, C/G), activation, S x, LayerNorm, activation, then ``out_proj``
    to the query dimension, added to the query. Names: ``parameter_generator.0``, ``out_proj``.

    Shapes: x (B, N, G, in_points, C/G), query (B, N, query_dim) -> (B, N, query_dim)."""

    def __init__(self, in_dim: int, in_points: int, n_groups: int, query_dim: int, out_points: int, activation: str = "gelu") -> None:
        super().__init__()
        if in_dim % n_groups:
            raise ValueError(f"AdaptiveMixing: in_dim={in_dim} is not divisible by n_groups={n_groups}")
        self.in_points, self.out_points, self.n_groups = in_points, out_points, n_groups
        self.eff_dim = in_dim // n_groups
        self.m_parameters = self.eff_dim * self.eff_dim
        self.s_parameters = in_points * out_points
        self.parameter_generator = nn.Sequential(nn.Linear(query_dim, n_groups * (self.m_parameters + self.s_parameters)))
        self.out_proj = nn.Linear(self.eff_dim * out_points * n_groups, query_dim)
        self.act1 = activation_layer(activation)
        self.act2 = activation_layer(activation)

    def reset_parameters(self) -> None:
        """The generator's weight starts at zero: the first mixers are its bias alone."""
        nn.init.zeros_(self.parameter_generator[0].weight)

    def forward(self, x: Tensor, query: Tensor) -> Tensor:
        B, N, G, P, C = x.shape
        params = self.parameter_generator(query).view(B * N, G, -1)
        M, S = params.split([self.m_parameters, self.s_parameters], -1)
        out = torch.matmul(x.reshape(B * N, G, P, C), M.reshape(B * N, G, C, C))
        out = self.act1(F.layer_norm(out, out.shape[-2:]))
        out = torch.matmul(S.reshape(B * N, G, self.out_points, P), out)
        out = self.act2(F.layer_norm(out, out.shape[-2:]))
        return query + self.out_proj(out.reshape(B, N, -1))


class AdaptiveSamplingMixing(nn.Module):
    """Query-generated 3-D sampling offsets (``sampling_offset_generator.0``: per group and point
    (dx, dy) in box-size units from the box centre, dz from the box level), sampling
    (:func:`sampling_3d`), :class:`AdaptiveMixing` and a LayerNorm (``norm``)."""

    def __init__(self, content_dim: int, in_points: int, out_points: int, n_groups: int, strides: Sequence[int], activation: str = "gelu") -> None:
        super().__init__()
        self.in_points, self.n_groups, self.strides = in_points, n_groups, tuple(strides)
        self.sampling_offset_generator = nn.Sequential(nn.Linear(content_dim, in_points * n_groups * 3))
        self.norm = nn.LayerNorm(content_dim)
        self.adaptive_mixing = AdaptiveMixing(content_dim, in_points, n_groups, content_dim, out_points, activation)

    def reset_parameters(self) -> None:
        """Zero weights; bias: (dx, dy) uniform in [-0.5, 0.5] (points spread over the box), dz -1."""
        lin = self.sampling_offset_generator[0]
        nn.init.zeros_(lin.weight)
        with torch.no_grad():
            bias = lin.bias.view(self.n_groups, self.in_points, 3)
            nn.init.uniform_(bias, -0.5, 0.5)
            bias[..., 2] = -1.0
        self.adaptive_mixing.reset_parameters()

    def forward(self, features: Sequence[Tensor], query: Tensor, xyzr: Tensor) -> Tensor:
        B, N, _ = query.shape
        offset = self.sampling_offset_generator(query).view(B, N, -1, 3)
        wh = torch.exp2(xyzr[..., 2:3]) * torch.exp2(torch.cat([-xyzr[..., 3:4], xyzr[..., 3:4]], -1))
        xy = xyzr[:, :, None, :2] + offset[..., :2] * wh[:, :, None]
        z = xyzr[:, :, None, 2:3] + offset[..., 2:3]
        sampled = sampling_3d(torch.cat([xy, z], -1), features, self.strides, self.n_groups)
        return self.norm(self.adaptive_mixing(sampled, query))


class AdaMixerDecoderStage(nn.Module):
    """One AdaMixer decoder stage (ASAG-A's single decoder layer): IoF-biased self-attention
    (:func:`iof_self_attention`) + LayerNorm, adaptive 3-D sampling and mixing, FFN (2 layers)
    + LayerNorm, then a classification branch (``cls_fcs`` -> ``fc_cls``) and a regression branch
    (``reg_fcs`` -> ``fc_reg``: an xyzr delta, :func:`refine_xyzr`).

    Names as the official stage (``attention``, ``attention_norm``, ``sampling_n_mixing``, ``ffn``,
    ``ffn_norm``, ``cls_fcs``, ``fc_cls``, ``reg_fcs``, ``fc_reg``, ``iof_tau``). Initialisation:
    Xavier-uniform for every matrix, class bias at prior 0.01, zero regression layer, tau uniform
    in [0, 4], then the sampling and mixing initialisations.

    Args: num_classes; content_dim (256); num_heads (8); feedforward_channels (2048); in_points
    (32), out_points (128), n_groups (4); strides of the feature maps, finest first ((4, 8, 16,
    32)); num_cls_fcs (1), num_reg_fcs (3); activation ("gelu", ASAG's setting).

    Shapes: features: list of (B, content_dim, H_l, W_l); xyzr (B, N, 4) on the strides[0] grid;
    query (B, N, content_dim); valid (B, N) or None. Returns (class logits (B, N, num_classes),
    refined xyzr (B, N, 4), query (B, N, content_dim)).

    Example::

        >>> stage = AdaMixerDecoderStage(3, content_dim=64, feedforward_channels=128, out_points=32)
        >>> feats = [torch.randn(1, 64, 64 // s, 64 // s) for s in (1, 2, 4, 8)]
        >>> xyzr = boxes_to_xyzr(torch.tensor([[[8.0, 8.0, 40.0, 30.0]]]), 4)
        >>> logits, new_xyzr, q = stage(feats, xyzr, torch.randn(1, 1, 64))
        >>> logits.shape, new_xyzr.shape
        (torch.Size([1, 1, 3]), torch.Size([1, 1, 4]))
    """

    def __init__(
        self,
        num_classes: int,
        content_dim: int = 256,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        in_points: int = 32,
        out_points: int = 128,
        n_groups: int = 4,
        strides: Sequence[int] = (4, 8, 16, 32),
        num_cls_fcs: int = 1,
        num_reg_fcs: int = 3,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if content_dim % num_heads or content_dim % 4:
            raise ValueError(f"AdaMixerDecoderStage: content_dim={content_dim} must be divisible by num_heads={num_heads} and by 4")
        self.num_classes, self.content_dim, self.strides = num_classes, content_dim, tuple(strides)
        self.attention = nn.MultiheadAttention(content_dim, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(content_dim)
        self.ffn = MLP((content_dim, feedforward_channels, content_dim), activation)
        self.ffn_norm = nn.LayerNorm(content_dim)
        self.cls_fcs = head_fcs(content_dim, num_cls_fcs, activation)
        self.fc_cls = nn.Linear(content_dim, num_classes)
        self.reg_fcs = head_fcs(content_dim, num_reg_fcs, activation)
        self.fc_reg = nn.Linear(content_dim, 4)
        self.sampling_n_mixing = AdaptiveSamplingMixing(content_dim, in_points, out_points, n_groups, strides, activation)
        self.iof_tau = nn.Parameter(torch.ones(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_head(self)
        self.sampling_n_mixing.reset_parameters()

    def extra_repr(self) -> str:
        m = self.sampling_n_mixing
        return (f"num_classes={self.num_classes}, content_dim={self.content_dim}, in_points={m.in_points}, "
                f"out_points={m.adaptive_mixing.out_points}, n_groups={m.n_groups}, strides={self.strides}")

    def forward(self, features: Sequence[Tensor], xyzr: Tensor, query: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        query = self.attention_norm(iof_self_attention(self.attention, query, xyzr, self.iof_tau, valid))
        query = self.sampling_n_mixing(features, query, xyzr)
        query = self.ffn_norm(self.ffn(query) + query)
        logits, delta = branches(self, query)
        return logits, refine_xyzr(xyzr, delta), query


def reset_head(module: nn.Module) -> None:
    """The official init of a stage / the RoI query initialiser: the layers' defaults, Xavier for
    every parameter of 2+ dims, class bias -log(99) (prior 0.01), zero ``fc_reg``, tau ~ U(0, 4)."""
    for m in module.modules():
        if m is not module and hasattr(m, "_reset_parameters"):
            m._reset_parameters()  # nn.MultiheadAttention
        elif m is not module and isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding)):
            m.reset_parameters()
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(module.fc_cls.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(module.fc_reg.weight)
        nn.init.zeros_(module.fc_reg.bias)
        nn.init.uniform_(module.iof_tau, 0.0, 4.0)


def branches(module: nn.Module, query: Tensor) -> tuple[Tensor, Tensor]:
    """Class logits and xyzr delta of the ``cls_fcs``/``fc_cls`` and ``reg_fcs``/``fc_reg`` heads."""
    cls_feat, reg_feat = query, query
    for layer in module.cls_fcs:
        cls_feat = layer(cls_feat)
    for layer in module.reg_fcs:
        reg_feat = layer(reg_feat)
    return module.fc_cls(cls_feat), module.fc_reg(reg_feat)
