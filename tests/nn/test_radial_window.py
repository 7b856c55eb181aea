import copy
import io
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

import effnn
from effnn.nn.radial_window import RadialWindowAttention, SphereFormerAttention
from effnn.ops.radial_window import cart2sphere
from tests.naive import window_attention_naive


def points(n, dtype=torch.float64):
    xyz = torch.randn(n, 3, dtype=dtype) * torch.tensor([6.0, 6.0, 1.0], dtype=dtype)
    return xyz, torch.randint(0, 2, (n,))


def radial_naive(layer, x, xyz, batch):
    N, C = x.shape
    h = layer.num_heads
    q, k, v = layer.qkv(x).view(N, 3, h, C // h).unbind(1)
    tables = (layer.relative_pos_query_table, layer.relative_pos_key_table, layer.relative_pos_value_table)
    out = window_attention_naive(q, k, v, cart2sphere(xyz), batch, list(layer.window_size), layer.scale,
                                 layer.origin, tables, list(layer.quant_size),
                                 layer.a if layer.rel_pos == "exp_split" else None)
    return layer.proj(out.reshape(N, C))


def sphereformer_naive(layer, x, xyz, batch):
    """The official SparseMultiheadSASphereConcat written out: heads [:h//2] in cubic windows on xyz,
    the rest in radial windows with the exponential split, concatenated, one projection."""
    N, C = x.shape
    h, h1 = layer.num_heads, layer.num_heads // 2
    q, k, v = layer.qkv(x).view(N, 3, h, C // h).unbind(1)
    cubic = window_attention_naive(
        q[:, :h1], k[:, :h1], v[:, :h1], xyz, batch, list(layer.window_size), layer.scale, layer.origin,
        (layer.relative_pos_query_table, layer.relative_pos_key_table, layer.relative_pos_value_table),
        list(layer.quant_size))
    radial = window_attention_naive(
        q[:, h1:], k[:, h1:], v[:, h1:], cart2sphere(xyz), batch, list(layer.window_size_sphere),
        layer.scale, layer.origin,
        (layer.relative_pos_query_table_sphere, layer.relative_pos_key_table_sphere,
         layer.relative_pos_value_table_sphere), list(layer.quant_size_sphere), layer.a)
    return layer.proj(torch.cat([cubic, radial], 1).reshape(N, C))


def _grads_match(layer, out, ref, x):
    assert torch.allclose(out, ref, atol=1e-10)
    params = [x] + list(layer.parameters())
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("origin", ["fixed", "batch_min"])
@pytest.mark.parametrize("rel_pos", ["exp_split", "linear"])
def test_radial_window_attention_matches_naive(origin, rel_pos):
    layer = RadialWindowAttention(12, 3, window_size=(40.0, 30.0, 120.0), rel_pos=rel_pos,
                                  quant_size=(10.0, 7.5, 30.0), a=0.5, origin=origin, dtype=torch.float64)
    for t in (layer.relative_pos_query_table, layer.relative_pos_key_table, layer.relative_pos_value_table):
        torch.nn.init.normal_(t, std=0.3)  # make the position terms matter
    xyz, batch = points(70)
    x = torch.randn(70, 12, dtype=torch.float64, requires_grad=True)
    _grads_match(layer, layer(x, xyz, batch), radial_naive(layer, x, xyz, batch), x)


def test_sphereformer_attention_matches_naive():
    layer = SphereFormerAttention(12, 3, window_size=2.0, window_size_sphere=(40.0, 30.0, 120.0),
                                  quant_size=0.5, quant_size_sphere=(10.0, 7.5, 30.0), a=0.5,
                                  dtype=torch.float64)
    for name, t in layer.named_parameters():
        if "table" in name:
            torch.nn.init.normal_(t, std=0.3)
    xyz, batch = points(70)
    x = torch.randn(70, 12, dtype=torch.float64, requires_grad=True)
    _grads_match(layer, layer(x, xyz, batch), sphereformer_naive(layer, x, xyz, batch), x)


def test_official_parameter_names_and_shapes():
    # SphereFormer level 1 on SemanticKITTI: 32 channels, head_dim 16, cubic window 6 x 0.05 m,
    # radial window 2 deg x 2 deg x 80 m, quant_size = window / 24 (unet_spherical_transformer.py)
    layer = SphereFormerAttention(32, 2, window_size=0.3, window_size_sphere=(2, 2, 80))
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "relative_pos_query_table": (47, 3, 1, 16),
        "relative_pos_key_table": (47, 3, 1, 16),
        "relative_pos_value_table": (47, 3, 1, 16),
        "relative_pos_query_table_sphere": (48, 3, 1, 16),
        "relative_pos_key_table_sphere": (48, 3, 1, 16),
        "relative_pos_value_table_sphere": (48, 3, 1, 16),
        "qkv.weight": (96, 32), "qkv.bias": (96,), "proj.weight": (32, 32), "proj.bias": (32,),
    }
    assert list(shapes) == list(layer.state_dict())  # the official registration order
    # level 5 (256 channels, 16 heads) with nuScenes' window growth
    deep = SphereFormerAttention(256, 16, window_size=9.6, window_size_sphere=(32, 32, 120))
    assert tuple(deep.relative_pos_value_table_sphere.shape) == (48, 3, 8, 16)
    radial = RadialWindowAttention(32, 2)
    assert tuple(radial.relative_pos_query_table.shape) == (48, 3, 2, 16)


def test_batch_offset_and_unsorted_batch_agree():
    layer = RadialWindowAttention(8, 2, window_size=(30.0, 30.0, 120.0), a=0.5)
    xyz, _ = points(40, torch.float32)
    x = torch.randn(40, 8)
    batch = torch.cat([torch.zeros(25, dtype=torch.long), torch.ones(15, dtype=torch.long)])
    by_batch = layer(x, xyz, batch)
    assert torch.allclose(layer(x, xyz, offset=torch.tensor([25, 40])), by_batch)
    perm = torch.randperm(40)
    assert torch.allclose(layer(x[perm], xyz[perm], batch[perm]), by_batch[perm], atol=1e-6)
    # one cloud without batch or offset
    assert torch.allclose(layer(x, xyz), layer(x, xyz, torch.zeros(40, dtype=torch.long)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    layer = SphereFormerAttention(32, 2, window_size=2.0, window_size_sphere=(20, 20, 120))
    xyz, batch = points(60, torch.float32)
    x = torch.randn(60, 32)
    ref = layer(x, xyz, batch)
    half = copy.deepcopy(layer).to(dtype)
    out = half(x.to(dtype), xyz, batch)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref, atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert half.relative_pos_value_table_sphere.grad.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x, xyz, batch).dtype == torch.bfloat16


def test_round_trips():
    layer = SphereFormerAttention(16, 2, window_size=1.0, window_size_sphere=(20, 20, 120))
    xyz, batch = points(30, torch.float32)
    x = torch.randn(30, 16)
    ref = layer(x, xyz, batch)
    data = safetensors.torch.save(layer.state_dict())
    fresh = SphereFormerAttention(16, 2, window_size=1.0, window_size_sphere=(20, 20, 120))
    fresh.load_state_dict(safetensors.torch.load(data))
    assert torch.equal(fresh(x, xyz, batch), ref)
    assert torch.equal(copy.deepcopy(layer)(x, xyz, batch), ref)
    buf = io.BytesIO()
    pickle.dump(layer, buf)
    assert torch.equal(pickle.loads(buf.getvalue())(x, xyz, batch), ref)
    assert "window_size_sphere=(20.0, 20.0, 120.0)" in repr(layer)


def test_compile_fullgraph_matches_eager():
    # aot_eager traces the whole module and its backward into one graph, as inductor does (slower)
    layer = SphereFormerAttention(16, 2, window_size=1.0, window_size_sphere=(20, 20, 120))
    xyz, batch = points(50, torch.float32)
    x = torch.randn(50, 16, requires_grad=True)
    ref = layer(x, xyz, batch)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, xyz, batch)
    assert torch.allclose(out, ref)
    params = [x, layer.relative_pos_query_table, layer.relative_pos_value_table_sphere]
    for a, b in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params),
                    strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def _dist_model():
    torch.manual_seed(5)
    return SphereFormerAttention(16, 2, window_size=2.0, window_size_sphere=(30, 30, 120))


