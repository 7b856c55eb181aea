"""Benchmark cases of GBLR (``GaudiGBLRLinear``, Lee & Kim 2024) against ``nn.Linear``.

Shape spec ``INxOUTxPERCENT``: a layer whose structure costs PERCENT % of the dense multiply-adds,
built the way the official recipe gets there without data: the 'splr' initialisation at location 0
(the official ViT config) and a uniform shrink of every width (what the proximal step does before
the gradients differentiate the components) until the hard structure fits the budget
(:func:`budget_layer`). Two layers are registered:

- ``gblr``: the training computation of :class:`GaudiGBLRLinear` (train mode, sigma = 100, the
  constructor's and the official schedule's final value: the masks, the masked product, and their
  backward);
- ``gblr_structured``: the exported inference module (:meth:`GaudiGBLRLinear.to_structured`) of the
  same structure with the Gaussian off (exact boxcars, as the official fine-tuning; at sigma = 100
  the eval-mode tails above 1e-3 widen each interval by a few entries: +0.6 % of dense here), whose
  forward is the issue's structured eval path.

Defaults: the issue's 768x768 at 25 % with 4096 tokens (1024 under ``--quick``), and the ViT-B MLP
up-projection at 25 %.
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
from effnn.nn.gblr import GaudiGBLRLinear

FORMAT = "INxOUTxPERCENT (e.g. 768x768x25)"
TOKENS = 4096
QUICK_TOKENS = 1024


@torch.no_grad()
def budget_layer(in_features: int, out_features: int, fraction: float, **kwargs) -> GaudiGBLRLinear:
    """A :class:`GaudiGBLRLinear` ('splr' widths, locations 0) whose widths are all lowered by one
    amount -- the largest structure that costs at most ``fraction`` of the dense multiply-adds
    (official count with exact boxcars). ``kwargs`` go to the constructor."""
    layer = GaudiGBLRLinear(in_features, out_features, location_init=0.0, **kwargs)
    start = layer.widths.detach().clone()
    budget = fraction * in_features * out_features

    def cost(shift: float) -> int:
        layer.widths.copy_((start - shift).clamp(0.0, 1.0))
        return _hard_macs(layer)

    lo, hi = 0.0, 1.0  # cost(hi) = 0 <= budget
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if cost(mid) <= budget else (mid, hi)
    cost(hi)
    return layer


def _hard_macs(layer: GaudiGBLRLinear) -> int:
    a = torch.round(layer.widths[1] * layer.out_features)
    b = torch.round(layer.widths[0] * layer.in_features)
    live = (a > 1) & (b > 1)
    return int((torch.minimum(layer.rank_per_component * (a + b), a * b) * live).sum())


def _case(layer_name: str, structured: bool):
    def parse(spec: str) -> Case:
        in_features, out_features, percent = parse_ints(spec, 3, FORMAT)
        if percent > 100:
            raise ValueError(f"shape {spec!r}: PERCENT must be at most 100, got {percent}")

        def build(provider: str, s: Setting) -> Workload:
            tokens = s.token_count(TOKENS, quick=QUICK_TOKENS)
            factory = {"device": s.device, "dtype": s.dtype}
            x = torch.randn(tokens, in_features, **factory)
            if provider == BASELINE:
                dense = nn.Linear(in_features, out_features, **factory)
                return Workload(dense, (x,), linear_flops(tokens, in_features * out_features), tokens,
                                backend="torch")
            sigma = None if structured else 100.0
            layer = budget_layer(in_features, out_features, percent / 100, sigma=sigma, backend=provider,
                                 **factory)
            macs = _hard_macs(layer)
            if structured:
                fast = layer.eval().to_structured()
                return Workload(fast, (x,), linear_flops(tokens, fast.macs_per_token), tokens)
            return Workload(layer, (x,), linear_flops(tokens, macs), tokens, backend="ref")

        return Case(
            layer=layer_name,
            name=f"{in_features}x{out_features}/{percent}%",
            shape=f"in={in_features} out={out_features} structure={percent}% of dense",
            build=build,
            cost=in_features * out_features,
        )

    return parse


GBLR = register_layer(
    Layer(
        name="gblr",
        title="GaudiGBLRLinear (training computation) vs nn.Linear",
        baseline="nn.Linear",
        shape_format=FORMAT,
        parse=_case("gblr", structured=False),
        defaults=("768x768x25", "768x3072x25"),
        backends=("ref",),
    )
)

GBLR_STRUCTURED = register_layer(
    Layer(
        name="gblr_structured",
        title="GaudiGBLRLinear.to_structured() (inference) vs nn.Linear",
        baseline="nn.Linear",
        shape_format=FORMAT,
        parse=_case("gblr_structured", structured=True),
        defaults=("768x768x25", "768x3072x25"),
        backends=("ref",),
    )
)
