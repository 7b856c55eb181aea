"""insert_cb / remove_cb on real models: the paper's placement (after every block's MLP, before
the residual addition), state_dict unchanged, round trips, compile/export, DDP/FSDP2, the benchmark
case and a shortened run of examples/cb_digits.py."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from effnn import ContextBroadcast, insert_cb, remove_cb
from tests.examples import load_example
from tests.nn.test_broadcast import cb_naive

timm_vit = pytest.importorskip("timm.models.vision_transformer")



def tiny_vit(depth: int = 3, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(
        img_size=16, patch_size=4, num_classes=5, embed_dim=16, depth=depth, num_heads=2, **kwargs
    )
    return model.eval()


def naive_forward(model: nn.Module, x: torch.Tensor, cb_layers) -> torch.Tensor:
    """timm's VisionTransformer forward written out, with the paper's CB (naive loops) applied to
    the MLP branch of the blocks in ``cb_layers`` right before its residual addition."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for i, blk in enumerate(model.blocks):
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        branch = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        x = x + (cb_naive(branch) if i in cb_layers else branch)
    return model.forward_head(model.norm(x))


def cb_sites(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ContextBroadcast)]


@pytest.mark.parametrize("layer_scale", [None, 0.3])
def test_timm_vit_matches_paper_placement_fp64(layer_scale):
    plain = tiny_vit(init_values=layer_scale).double()
    model = copy.deepcopy(plain)
    assert insert_cb(model) is model
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    # CB on the MLP output equals CB right before the residual add (LayerScale commutes with it)
    torch.testing.assert_close(model(x), naive_forward(plain, x, {0, 1, 2}), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model(x), plain(x))
    assert cb_sites(model) == [f"blocks.{i}.mlp.context_broadcast" for i in range(3)]


def test_layers_subset_and_negative_indices():
    plain = tiny_vit(depth=4).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model = insert_cb(copy.deepcopy(plain), layers=[0, -1])
    assert cb_sites(model) == ["blocks.0.mlp.context_broadcast", "blocks.3.mlp.context_broadcast"]
    torch.testing.assert_close(model(x), naive_forward(plain, x, {0, 3}), rtol=1e-12, atol=1e-12)
    # more blocks later, then all of them removed
    insert_cb(model, layers=[1, 2])
    torch.testing.assert_close(model(x), naive_forward(plain, x, {0, 1, 2, 3}), rtol=1e-12, atol=1e-12)


def test_state_dict_unchanged_and_round_trips(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    plain = tiny_vit()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    n_params = sum(p.numel() for p in plain.parameters())
    model = insert_cb(copy.deepcopy(plain))
    sd = model.state_dict()
    assert list(sd) == list(before)
    assert all(torch.equal(sd[k], v) for k, v in before.items())
    assert sum(p.numel() for p in model.parameters()) == n_params
    x = torch.randn(2, 3, 16, 16)
    y = model(x)

    # a plain checkpoint loads strictly into the CB model, and the CB model's into a plain one
    fresh = insert_cb(tiny_vit())
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh(x), y)
    st.save_file(model.state_dict(), tmp_path / "cb.safetensors")
    other = tiny_vit()
    other.load_state_dict(st.load_file(tmp_path / "cb.safetensors"))
    assert torch.equal(insert_cb(other)(x), y)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)

    # the CB travels with the model
    assert torch.equal(copy.deepcopy(model)(x), y)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), y)
    wide = copy.deepcopy(model).to(torch.float64)
    torch.testing.assert_close(wide(x.double()).float(), y, rtol=1e-5, atol=1e-5)

    # removal restores the plain model exactly; insertion works again afterwards
    assert remove_cb(model) is model
    assert cb_sites(model) == [] and torch.equal(model(x), plain(x))
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(insert_cb(model)(x), y)


def test_meta_device_model():
    with torch.device("meta"):
        model = timm_vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    insert_cb(model)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 1000)


