"""GBLR ViT-B/16 (Lee & Kim, ICLR 2024): the official module layout, and the official complexity
count (``src/utils/flops.py::profile_fvcore_sinc_gaussian``) at the 'splr' init and after the
proximal step, against counts written out by hand.

ViT-B is built on the meta device and given only its structure (``to_empty`` + ``reset_structure``):
the counts depend on the widths, not on the factor values, and the official init's 60 SVDs would
take ~25 s.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effnn.models import (
    GBLRVisionTransformer,
    VisionTransformer,
    vit_base_patch16_224,
    vit_base_patch16_224_gblr,
)
from effnn.models.gblr_vit import GBLRAttention
from effnn.nn.gblr import GaudiGBLRLinear
from effnn.train.gblr import gblr_layers, mean_width, official_complexity, soft_shrink_widths

IMAGE = torch.ones(1, 3, 224, 224)  # the official callback's input
D, H, T, P = 768, 3072, 197, 196  # width, MLP hidden, tokens, patch tokens
# every leaf that stays dense, as fvcore counts it: per block attn.proj (all 197 tokens) and two
# LayerNorms (5 per element); patch embedding, final LayerNorm, head (class token only)
DENSE_LEAVES = 12 * (T * D * D + 2 * 5 * T * D) + P * D * 3 * 16 * 16 + 5 * T * D + D * 1000
BASELINE_COMPLEXITY = 1.72e10  # configs/experiment/imagenet/vit/vit-b-gaudi.yaml


pytestmark = pytest.mark.usefixtures("one_thread")


def structure_only(model: nn.Module) -> nn.Module:
    """Materialise a meta model with zero weights and the GBLR layers' initial structure."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for layer in gblr_layers(model):
        layer.sigma.fill_(math.inf)
        layer.reset_structure()
    return model.eval()


def hand_count(model: nn.Module, dense_leaves: int, tokens: int) -> int:
    """Multiply-adds from the hard widths: a rank-1 component with a output rows and b input
    columns (rounded widths) costs min(a + b, a b) if both exceed one element, times the patch
    tokens; then the official rule that fc1/fc2 (and q/k with v) vanish together."""
    per_layer = {}
    for name, layer in model.named_modules():
        if isinstance(layer, GaudiGBLRLinear):
            b = torch.round(layer.widths[0].detach() * layer.in_features)
            a = torch.round(layer.widths[1].detach() * layer.out_features)
            live = (a > 1) & (b > 1)
            per_layer[name] = tokens * int(torch.where(live, torch.minimum(a + b, a * b), 0).sum())
    for name in list(per_layer):
        block = name.rsplit(".", 1)[0]
        if name.endswith("fc2") and 0 in (per_layer[name], per_layer[block + ".fc1"]):
            per_layer[name] = per_layer[block + ".fc1"] = 0
        if name.endswith("v_proj") and per_layer[name] == 0:
            per_layer[block + ".q_proj"] = per_layer[block + ".k_proj"] = 0
    return dense_leaves + sum(per_layer.values())


def small(**kwargs) -> GBLRVisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kwargs)
    torch.manual_seed(0)
    return GBLRVisionTransformer(**args)


# ---- layout --------------------------------------------------------------------------------


