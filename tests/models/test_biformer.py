"""BiFormer-T/S/B: parameter and FLOP counts against the official README, the official
state-dict keys, official checkpoint loading, multi-scale features and padding.

The expected counts and keys below are written from the structure of the official
``models/biformer.py`` / ``models/_common.py`` / ``ops/bra_legacy.py`` (rayleizhu/BiFormer
``1697bbb``), not from effnn's modules.
"""

from __future__ import annotations

import argparse
import copy
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import effnn
from effnn.models import BiFormer, biformer_base, biformer_small, biformer_tiny
from effnn.models.biformer import (
    AttentionLePE,
    LayerNorm2d,
    checkpoint_filter_fn,
    load_official_checkpoint,
)

F64 = torch.float64
FACTORIES = {"tiny": biformer_tiny, "small": biformer_small, "base": biformer_base}
CONFIGS = {  # official factories: depth, embed_dim (= qk_dims); mlp ratio 3, heads qk_dim // 32
    "tiny": ((2, 2, 8, 2), (64, 128, 256, 512)),
    "small": ((4, 4, 18, 4), (64, 128, 256, 512)),
    "base": ((4, 4, 18, 4), (96, 192, 384, 768)),
}
README = {"tiny": ("13.1M", "2.2G"), "small": ("25.5M", "4.5G"), "base": ("56.8M", "9.8G")}
RESEARCH = {"tiny": (13.14, 2.228), "small": (25.54, 4.487), "base": (56.80, 9.795)}  # official fvcore
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


pytestmark = pytest.mark.usefixtures("one_thread")


def nparams(model) -> int:
    return sum(p.numel() for p in model.parameters())