def test_hugging_face_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4,
    )
    torch.manual_seed(0)
    plain = transformers.ViTModel(config, add_pooling_layer=False).eval()
    block_list = "layers" if hasattr(plain, "layers") else "encoder.layer"
    # transformers >= 5: ViTLayer.mlp is the MLP branch; 4.x: ViTOutput adds the residual inside,
    # so the branch ends at its dropout
    mlp = "mlp" if hasattr(plain.get_submodule(block_list)[0], "mlp") else "output.dropout"
    keys = list(plain.state_dict())
    model = insert_cb(copy.deepcopy(plain), blocks=block_list, mlp=mlp)
    assert list(model.state_dict()) == keys
    assert len(cb_sites(model)) == 2

    # reference: the naive CB hooked by hand on the plain model's MLP branches
    for blk in plain.get_submodule(block_list):
        blk.get_submodule(mlp).register_forward_hook(lambda m, args, out: cb_naive(out))
    x = torch.randn(2, 3, 8, 8)
    ref = plain(pixel_values=x).last_hidden_state
    torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ref)


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        return x + self.mlp(self.norm2(x))


class _Net(nn.Module):
    """A minimal transformer with a list of blocks (not timm)."""

    def __init__(self, dim: int = 16, depth: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(1))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = insert_cb(_Net())
    x = torch.randn(2, 7, 16, requires_grad=True)
    y_c = torch.compile(model, fullgraph=True)(x)
    y_e = model(x)
    torch.testing.assert_close(y_c, y_e)
    g = torch.randn_like(y_e)
    inputs = (x, *model.parameters())
    for a, b in zip(torch.autograd.grad(y_c, inputs, g), torch.autograd.grad(y_e, inputs, g),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_torch_export_of_timm_vit_matches_eager():
    model = insert_cb(tiny_vit())
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    # the hooks are in the graph: one token mean per block (the head pools the class token)
    means = [n for n in exported.graph.nodes if n.op == "call_function" and "mean" in str(n.target)]
    assert len(means) == 3


def test_bad_input_errors():
    model = tiny_vit(depth=2)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        insert_cb("vit")
    with pytest.raises(TypeError, match="mlp must be a non-empty string"):
        insert_cb(model, mlp="")
    with pytest.raises(TypeError, match="token_dim must be"):
        insert_cb(model, token_dim=1.0)
    with pytest.raises(ValueError, match="found no nn.ModuleList/nn.Sequential .* submodule 'ffn'"):
        insert_cb(model, mlp="ffn")
    with pytest.raises(ValueError, match=r"blocks='layers' must name .* found nothing"):
        insert_cb(model, blocks="layers")
    with pytest.raises(ValueError, match=r"blocks='head' must name .* found Linear"):
        insert_cb(model, blocks="head")
    with pytest.raises(TypeError, match="blocks must be a string or a list of strings"):
        insert_cb(model, blocks=[0])
    with pytest.raises(ValueError, match=r"block blocks.0 has no submodule 'ffn' \(its children: norm1"):
        insert_cb(model, blocks="blocks", mlp="ffn")
    with pytest.raises(ValueError, match="layer index 2 is out of range for 2 blocks"):
        insert_cb(model, layers=[2])
    with pytest.raises(TypeError, match="layers must be ints"):
        insert_cb(model, layers=[0.0])
    with pytest.raises(ValueError, match="layers is empty"):
        insert_cb(model, layers=[])
    with pytest.raises(ValueError, match="the model has no Context Broadcasting to remove"):
        remove_cb(model)
    assert cb_sites(model) == []  # nothing was half-inserted by the failed calls
    insert_cb(model, layers=[1])
    with pytest.raises(ValueError, match=r"blocks.1.mlp already has Context Broadcasting"):
        insert_cb(model)
    assert cb_sites(model) == ["blocks.1.mlp.context_broadcast"]
    # two candidate block lists: the caller must choose
    two = nn.Module()
    two.a, two.b = _Net(depth=1).blocks, _Net(depth=1).blocks
    with pytest.raises(ValueError, match=r"several block lists .* \['a', 'b'\]; pass blocks="):
        insert_cb(two)
    insert_cb(two, blocks=["a", "b"])
    assert cb_sites(two) == ["a.0.mlp.context_broadcast", "b.0.mlp.context_broadcast"]
    # a tuple MLP output reaches ContextBroadcast's own check
    with pytest.raises(TypeError, match="ContextBroadcast: input must be a Tensor, got tuple"):
        bad = nn.Module()
        bad.blocks = nn.ModuleList([nn.Module()])
        bad.blocks[0].mlp = nn.LSTM(4, 4, batch_first=True)
        insert_cb(bad).blocks[0].mlp(torch.randn(1, 3, 4))


# ---- DDP and FSDP2 (STANDARDS 10) ------------------------------------------------------------

STEPS, BATCH, SEQ, DIM, CLASSES = 2, 8, 5, 16, 5


def _cb_net() -> _Net:
    torch.manual_seed(1234)
    return insert_cb(_Net(DIM, depth=2, classes=CLASSES))


def _data():
    g = torch.Generator().manual_seed(99)
    return torch.randn(STEPS, BATCH, SEQ, DIM, generator=g), torch.randint(
        0, CLASSES, (STEPS, BATCH), generator=g
    )


def _distributed_worker(rank: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.integration.test_distributed import local_half, make_sgd, train

    xs, ys = _data()
    model = _cb_net()
    ddp = DDP(model)
    ddp_grads, ddp_params = train(ddp, model.named_parameters, make_sgd(ddp.parameters()),
                                  local_half(xs, rank), local_half(ys, rank), full=lambda t: t)
    model = _cb_net()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fsdp_grads, fsdp_params = train(model, model.named_parameters, make_sgd(model.parameters()),
                                    local_half(xs, rank), local_half(ys, rank),
                                    full=lambda t: t.full_tensor())
    torch.save({"ddp": {"grads": ddp_grads, "params": ddp_params},
                "fsdp": {"grads": fsdp_grads, "params": fsdp_params}}, tmp / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_ddp_and_fsdp2_match_one_process(tmp_path):
    from tests.integration.test_distributed import assert_same, make_sgd, run_workers, train

    results = run_workers(_distributed_worker, tmp_path)
    model = _cb_net()
    xs, ys = _data()
    grads, params = train(model, model.named_parameters, make_sgd(model.parameters()), xs, ys,
                          lambda t: t)
    for kind in ("ddp", "fsdp"):
        assert_same([r[kind] for r in results], grads, params)


# ---- the benchmark case and the example ------------------------------------------------------


def test_bench_case_builds_vit_s16_with_and_without_cb():
    from effnn.bench import BASELINE, FORWARD, Setting, get_layer

    case = get_layer("cb").parse("1")
    setting = Setting(torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    base = case.build(BASELINE, setting)
    torch.manual_seed(0)
    cb = case.build("auto", setting)
    assert base.tokens == cb.tokens == 197
    # ViT-S/16: 4.24 GMACs per image; CB adds no matmul FLOPs
    assert base.flops[FORWARD] == cb.flops[FORWARD] == pytest.approx(8.48e9, rel=0.01)
    assert cb_sites(base.fn) == [] and len(cb_sites(cb.fn)) == 12
    assert base.fn.state_dict().keys() == cb.fn.state_dict().keys()
    with torch.no_grad():
        y_base, y_cb = base.fn(*base.inputs), cb.fn(*cb.inputs)
    assert torch.equal(base.inputs[0], cb.inputs[0]) and not torch.allclose(y_base, y_cb)


def _example():
    return load_example("cb_digits.py")


def test_expected_calibration_error():
    ex = _example()
    labels = torch.tensor([0, 1, 0, 1])
    # always right with confidence 1: calibrated
    assert ex.expected_calibration_error(F.one_hot(labels, 2).double(), labels) == 0.0
    # confidence 0.75 everywhere, right 3 times out of 4: calibrated
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.25]])
    assert ex.expected_calibration_error(probs, labels) == pytest.approx(0.0)
    # confidence 0.9, right half the time: ECE 0.4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    assert ex.expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_digits_example_short_run(one_thread):
    pytest.importorskip("sklearn")
    ex = _example()
    data = ex.load_digits()
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert abs(float(data.x_train.mean())) < 1e-5 and abs(float(data.x_train.std()) - 1) < 1e-5
    # both variants start from the same weights
    plain, with_cb = ex.make_vit(0, cb=False), ex.make_vit(0, cb=True)
    assert all(torch.equal(a, b) for a, b in
               zip(plain.state_dict().values(), with_cb.state_dict().values(), strict=True))
    records = ex.run([0], epochs=3, data=data)
    by_cb = {r["cb"]: r for r in records}
    for r in records:
        assert r["losses"][-1] < 0.9 * r["losses"][0]  # the loss falls
        assert r["accuracy"] > 0.25  # 10 classes: chance is 0.1
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0
    assert by_cb[True]["losses"] != by_cb[False]["losses"]  # CB is active
    table = ex.summary(records)
    assert "| 0 |" in table and "mean +- std" in table