def test_official_layout_and_parameter_count():
    model = vit_base_patch16_224_gblr(device="meta")
    assert sum(p.numel() for p in model.parameters()) == 122_141_416
    block = model.blocks[0]
    assert isinstance(block.attn, GBLRAttention)
    assert type(block.attn.proj) is nn.Linear  # official: attn.proj stays dense
    shapes = {"attn.q_proj": (D, D), "attn.k_proj": (D, D), "attn.v_proj": (D, D),
              "mlp.fc1": (D, H), "mlp.fc2": (H, D)}
    layers = dict(block.named_modules())
    for name, (fan_in, fan_out) in shapes.items():
        layer = layers[name]
        assert isinstance(layer, GaudiGBLRLinear), name
        assert (layer.in_features, layer.out_features) == (fan_in, fan_out)
        assert (layer.rank_per_component, layer.num_components) == (1, min(fan_in, fan_out))
        assert layer.width_init == "splr" and layer.location_init == 0.0
        assert layer.gaussian and layer.bias is not None
    # the official state-dict keys of a block (a Lightning checkpoint adds the prefix "model.")
    gblr_keys = ("widths", "locations", "lr_weight1", "lr_weight2", "bias", "freq_in", "freq_out", "sigma")
    expected = {f"{n}.{k}" for n in shapes for k in gblr_keys}
    expected |= {f"{n}.{k}" for n in ("norm1", "norm2", "attn.proj") for k in ("weight", "bias")}
    assert {k.split(".", 2)[2] for k in model.state_dict() if k.startswith("blocks.0.")} == expected
    assert sum(isinstance(m, GaudiGBLRLinear) for m in model.modules()) == 60
    assert {k for k in model.state_dict() if not k.startswith("blocks.")} == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_small_model_trains_and_initialises_as_official():
    model = small()
    layer = model.blocks[0].mlp.fc2
    assert float(layer.sigma) == 10.0 and torch.equal(layer.bias, torch.zeros_like(layer.bias))
    # set_weights_from_dense_init: K r = min(in, out), so the factors hold the whole dense
    # trunc_normal(std=0.02) draw (timm's truncation is at +-2, i.e. none)
    dense = torch.einsum("kor,kri->oi", layer.lr_weight2, layer.lr_weight1).detach()
    assert 0.017 < float(dense.std()) < 0.023 and abs(float(dense.mean())) < 0.002
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, 5)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[1].attn.q_proj.widths.grad.abs().sum() > 0
    # FSDP2 recipe: build on meta, to_empty, reset_parameters restores buffers and structure
    meta = small(sigma=None, device="meta")
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    layer = meta.blocks[0].attn.v_proj
    assert float(layer.sigma) == math.inf and not layer.gaussian
    torch.testing.assert_close(layer.freq_in, torch.arange(17.0))
    fresh = small(sigma=None)
    torch.testing.assert_close(layer.widths, fresh.blocks[0].attn.v_proj.widths)


def test_forward_equals_the_dense_vit_with_the_gblr_weights():
    """Eval mode: the GBLR ViT computes the dense ViT whose linears are the GBLR layers'
    ``to_linear()`` (q, k, v stacked into timm's ``qkv``; heads split as the official
    ``rearrange('b n (h d) -> b h n d')``)."""
    model = small(location_init="unif").double().eval()
    with torch.no_grad():
        for layer in gblr_layers(model):
            layer.widths.uniform_(0.2, 1.0)
            layer.bias.normal_()
    dense = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=5, dtype=torch.float64).eval()
    state = {k: v for k, v in model.state_dict().items() if ".attn." not in k and ".mlp." not in k}
    for i, block in enumerate(model.blocks):
        q, k, v = (block.attn.q_proj.to_linear(), block.attn.k_proj.to_linear(), block.attn.v_proj.to_linear())
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
        state[f"blocks.{i}.attn.proj.weight"] = block.attn.proj.weight
        state[f"blocks.{i}.attn.proj.bias"] = block.attn.proj.bias
        for fc in ("fc1", "fc2"):
            linear = getattr(block.mlp, fc).to_linear()
            state[f"blocks.{i}.mlp.{fc}.weight"], state[f"blocks.{i}.mlp.{fc}.bias"] = linear.weight, linear.bias
    dense.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-10, atol=1e-10)


# ---- the official count --------------------------------------------------------------------


def test_splr_init_count_is_the_official_number():
    """At the 'splr' init with the Gaussian off, each 768x768 layer costs exactly the dense
    768^2 per patch token and fc1/fc2 768 x 3072 - 256 (int(768 * 0.4) = 307 full components);
    the leaf sum is 16.788 G, 97.6 % of the official baseline 1.72e10."""
    model = structure_only(vit_base_patch16_224_gblr(sigma=None, device="meta"))
    assert model.blocks[0].attn.q_proj.macs_per_token() == D * D
    assert model.blocks[0].mlp.fc1.macs_per_token() == D * H - 256
    assert model.blocks[0].mlp.fc2.macs_per_token() == D * H - 256
    count = official_complexity(model, IMAGE)
    assert count == DENSE_LEAVES + 12 * P * (3 * D * D + 2 * (D * H - 256)) == 16_788_351_744
    assert count == hand_count(model, DENSE_LEAVES, P)
    assert round(count / BASELINE_COMPLEXITY, 4) == 0.9761


