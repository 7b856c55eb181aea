"""Benchmark cases of ``MoDBlock`` against the dense block it wraps.

The block is a standard pre-norm transformer block (:class:`effnn.nn.PreNormBlock`: LayerNorm,
causal multi-head self-attention with ``scaled_dot_product_attention``, LayerNorm, GELU MLP of 4x
width), the same weights on both sides; the MoD side routes k = ceil(capacity * T) tokens of
every sequence through it. One sequence of 2048 tokens (512 under ``--quick``).

Shape spec ``DIMxHEADSxINV``: capacity = 1/INV, e.g. ``768x12x8`` for 12.5% (the paper's best)
and ``768x12x2`` for 50%.
"""

from __future__ import annotations

import torch

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
from effnn.nn.mod import MoDBlock, PreNormBlock
from effnn.ops.mod import mod_capacity

FORMAT = "DIMxHEADSxINV, capacity 1/INV (e.g. 768x12x8 for 12.5%)"
TOKENS = 2048
QUICK_TOKENS = 512


def block_macs(tokens: int, dim: int) -> int:
    """Multiply-adds of one pre-norm block on ``tokens`` tokens: the linears (qkv, proj, 4x MLP:
    12 dim^2 per token) and causal attention (scores and values: tokens (tokens + 1) / 2 pairs)."""
    return 12 * dim * dim * tokens + tokens * (tokens + 1) * dim


def mod_case(spec: str) -> Case:
    dim, heads, inv = parse_ints(spec, 3, FORMAT)
    if dim % heads:
        raise ValueError(f"shape {spec!r}: DIM={dim} is not divisible by HEADS={heads}")
    capacity = 1.0 / inv

    def build(provider: str, s: Setting) -> Workload:
        tokens = s.token_count(TOKENS, quick=QUICK_TOKENS)
        factory = {"device": s.device, "dtype": s.dtype}
        x = torch.randn(1, tokens, dim, **factory)
        block = PreNormBlock(dim, heads, causal=True, **factory)
        if provider == BASELINE:
            macs = block_macs(tokens, dim)
            return Workload(block, (x,), {FORWARD: 2.0 * macs, TRAIN: 6.0 * macs}, tokens,
                            backend="torch")
        k = mod_capacity(tokens, capacity)
        macs = block_macs(k, dim) + tokens * dim  # the router: one dot product per token
        return Workload(MoDBlock(block, dim, capacity), (x,), {FORWARD: 2.0 * macs, TRAIN: 6.0 * macs},
                        tokens, backend="ref")

    percent = f"{100 * capacity:g}%"
    return Case(
        layer="mod",
        name=f"{dim}/h{heads}/c{percent}",
        shape=f"dim={dim} heads={heads} capacity={percent}",
        build=build,
        cost=block_macs(TOKENS, dim) * (1 + capacity),
    )


MOD = register_layer(
    Layer(
        name="mod",
        title="MoDBlock vs the dense pre-norm block",
        baseline="dense block",
        shape_format=FORMAT,
        parse=mod_case,
        defaults=("768x12x8", "768x12x2"),
        backends=("ref",),
    )
)
