"""Benchmark cases of ``MonarchLinear`` against ``nn.Linear`` (same in/out features, with bias).

Shape spec ``INxOUTxNBLOCKS``. Defaults: the issue's three square shapes at 4096 tokens (512 under
``--quick``) and the MLP up-projection of a ViT-B/BERT-base block.
"""

from __future__ import annotations

import torch
from torch import nn

from effnn.bench.registry import (
    BASELINE,
    Case,
    Layer,
    Setting,
    Workload,
    linear_flops,
    parse_ints,
    register_layer,
)
from effnn.nn.monarch import MonarchLinear
from effnn.ops.monarch import monarch_factor_shapes

FORMAT = "INxOUTxNBLOCKS (e.g. 4096x4096x64)"
TOKENS = 4096
QUICK_TOKENS = 512


def monarch_case(spec: str) -> Case:
    in_features, out_features, nblocks = parse_ints(spec, 3, FORMAT)
    shape1, shape2 = monarch_factor_shapes(in_features, out_features, nblocks)
    monarch_macs = shape1[0] * shape1[1] * shape1[2] + shape2[0] * shape2[1] * shape2[2]

    def build(provider: str, s: Setting) -> Workload:
        tokens = s.token_count(TOKENS, quick=QUICK_TOKENS)
        factory = {"device": s.device, "dtype": s.dtype}
        x = torch.randn(tokens, in_features, **factory)
        if provider == BASELINE:
            layer: nn.Module = nn.Linear(in_features, out_features, **factory)
            return Workload(layer, (x,), linear_flops(tokens, in_features * out_features), tokens,
                            backend="torch")
        layer = MonarchLinear(in_features, out_features, nblocks=nblocks, backend=provider, **factory)
        return Workload(layer, (x,), linear_flops(tokens, monarch_macs), tokens)

    return Case(
        layer="monarch",
        name=f"{in_features}x{out_features}/nb{nblocks}",
        shape=f"in={in_features} out={out_features} nblocks={nblocks}",
        build=build,
        cost=in_features * out_features,
    )


MONARCH = register_layer(
    Layer(
        name="monarch",
        title="MonarchLinear vs nn.Linear",
        baseline="nn.Linear",
        shape_format=FORMAT,
        parse=monarch_case,
        defaults=("4096x4096x64", "4096x4096x4", "1024x1024x32", "768x3072x4"),
    )
)