def _dist_clouds():
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(40, 3, generator=g) * 5, torch.randn(40, 16, generator=g)) for _ in range(2)]


def _dist_loss(model, clouds):
    """Mean over clouds of each cloud's squared output: one batch of all clouds (fixed-origin
    windows do not depend on the rest of the batch, so each rank may take one cloud)."""
    xyz = torch.cat([c[0] for c in clouds])
    x = torch.cat([c[1] for c in clouds])
    batch = torch.repeat_interleave(torch.arange(len(clouds)), 40)
    return model(x, xyz, batch).pow(2).sum() / (40 * len(clouds))


def _dist_worker(rank, tmp: Path):
    """DDP, then FSDP2, each rank on its own cloud; saves both sets of gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    mine = _dist_clouds()[rank:rank + 1]
    grads = {}
    model = _dist_model()
    ddp = DDP(model)  # held: a collected wrapper takes its gradient all-reduce hooks with it
    _dist_loss(ddp, mine).backward()
    grads["ddp"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model = _dist_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    _dist_loss(model, mine).backward()
    grads["fsdp2"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.save(grads, tmp / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_and_fsdp2_gradients_match_one_process(tmp_path):
    from tests.integration.test_distributed import run_workers

    results = run_workers(_dist_worker, tmp_path)
    model = _dist_model()
    _dist_loss(model, _dist_clouds()).backward()
    for rank, res in enumerate(results):
        for wrapper in ("ddp", "fsdp2"):
            for name, p in model.named_parameters():
                torch.testing.assert_close(res[wrapper][name], p.grad, rtol=1e-5, atol=1e-6,
                                           msg=f"{wrapper} rank {rank}: {name}")


def test_exported_from_effnn():
    assert effnn.RadialWindowAttention is RadialWindowAttention
    assert effnn.SphereFormerAttention is SphereFormerAttention


def test_errors():
    with pytest.raises(ValueError, match="dim=10 is not divisible by num_heads=3"):
        RadialWindowAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads must be >= 2"):
        SphereFormerAttention(16, 1)
    with pytest.raises(ValueError, match="rel_pos must be one of"):
        RadialWindowAttention(16, 2, rel_pos="sine")
    with pytest.raises(ValueError, match="origin must be one of"):
        RadialWindowAttention(16, 2, origin="zero")
    with pytest.raises(ValueError, match="window_size must be 3 positive"):
        RadialWindowAttention(16, 2, window_size=(2, 2))
    with pytest.raises(ValueError, match="same number of bins"):
        RadialWindowAttention(16, 2, window_size=(2, 2, 120), quant_size=(0.1, 0.2, 5))
    layer = RadialWindowAttention(16, 2)
    xyz, batch = points(10, torch.float32)
    x = torch.randn(10, 16)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 16\)"):
        layer(x[:, :8], xyz, batch)
    with pytest.raises(ValueError, match=r"xyz must have shape \(10, 3\)"):
        layer(x, xyz[:5], batch)
    with pytest.raises(ValueError, match="not both"):
        layer(x, xyz, batch, offset=torch.tensor([10]))
    with pytest.raises(ValueError, match="cumulative cloud ends ending at N=10"):
        layer(x, xyz, offset=torch.tensor([4, 8]))
    with pytest.raises(ValueError, match="cumulative cloud ends ending at N=10"):
        layer(x, xyz, offset=torch.tensor([6, 3, 10]))
    bad = xyz.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(x, bad, batch)
    assert layer(x[:0], xyz[:0], batch[:0]).shape == (0, 16)
