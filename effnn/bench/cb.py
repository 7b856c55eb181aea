"""Benchmark case of Context Broadcasting: the overhead of ``effnn.insert_cb`` on a ViT-S/16.

The baseline is timm's ``vit_small_patch16_224`` (random weights, eval mode, 224x224 images); the
effnn provider is the same model, same weights, with CB after every block's MLP. The table's
``vs baseline`` is then baseline time / CB time: 0.99x means 1% overhead. Without timm, the
architecturally identical :class:`effnn.models.vit.VisionTransformer` (ViT-S/16 configuration)
stands in, and the case's shape says so.

Shape spec ``BATCH`` (images per call). Defaults: 1 and 8.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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
from effnn.convert.cb import insert_cb

FORMAT = "BATCH (images of 224x224 per call, e.g. 8)"
IMG, PATCH, DIM, DEPTH, HEADS = 224, 16, 384, 12, 6
TOKENS_PER_IMAGE = (IMG // PATCH) ** 2 + 1  # 196 patches + the class token


def vit_small(device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """A freshly initialised ViT-S/16 in eval mode and where it comes from."""
    if importlib.util.find_spec("timm") is not None:
        import timm

        model = timm.create_model("vit_small_patch16_224", pretrained=False)
        source = "timm vit_small_patch16_224"
    else:
        from effnn.models.vit import VisionTransformer

        model = VisionTransformer(IMG, PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
        source = "effnn.models.vit ViT-S/16 (timm not installed)"
    return model.to(device=device, dtype=dtype).eval(), source


def _forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def cb_case(spec: str) -> Case:
    (batch,) = parse_ints(spec, 1, FORMAT)
    source = "timm" if importlib.util.find_spec("timm") is not None else "effnn.models.vit"

    def build(provider: str, s: Setting) -> Workload:
        model, _ = vit_small(s.device, s.dtype)
        x = torch.randn(batch, 3, IMG, IMG, device=s.device, dtype=s.dtype)
        fwd = _forward_flops(model, x)  # CB adds no matmul FLOPs: the same for both providers
        flops = {FORWARD: fwd, TRAIN: 3.0 * fwd}
        if provider != BASELINE:
            insert_cb(model)
        return Workload(model, (x,), flops, batch * TOKENS_PER_IMAGE,
                        backend="torch" if provider == BASELINE else "ref")

    return Case(
        layer="cb",
        name=f"vit_s16/b{batch}",
        shape=f"ViT-S/16 ({source}) batch={batch} tokens/image={TOKENS_PER_IMAGE} dim={DIM}",
        build=build,
        cost=batch,
    )


CB = register_layer(
    Layer(
        name="cb",
        title="ViT-S/16 with Context Broadcasting vs without",
        baseline="ViT-S/16",
        shape_format=FORMAT,
        parse=cb_case,
        defaults=("1", "8"),
        quick=("1",),
        backends=("ref",),
    )
)