def official_params(depth, dims, num_classes=1000) -> int:
    """The official model's parameters, counted from its layers."""
    c0 = dims[0]
    n = 3 * (c0 // 2) * 9 + (c0 // 2) + 2 * (c0 // 2) + (c0 // 2) * c0 * 9 + c0 + 2 * c0  # stem
    n += sum(dims[i] * dims[i + 1] * 9 + dims[i + 1] + 2 * dims[i + 1] for i in range(3))  # merging
    for i, (d, c) in enumerate(zip(depth, dims, strict=True)):
        block = 10 * c + 2 * c + 2 * c + (3 * c * c + 3 * c) + (3 * c * c + c)  # pos_embed, norms, mlp
        block += 3 * c * c + c * c + c + 26 * c  # qkv, out projection (wo / proj), lepe 5x5
        block += 3 * c if i < 3 else 0  # BRA's qkv has a bias, AttentionLePE's has not
        n += d * block
    return n + 2 * dims[3] + dims[3] * num_classes + num_classes  # final BN, head


def official_fvcore_flops(depth, dims, size=224) -> int:
    """fvcore's count of the official model at size x size (multiply-adds of convs and linears,
    2 per element of an eval BatchNorm, 5 per element of a LayerNorm; BRA as the issue's
    formula, stage 4's two attention products in full; GELU, adds, means, softmax and top-k are
    not counted)."""
    s = size // 2
    c0 = dims[0]
    f = s * s * (c0 // 2) * 27 + 2 * s * s * (c0 // 2)  # stem conv 1 + BN
    hw = (size // 4) ** 2
    f += hw * c0 * (c0 // 2) * 9 + 2 * hw * c0  # stem conv 2 + BN
    topks, n_win = (1, 4, 16), 7
    for i, (d, c) in enumerate(zip(depth, dims, strict=True)):
        if i:
            hw //= 4
            f += hw * c * dims[i - 1] * 9 + 2 * hw * c  # merging conv + BN
        block = 9 * hw * c + 2 * 5 * hw * c + 6 * hw * c * c  # pos_embed, norm1/2, MLP (ratio 3)
        block += 4 * hw * c * c + 25 * hw * c  # qkv, wo / proj, LCE / LePE
        if i < 3:
            block += n_win**4 * c + 2 * topks[i] * hw * hw * c // n_win**2  # routing, attention
        else:
            block += 2 * hw * hw * c  # full attention
        f += d * block
    return f + 2 * hw * dims[3] + dims[3] * 1000  # final BN, head


def as_printed(value: float, printed: str) -> str:
    unit = {"M": 1e6, "G": 1e9}[printed[-1]]
    decimals = len(printed[:-1].split(".")[1])
    return f"{value / unit:.{decimals}f}{printed[-1]}"


# ---- parameters and FLOPs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", FACTORIES)
def test_parameter_count_is_official(name):
    model = FACTORIES[name](device="meta")
    n = nparams(model)
    assert n == official_params(*CONFIGS[name])
    assert n == {"tiny": 13_142_760, "small": 25_536_232, "base": 56_804_968}[name]
    assert round(n / 1e6, 2) == RESEARCH[name][0]
    assert as_printed(n, README[name][0]) == README[name][0]



@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", FACTORIES)
def test_fvcore_flops_are_official(name):
    """fvcore (the official counter, ``main.py``) at 224x224, eval mode, with effnn's handles."""
    fvcore_nn = pytest.importorskip("fvcore.nn")
    model = FACTORIES[name](device="meta").to_empty(device="cpu").eval()
    with torch.no_grad():  # values do not change the count; zeros are quicker than an init
        for t in model.state_dict().values():
            t.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(1)
    analysis = fvcore_nn.FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
    analysis.set_op_handle(**effnn.flops.fvcore_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    flops = analysis.total()
    assert flops == official_fvcore_flops(*CONFIGS[name])
    assert round(flops / 1e9, 3) == RESEARCH[name][1]
    assert as_printed(flops, README[name][1]) == README[name][1]


# ---- official keys ----------------------------------------------------------------------------


def official_keys(depth, features_only=False) -> list[str]:
    """The official state-dict keys in order (``BiFormer`` / ``BiFormer_mm``)."""
    keys = [f"downsample_layers.0.{i}.{p}" for i, ps in ((0, ("weight", "bias")), (1, BN),
                                                           (3, ("weight", "bias")), (4, BN)) for p in ps]
    for s in (1, 2, 3):
        keys += [f"downsample_layers.{s}.0.weight", f"downsample_layers.{s}.0.bias"]
        keys += [f"downsample_layers.{s}.1.{p}" for p in BN]
    for s, d in enumerate(depth):
        attn = (["lepe.weight", "lepe.bias", "qkv.qkv.weight", "qkv.qkv.bias", "wo.weight", "wo.bias"]
                if s < 3 else ["qkv.weight", "proj.weight", "proj.bias", "lepe.weight", "lepe.bias"])
        for j in range(d):
            b = f"stages.{s}.{j}."
            keys += [b + "pos_embed.weight", b + "pos_embed.bias", b + "norm1.weight", b + "norm1.bias"]
            keys += [b + "attn." + a for a in attn]
            keys += [b + k for k in ("norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias",
                                     "mlp.3.weight", "mlp.3.bias")]
    if features_only:
        return keys + [f"extra_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    return keys + [f"norm.{p}" for p in BN] + ["head.weight", "head.bias"]


@pytest.mark.parametrize("name", FACTORIES)
def test_state_dict_keys_are_official(name):
    depth, dims = CONFIGS[name]
    sd = FACTORIES[name](device="meta").state_dict()
    assert list(sd) == official_keys(depth)
    assert len(sd) == {"tiny": 264, "small": 518, "base": 518}[name]
    c0, c = dims[0], dims
    shapes = {
        "downsample_layers.0.0.weight": (c0 // 2, 3, 3, 3),
        "downsample_layers.0.3.weight": (c0, c0 // 2, 3, 3),
        "downsample_layers.3.0.weight": (c[3], c[2], 3, 3),
        "stages.0.0.pos_embed.weight": (c0, 1, 3, 3),
        "stages.0.0.attn.qkv.qkv.weight": (3 * c0, c0),
        "stages.0.0.attn.qkv.qkv.bias": (3 * c0,),
        "stages.2.7.attn.wo.weight": (c[2], c[2]),
        "stages.2.7.attn.lepe.weight": (c[2], 1, 5, 5),
        "stages.1.1.mlp.0.weight": (3 * c[1], c[1]),
        "stages.1.1.mlp.3.weight": (c[1], 3 * c[1]),
        "stages.3.1.attn.qkv.weight": (3 * c[3], c[3]),
        "stages.3.1.attn.proj.weight": (c[3], c[3]),
        "stages.3.1.attn.lepe.weight": (c[3], 1, 5, 5),
        "norm.running_var": (c[3],),
        "head.weight": (1000, c[3]),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_heads_and_configuration_are_official():
    for name, heads in (("tiny", (2, 4, 8)), ("base", (3, 6, 12))):
        model = FACTORIES[name](device="meta")
        for s in range(3):
            attn = model.stages[s][0].attn
            assert isinstance(attn, effnn.BiLevelRoutingAttention)
            assert (attn.num_heads, attn.n_win, attn.topk, attn.side_dwconv) == (heads[s], 7, (1, 4, 16)[s], 5)
            assert attn.scale == pytest.approx(attn.qk_dim ** -0.5)  # the full qk width
            assert attn.kv_downsample_mode == "identity" and not attn.param_routing
        attn = model.stages[3][0].attn
        assert isinstance(attn, AttentionLePE) and attn.num_heads == 8 and attn.qkv.bias is None
    small = biformer_small(device="meta", drop_path_rate=0.15)
    rates = [b.drop_path for stage in small.stages for b in stage]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.15) and len(rates) == 30


# ---- official checkpoints ---------------------------------------------------------------------


def small_model(**kwargs) -> BiFormer:
    args = dict(depth=(1, 1, 1, 1), embed_dim=(32, 64, 96, 128), n_win=2, topks=(1, 2, 4, -2),
                num_classes=10)
    return BiFormer(**{**args, **kwargs})


def test_official_checkpoint_files_load(tmp_path):
    """A training checkpoint as ``main.py`` saves it (weights under "model", the argparse args
    beside them) loads without unpickling anything else; a features-only model takes an ImageNet
    checkpoint (keeping its own extra norms) and an mmdet/mmseg one (``backbone.`` prefix)."""
    torch.manual_seed(0)
    src = small_model().eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict(), "epoch": 3, "args": argparse.Namespace(model="x", lr=5e-4)}, path)
    dst = small_model().eval()
    load_official_checkpoint(dst, str(path))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)

    feats = small_model(features_only=True)
    load_official_checkpoint(feats, str(path))
    torch.testing.assert_close(feats.stages[3][0].attn.qkv.weight, src.stages[3][0].attn.qkv.weight)

    mm = {"state_dict": {**{"backbone." + k: v for k, v in feats.state_dict().items()},
                         "neck.lateral_convs.0.conv.weight": torch.zeros(1)}}
    assert checkpoint_filter_fn(mm, feats).keys() == feats.state_dict().keys()
    small_model(features_only=True).load_state_dict(checkpoint_filter_fn(mm), strict=True)

    bad = small_model(depth=(1, 1, 2, 1))
    with pytest.raises(RuntimeError, match="does not match"):
        load_official_checkpoint(bad, str(path))


def test_pretrained_needs_a_local_file(tmp_path):
    with pytest.raises(ValueError, match="local file"):
        biformer_tiny(pretrained=True, device="meta")


def test_timm_create_model():
    timm = pytest.importorskip("timm")
    assert {"biformer_tiny", "biformer_small", "biformer_base"} <= set(timm.list_models("biformer*"))
    with torch.device("meta"):
        model = timm.create_model("biformer_tiny", num_classes=10, features_only=True)
    assert isinstance(model, BiFormer) and model.features_only
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


# ---- forward, features, padding --------------------------------------------------------------


def test_attention_lepe_is_the_official_formula():
    """Full attention + LePE on the attention's input, written out as the official module does."""
    torch.manual_seed(0)
    attn = AttentionLePE(16, num_heads=4, side_dwconv=5).to(F64)
    x = torch.randn(2, 3, 5, 16, dtype=F64)
    n, h, w, c = x.shape
    t = x.reshape(n, h * w, c)
    q, k, v = (attn.qkv(t).reshape(n, h * w, 3, 4, 4).permute(2, 0, 3, 1, 4))
    a = ((q @ k.transpose(-2, -1)) * 4 ** -0.5).softmax(-1)
    out = (a @ v).transpose(1, 2).reshape(n, h * w, c)
    lepe = attn.lepe(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
    expected = attn.proj(out + lepe).reshape(n, h, w, c)
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-12)


def test_layernorm2d_is_timms():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    ours, theirs = LayerNorm2d(8), timm_layers.LayerNorm2d(8)
    with torch.no_grad():
        for p in (*ours.parameters(), *theirs.parameters()):
            p.copy_(torch.arange(8.0) / 8 + 0.5)
    x = torch.randn(2, 8, 5, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_classifier_forward_and_backward():
    torch.manual_seed(0)
    model = small_model(drop_path_rate=0.2)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not torch.equal(model(x), model(x))  # stochastic depth in training
    model.eval()
    assert torch.equal(model(x), model(x))  # and not in eval


def test_round_trips(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = small_model(features_only=True, auto_pad="masked").eval()
    x = torch.randn(1, 3, 40, 56)
    expected = model(x)
    safetensors_torch.save_file(model.state_dict(), tmp_path / "m.safetensors")
    other = small_model(features_only=True, auto_pad="masked").eval()
    other.load_state_dict(safetensors_torch.load_file(tmp_path / "m.safetensors"), strict=True)
    for copy_ in (other, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for a, b in zip(copy_(x), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    as_f64 = model.to(F64)(x.to(F64))
    for a, b in zip(as_f64, expected, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-4)


def test_biformer_tiny_runs_at_224():
    torch.manual_seed(0)
    model = biformer_tiny(num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("auto_pad", [True, "masked", "nchw"])
def test_features_any_input_size(auto_pad):
    """The dense-task backbone (official detection config: n_win 16 ... here 2) on a size no
    stage divides: four normalised NCHW maps of strides 4 to 32."""
    torch.manual_seed(0)
    model = small_model(features_only=True, auto_pad=auto_pad).eval()
    x = torch.randn(2, 3, 50, 75)
    with torch.no_grad():
        maps = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 13, 19), (2, 64, 7, 10), (2, 96, 4, 5), (2, 128, 2, 3)]
    assert [f["num_chs"] for f in model.feature_info] == [32, 64, 96, 128]
    stages = model.forward_stages(x)
    for m, s, norm in zip(maps, stages, model.extra_norms, strict=True):  # extra norms on the stage outputs
        torch.testing.assert_close(m, F.layer_norm(s.permute(0, 2, 3, 1), (s.shape[1],), norm.weight,
                                                   norm.bias, 1e-6).permute(0, 3, 1, 2))


def test_features_keys_are_the_dense_wrappers():
    model = biformer_small(features_only=True, auto_pad=True, n_win=16, device="meta")
    assert list(model.state_dict()) == official_keys(CONFIGS["small"][0], features_only=True)


def test_non_divisible_input_without_padding_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match=r"50x75 input gives a 13x19 map at stage 1.*auto_pad"):
        model(torch.randn(1, 3, 50, 75))
    model(torch.randn(1, 3, 64, 32))  # divisible: runs


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="one entry per stage"):
        BiFormer(depth=(1, 1), embed_dim=(32, 64, 96), device="meta")
    with pytest.raises(ValueError, match=r"topks\[3\]=-1"):
        BiFormer(topks=(1, 4, 16, -1), device="meta")
    with pytest.raises(ValueError, match="auto_pad"):
        BiFormer(auto_pad="reflect", device="meta")


# ---- data parallel (STANDARDS 10) ---------------------------------------------------------------


def _ddp_model() -> BiFormer:
    # eval mode: the BatchNorms then use their running statistics, so the gradient of a batch is
    # the mean of its halves' gradients (train-mode BatchNorm needs SyncBatchNorm for that)
    torch.manual_seed(7)
    return small_model().eval()


def _ddp_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)


def _ddp_worker(rank, tmp):
    """DDP, then FSDP2 (each stage and the root sharded), each rank on its half of the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _ddp_data()
    half = slice(2 * rank, 2 * rank + 2)
    grads = {}
    model = _ddp_model()
    ddp = DDP(model)  # kept in a variable: the reducer must outlive the backward
    F.cross_entropy(ddp(x[half]), y[half]).backward()
    grads["ddp"] = {n: p.grad for n, p in model.named_parameters()}
    model = _ddp_model()
    mesh = init_device_mesh("cpu", (2,))
    for stage in model.stages:
        fully_shard(stage, mesh=mesh)
    fully_shard(model, mesh=mesh)
    F.cross_entropy(model(x[half]), y[half]).backward()
    grads["fsdp2"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.save(grads, tmp / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_and_fsdp2_gradients_match_one_process(tmp_path):
    from tests.integration.test_distributed import run_workers

    results = run_workers(_ddp_worker, tmp_path)
    model = _ddp_model()
    x, y = _ddp_data()
    F.cross_entropy(model(x), y).backward()
    for rank, res in enumerate(results):
        for wrapper in ("ddp", "fsdp2"):
            for name, p in model.named_parameters():
                torch.testing.assert_close(res[wrapper][name], p.grad, rtol=1e-5, atol=1e-6,
                                           msg=f"{wrapper} rank {rank}: {name}")
