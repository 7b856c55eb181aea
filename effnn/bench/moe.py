"""Benchmark cases of the dense FFN gathered from an ``MoE`` (OneS) against the ``MoE`` itself.

The baseline is the sparse layer (``effnn.MoE``, reference path); the effnn provider is the dense
``FeedForward`` that :func:`effnn.gather_experts` returns (one expert's shape), so "vs baseline"
is the speed-up of the gathered layer over the MoE: the inference gain OneS is after (3.7x for the
paper's whole models on GPU). Both run at the same tokens; the MoE's capacity factor is 1.25 (the
Switch Transformer's training value), its FLOPs count its capacity buffer (capacity_factor *
top_k * T tokens through one expert's FFN) and the router.

Shape spec ``DIMxHIDDENxEXPERTSxTOPK``. Defaults: ViT-S and ViT-B widths with 8 experts, top-1
(Switch, WideNet) and top-2 (V-MoE), 4096 tokens (512 under ``--quick``).
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
from effnn.convert.ones import gather_experts
from effnn.nn.moe import MoE

FORMAT = "DIMxHIDDENxEXPERTSxTOPK (e.g. 768x3072x8x2)"
TOKENS = 4096
QUICK_TOKENS = 512
CAPACITY_FACTOR = 1.25


def _ffn_flops(tokens: float, dim: int, hidden: int) -> dict[str, float]:
    fwd = 2.0 * tokens * 2 * dim * hidden
    return {FORWARD: fwd, TRAIN: 3.0 * fwd}


def moe_case(spec: str) -> Case:
    dim, hidden, experts, top_k = parse_ints(spec, 4, FORMAT)
    if top_k > experts:
        raise ValueError(f"shape {spec!r}: TOPK={top_k} is larger than EXPERTS={experts}")

    def build(provider: str, s: Setting) -> Workload:
        tokens = s.token_count(TOKENS, quick=QUICK_TOKENS)
        factory = {"device": s.device, "dtype": s.dtype}
        x = torch.randn(tokens, dim, **factory)
        moe = MoE(dim, hidden, experts, top_k, CAPACITY_FACTOR, **factory)
        if provider == BASELINE:
            capacity = moe.capacity(tokens)
            flops = _ffn_flops(experts * capacity, dim, hidden)
            router = 2.0 * tokens * dim * experts
            flops = {FORWARD: flops[FORWARD] + router, TRAIN: flops[TRAIN] + 3 * router}
            return Workload(moe, (x,), flops, tokens, backend="ref")
        ffn = gather_experts(moe, "avg")  # the method does not change the dense layer's speed
        return Workload(ffn, (x,), _ffn_flops(tokens, dim, hidden), tokens, backend="ref")

    return Case(
        layer="moe",
        name=f"{dim}x{hidden}/e{experts}k{top_k}",
        shape=f"dim={dim} hidden={hidden} experts={experts} top_k={top_k} capacity_factor={CAPACITY_FACTOR}",
        build=build,
        cost=dim * hidden * top_k,
    )


MOE = register_layer(
    Layer(
        name="moe",
        title="gathered dense FFN (OneS) vs MoE",
        baseline="MoE",
        shape_format=FORMAT,
        parse=moe_case,
        defaults=("384x1536x8x1", "384x1536x8x2", "768x3072x8x1", "768x3072x8x2"),
        backends=("ref",),
    )
)
