"""Benchmark cases of ``BiLevelRoutingAttention`` against plain window attention.

The baseline (the issue's) is non-overlapping 8x8-token window attention with the same heads and
the same parameters as BRA: the fused qkv projection, the LCE (depthwise conv of the V map) and the
output projection; windows partition the input before the projection, as BRA's regions do, and the
map is zero-padded to a multiple of 8 first (Swin's padding). The attention runs through
``F.scaled_dot_product_attention`` with scale head_dim ** -0.5. At BiFormer-T's stage shapes at
224x224 every query of both layers sees 64 keys (BRA: 1 x 8x8, 4 x 4x4, 16 x 2x2 tokens); the window
layer does the same work on the padded 16x16 map at stage 3.

Shape spec ``HxCxHEADSxTOPK`` (square H x H map, n_win 7, LCE 5x5, batch 8; ``--quick``: batch 2;
``--tokens T``: batch T // H^2). Defaults: the three BRA stages of BiFormer-T at 224x224.
"""

from __future__ import annotations

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
from effnn.nn.routing_attention import BiLevelRoutingAttention

FORMAT = "HxCxHEADSxTOPK (e.g. 56x64x2x1)"
N_WIN = 7
SIDE_DWCONV = 5
WINDOW = 8
BATCH = 8
QUICK_BATCH = 2


class WindowAttention(nn.Module):
    """Non-overlapping ``window`` x ``window`` window attention with BRA's parameters (``qkv.qkv``,
    ``lepe``, ``wo``), channels-last (N, H, W, C); the baseline of the BiFormer benchmarks."""

    def __init__(self, dim: int, num_heads: int, window: int = WINDOW, side_dwconv: int = SIDE_DWCONV,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.window = num_heads, window
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **factory)
        self.qkv = nn.Module()
        self.qkv.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.wo = nn.Linear(dim, dim, **factory)

    def forward(self, x: Tensor) -> Tensor:
        N, H, W, C = x.shape
        w, m = self.window, self.num_heads
        Hp, Wp = -(-H // w) * w, -(-W // w) * w
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        a, b = Hp // w, Wp // w
        xw = x.view(N, a, w, b, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N * a * b, w * w, C)
        # unbind, as timm's Swin: its backward is one stack, where three indexings cost a zeroed
        # 3C-wide buffer and a copy each
        qkv = self.qkv.qkv(xw).view(N * a * b, w * w, 3, m, C // m)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(N, a, b, w, w, C).permute(0, 1, 3, 2, 4, 5)
        v = v.transpose(1, 2).reshape(N, a, b, w, w, C).permute(0, 1, 3, 2, 4, 5)
        lepe = self.lepe(v.reshape(N, Hp, Wp, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.wo((lepe.reshape(out.shape) + out).reshape(N, Hp, Wp, C))
        return y[:, :H, :W].contiguous() if (Hp, Wp) != (H, W) else y


def bra_macs(height: int, dim: int, topk: int, n_win: int = N_WIN, side_dwconv: int = SIDE_DWCONV) -> int:
    """Multiply-adds of one BRA layer on one H x H x C map (what fvcore counts):
    HW*3C^2 + S^4*C + 2k(HW)^2*C/S^2 + K^2*HW*C + HW*C^2."""
    hw = height * height
    return (hw * 3 * dim * dim + n_win**4 * dim + 2 * topk * hw * hw * dim // n_win**2
            + side_dwconv**2 * hw * dim + hw * dim * dim)


def window_macs(height: int, dim: int, window: int = WINDOW, side_dwconv: int = SIDE_DWCONV) -> int:
    hp = -(-height // window) * window
    hwp = hp * hp
    return hwp * 3 * dim * dim + 2 * hwp * window * window * dim + side_dwconv**2 * hwp * dim + hwp * dim * dim


def _flops(macs: int) -> dict[str, float]:
    return {FORWARD: 2.0 * macs, TRAIN: 6.0 * macs}


def biformer_case(spec: str) -> Case:
    height, dim, heads, topk = parse_ints(spec, 4, FORMAT)
    if dim % heads:
        raise ValueError(f"shape {spec!r}: C={dim} is not divisible by HEADS={heads}")
    if height % N_WIN:
        raise ValueError(f"shape {spec!r}: H={height} is not divisible by n_win={N_WIN}")

    def build(provider: str, s: Setting) -> Workload:
        batch = max(1, s.token_count(BATCH * height * height, QUICK_BATCH * height * height)
                    // (height * height))
        factory = {"device": s.device, "dtype": s.dtype}
        x = torch.randn(batch, height, height, dim, **factory)
        if provider == BASELINE:
            layer = WindowAttention(dim, heads, **factory)
            return Workload(layer, (x,), _flops(batch * window_macs(height, dim)),
                            batch * height * height, backend="torch")
        layer = BiLevelRoutingAttention(dim, heads, N_WIN, topk=topk, side_dwconv=SIDE_DWCONV,
                                        backend=provider, **factory)
        return Workload(layer, (x,), _flops(batch * bra_macs(height, dim, topk)),
                        batch * height * height)

    return Case(
        layer="biformer",
        name=f"{height}x{height}x{dim}/h{heads}/k{topk}",
        shape=f"map {height}x{height}x{dim}, heads {heads}, topk {topk}, n_win {N_WIN}",
        build=build,
        cost=bra_macs(height, dim, topk),
    )


BIFORMER = register_layer(
    Layer(
        name="biformer",
        title="BiLevelRoutingAttention vs 8x8 window attention",
        baseline="window-attn",
        shape_format=FORMAT,
        parse=biformer_case,
        defaults=("56x64x2x1", "28x128x4x4", "14x256x8x16"),
        backends=("ref",),
    )
)
