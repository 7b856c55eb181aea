import pytest
import torch
from torch import nn

import effnn
from effnn import MonarchConfig, MonarchLinear, swap_linear


class Block(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, dim=32, depth=2, classes=10):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def swapped_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, MonarchLinear))


def test_default_swaps_every_linear_and_keeps_interface():
    model = Net()
    swap_linear(model, MonarchConfig(nblocks=4))
    assert len(swapped_names(model)) == 2 * 4 + 1
    assert model.head.in_features == 32 and model.head.out_features == 10
    assert model(torch.randn(2, 5, 32)).shape == (2, 10)


def test_target_modules_rules():
    cfg = MonarchConfig(nblocks=4, init="random")
    m = swap_linear(Net(), cfg, target_modules="all-linear")
    assert "head" not in swapped_names(m) and len(swapped_names(m)) == 8
    m = swap_linear(Net(), cfg, target_modules=["proj", "mlp.0"])  # suffixes
    assert swapped_names(m) == ["blocks.0.mlp.0", "blocks.0.proj", "blocks.1.mlp.0", "blocks.1.proj"]
    m = swap_linear(Net(), cfg, target_modules=r"blocks\.1\..*")  # regex on the full name
    assert swapped_names(m) == ["blocks.1.mlp.0", "blocks.1.mlp.2", "blocks.1.proj", "blocks.1.qkv"]
    m = swap_linear(Net(), cfg, target_modules="all-linear", exclude_modules=["qkv"])
    assert len(swapped_names(m)) == 6
    m = swap_linear(Net(), cfg, filter_fn=lambda mod, fqn: mod.out_features == 128)
    assert swapped_names(m) == ["blocks.0.mlp.0", "blocks.1.mlp.0"]


def test_nothing_matched_fails_loudly():
    with pytest.raises(ValueError, match="no nn.Linear matched.*blocks.0.qkv"):
        swap_linear(Net(), MonarchConfig(), target_modules=["nonexistent"])
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        swap_linear(nn.Sequential(nn.ReLU()), MonarchConfig())
    with pytest.raises(TypeError, match="itself an nn.Linear"):
        swap_linear(nn.Linear(4, 4), MonarchConfig())
    with pytest.raises(TypeError, match="config must be"):
        swap_linear(Net(), {"nblocks": 4})
    with pytest.raises(ValueError, match="nblocks must be a positive int"):
        MonarchConfig(nblocks=0)
    with pytest.raises(ValueError, match="init must be"):
        MonarchConfig(init="svd")


def test_project_init_keeps_function_of_monarch_weights():
    # A model whose linears are already Monarch matrices is unchanged by a projecting swap.
    model = Net().double()
    for mod in list(model.modules()):
        if isinstance(mod, nn.Linear):
            mon = MonarchLinear(mod.in_features, mod.out_features, nblocks=4, dtype=torch.float64)
            with torch.no_grad():
                mod.weight.copy_(mon.dense_weight())
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    before = model(x)
    swap_linear(model, MonarchConfig(nblocks=4, init="project"))
    torch.testing.assert_close(model(x), before)


def test_keeps_dtype_and_works_on_meta():
    model = Net().to(torch.bfloat16)
    swap_linear(model, MonarchConfig(nblocks=4))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.device("meta"):
        meta = Net()
    swap_linear(meta, MonarchConfig(nblocks=4))
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    for mod in meta.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    assert torch.isfinite(meta(torch.randn(2, 3, 32))).all()


def test_save_load_round_trip_into_fresh_model(tmp_path):
    pytest.importorskip("safetensors")
    model = swap_linear(Net(), MonarchConfig(nblocks=4), target_modules="all-linear")
    x = torch.randn(2, 5, 32)
    path = tmp_path / "model.safetensors"
    effnn.save(model, path)
    fresh = effnn.load(Net(), path)
    assert swapped_names(fresh) == swapped_names(model)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="not written by effnn.save"):
        import safetensors.torch

        safetensors.torch.save_file({"a": torch.zeros(1)}, tmp_path / "plain.safetensors")
        effnn.load(Net(), tmp_path / "plain.safetensors")


def test_timm_vit_swap_trains_and_round_trips(tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    swap_linear(model, MonarchConfig(nblocks=4), target_modules="all-linear")
    assert isinstance(model.head, nn.Linear)
    assert len(swapped_names(model)) == n_linear - 1
    x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    effnn.save(model, tmp_path / "vit.safetensors")
    fresh = effnn.load(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw), tmp_path / "vit.safetensors")
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