def test_dense_baseline_is_the_yaml_constant():
    """``baseline_complexity: 1.72e10`` is fvcore's ``total()`` of the official dense ViT-B:
    every leaf (the same dense count as ``official_complexity``'s) plus the attention x V
    ``matmul`` of the attention modules; QK^T is a ``torch.baddbmm``, which fvcore does not
    count."""
    dense = vit_base_patch16_224(device="meta").to_empty(device="cpu").eval()
    leaves = official_complexity(dense, IMAGE, num_tokens=P)
    linears = 12 * T * (4 * D * D + 2 * D * H)
    assert leaves == DENSE_LEAVES - 12 * T * D * D + linears == 16_867_412_736
    attn_v = 12 * 12 * T * T * (D // 12)
    fvcore_total = leaves + attn_v
    assert fvcore_total == 17_225_076_480
    assert float(f"{fvcore_total:.3g}") == BASELINE_COMPLEXITY


def test_count_after_proximal_step_matches_hand_count():
    """The targeted proximal step drives the mean width below the target, then pauses; the
    official count is then the hand count from the hard widths (random locations: intervals wrap)."""
    torch.manual_seed(0)
    model = structure_only(vit_base_patch16_224_gblr(sigma=None, location_init="unif", device="meta"))
    for layer in gblr_layers(model):  # uneven widths, so layers shrink to different costs
        with torch.no_grad():
            layer.widths.mul_(torch.empty_like(layer.widths).uniform_(0.6, 1.0))
    target, thres = 0.2, 0.03
    steps = 0
    while soft_shrink_widths(model, lr=1.0, thres=thres, target_width=target) > 0:
        steps += 1
        assert steps < 50
    assert target - thres < mean_width(model) < target
    count = official_complexity(model, IMAGE)
    assert count == hand_count(model, DENSE_LEAVES, P)
    assert 0 < count - DENSE_LEAVES < 0.5 * 12 * P * (3 * D * D + 2 * D * H)
    assert soft_shrink_widths(model, lr=1.0, thres=thres, target_width=target) == 0.0


def test_zeroing_rules_and_arguments():
    model = small(sigma=None).eval()
    x = torch.randn(1, 3, 32, 32)
    # small(): 16 patch tokens + class token, width 32, 2 blocks, 5 classes
    dense_leaves = 2 * (17 * 32 * 32 + 2 * 5 * 17 * 32) + 16 * 32 * 3 * 8 * 8 + 5 * 17 * 32 + 32 * 5
    full = official_complexity(model, x)
    assert full == hand_count(model, dense_leaves, 16)
    block = model.blocks[1]
    layers = (block.mlp.fc1, block.mlp.fc2, block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)
    gone = 16 * sum(m.macs_per_token() for m in layers)
    with torch.no_grad():
        block.mlp.fc2.widths[1].zero_()  # fc2 empty: fc1 counts 0 too
        block.attn.v_proj.widths[0].zero_()  # v empty: q and k count 0 too
    assert block.mlp.fc1.macs_per_token() > 0 and block.attn.q_proj.macs_per_token() > 0
    assert official_complexity(model, x) == full - gone == hand_count(model, dense_leaves, 16)
    assert official_complexity(model, x, num_tokens=17) > official_complexity(model, x)
    with pytest.raises(ValueError, match="num_tokens"):
        official_complexity(nn.Sequential(GaudiGBLRLinear(8, 8)), torch.randn(2, 8))
    with pytest.raises(ValueError, match="num_tokens must be a positive int, got 0"):
        official_complexity(model, x, num_tokens=0)


def test_matches_fvcore_leaf_sum():
    """The official recipe run with fvcore itself (``by_module()`` of the leaves, GBLR modules
    replaced by patch tokens x ``macs_per_token``) gives the same number."""
    fvcore = pytest.importorskip("fvcore.nn")
    torch.manual_seed(1)
    model = small(sigma=None, location_init="unif").eval()
    with torch.no_grad():
        for layer in gblr_layers(model):
            layer.widths.uniform_(0.0, 1.0)
    x = torch.ones(1, 3, 32, 32)
    fca = fvcore.FlopCountAnalysis(model, x)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    per_module = fca.by_module()
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, GaudiGBLRLinear):
            total += 16 * module.macs_per_token()
        elif next(module.children(), None) is None:
            total += per_module[name]
    assert official_complexity(model, x) == total
