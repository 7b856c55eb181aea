"""The SphereFormer reference model (effnn.models.sphereformer): official size and layout,
forward/backward on a small synthetic sweep, the cubic-only baseline, batch independence."""

import pytest
import torch

from effnn.data import lidar_scene
from effnn.models.sphereformer import (
    SphereFormerUNet,
    _downsample_xyz,
    sphereformer_unet,
    voxelize,
)
from effnn.nn.radial_window import CubicWindowAttention, SphereFormerAttention
from effnn.nn.sparse_conv import SparseConv3d, SparseConvTensor
from tests.naive import window_attention_naive
from tests.threads import single_thread

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"channels": (16, 16, 32, 32, 32), "head_dim": 8, "window_size": 1.2,
         "window_size_sphere": (4.0, 4.0, 120.0), "window_size_scale": (2.0, 2.0)}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def build(*args, **kwargs):
    with torch.device("meta"):  # the parameter count needs no memory
        return sphereformer_unet(*args, **kwargs)


@pytest.fixture(scope="module")
def sweeps():
    """Two small labelled sweeps (32 beams, 1 deg azimuth steps, 50 m): a few thousand points."""
    with single_thread():
        return [lidar_scene(32, seed=s, azimuth_res_deg=1.0, max_range=50.0) for s in (0, 1)]


def test_parameter_count_matches_official():
    # SemanticKITTI (4 input channels, 19 classes): the official log says 32,311,715
    assert n_params(build(4, 19)) == 32_311_715
    # nuScenes (16 classes, 0.1 m voxels, radial windows x 2 per level): 32,311,616
    nus = build(4, 16, window_size=0.6, window_size_sphere=(2, 2, 120), window_size_scale=(2, 2))
    assert n_params(nus) == 32_311_616
    # the cubic-only baseline: its radial heads' tables have 2L-1 = 47 rows instead of 48:
    # 3 tables x 3 axes x head_dim 16 x (1 + 2 + 4 + 8 + 8) radial heads fewer
    assert n_params(build(4, 19, windows="cubic")) == 32_311_715 - 3 * 3 * 16 * 23


def test_official_layout_and_windows():
    model = build(4, 19)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["input_conv.0.weight"] == (32, 3, 3, 3, 4)  # spconv KRSC
    assert shapes["unet.blocks.block0.conv_branch.2.weight"] == (32, 3, 3, 3, 32)
    assert shapes["unet.blocks.block1.conv_branch.3.running_var"] == (32,)
    assert shapes["unet.conv.2.weight"] == (64, 2, 2, 2, 32)
    assert shapes["unet.deconv.2.weight"] == (32, 2, 2, 2, 64)
    assert shapes["unet.blocks_tail.block0.i_branch.0.weight"] == (32, 1, 1, 1, 64)
    assert shapes["unet.blocks_tail.block0.conv_branch.0.weight"] == (64,)
    assert "unet.blocks_tail.block1.i_branch.0.weight" not in shapes
    assert shapes["unet.transformer_block.attn.relative_pos_query_table"] == (47, 3, 1, 16)
    assert shapes["unet.u.u.u.u.transformer_block.attn.relative_pos_value_table_sphere"] == (48, 3, 8, 16)
    assert shapes["unet.u.u.u.u.transformer_block.mlp.fc1.weight"] == (1024, 256)
    assert shapes["unet.u.u.u.conv.2.weight"] == (256, 2, 2, 2, 256)
    assert not any(k.startswith("unet.u.u.u.u.conv") or k.startswith("unet.u.u.u.u.u") for k in shapes)
    assert shapes["output_layer.0.weight"] == (32,) and shapes["linear.weight"] == (19, 32)
    assert all(m.eps == 1e-4 for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    level = model.unet
    cubic, radial = [], []
    while level is not None:
        attn = level.transformer_block.attn
        assert isinstance(attn, SphereFormerAttention) and attn.dim // attn.num_heads == 16
        cubic.append(attn.window_size[0])
        radial.append(attn.window_size_sphere)
        level = getattr(level, "u", None)
    assert cubic == pytest.approx([0.3, 0.6, 1.2, 2.4, 4.8])
    assert [r[0] for r in radial] == pytest.approx([2, 3, 4.5, 6.75, 10.125])  # KITTI: x 1.5
    assert all(r[2] == 80 for r in radial)


def test_forward_backward_on_a_sweep(sweeps):
    scene = sweeps[0]
    vox = voxelize(scene.points, 0.4)
    model = sphereformer_unet(3, 5, **SMALL)
    logits = model(vox.xyz / 50, vox.indices, vox.xyz)
    assert logits.shape == (vox.indices.shape[0], 5) and torch.isfinite(logits).all()
    assert logits[vox.point_to_voxel].shape == (scene.points.shape[0], 5)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 5, (logits.shape[0],))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.unet.transformer_block.attn.relative_pos_key_table_sphere.grad.abs().sum() > 0


def test_cubic_only_changes_only_the_attention(sweeps):
    full = sphereformer_unet(3, 5, **SMALL)
    cubic = sphereformer_unet(3, 5, windows="cubic", **SMALL)
    attn = [m for m in cubic.modules() if isinstance(m, CubicWindowAttention)]
    assert len(attn) == 5 and not any(isinstance(m, SphereFormerAttention) for m in cubic.modules())
    a, b = full.state_dict(), cubic.state_dict()
    outside = [k for k in a if ".attn." not in k]
    assert outside == [k for k in b if ".attn." not in k]
    assert all(a[k].shape == b[k].shape for k in outside)
    sphere = [m for m in full.modules() if isinstance(m, SphereFormerAttention)]
    for m_full, m_cubic in zip(sphere, attn, strict=True):
        assert m_cubic.window_size == m_full.window_size and m_cubic.num_heads == m_full.num_heads
    vox = voxelize(sweeps[0].points, 0.4)
    assert cubic(vox.xyz / 50, vox.indices, vox.xyz).shape == (vox.indices.shape[0], 5)


def test_cubic_window_attention_matches_brute_force():
    torch.manual_seed(0)
    attn = CubicWindowAttention(16, 2, window_size=1.0).double()
    x = torch.randn(60, 16, dtype=torch.float64)
    xyz = torch.rand(60, 3, dtype=torch.float64) * 3
    batch = torch.randint(0, 2, (60,))
    N, C = x.shape
    q, k, v = attn.qkv(x).view(N, 3, 2, 8).unbind(1)
    tables = (attn.relative_pos_query_table, attn.relative_pos_key_table, attn.relative_pos_value_table)
    ref = attn.proj(window_attention_naive(q, k, v, xyz, batch, list(attn.window_size), attn.scale,
                                           "fixed", tables, list(attn.quant_size)).reshape(N, C))
    assert torch.allclose(attn(x, xyz, batch), ref, atol=1e-10)


def test_scene_alone_equals_scene_in_batch(sweeps):
    """With fixed window origins, per-cloud voxel grids and BatchNorm in eval mode, a sweep's
    logits do not depend on the other sweeps of the batch."""
    torch.manual_seed(0)
    model = sphereformer_unet(3, 5, **SMALL).double().eval()
    points = torch.cat([s.points for s in sweeps]).double()
    batch = torch.cat([torch.full((s.points.shape[0],), i) for i, s in enumerate(sweeps)])
    vox = voxelize(points, 0.4, batch=batch)
    with torch.no_grad():
        both = model(vox.xyz / 50, vox.indices, vox.xyz)[vox.point_to_voxel]
        start = 0
        for s in sweeps:
            alone = voxelize(s.points.double(), 0.4)
            out = model(alone.xyz / 50, alone.indices, alone.xyz)[alone.point_to_voxel]
            assert torch.allclose(out, both[start:start + s.points.shape[0]], atol=1e-9)
            start += s.points.shape[0]


def test_voxelize_means_and_mapping():
    points = torch.tensor([[0.05, 0.0, 0.0], [0.15, 0.0, 0.0], [0.02, 0.01, 0.0], [5.0, 5.0, 5.0],
                           [1.0, 1.0, 1.0]])
    feats = torch.arange(10.0).view(5, 2)
    batch = torch.tensor([0, 0, 0, 0, 1])
    vox = voxelize(points, 0.1, batch=batch, features=feats)
    # cloud 0's grid starts at its minimum (0.02, 0, 0); cloud 1's at its only point
    assert vox.indices.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 49, 50, 50], [1, 0, 0, 0]]
    assert vox.point_to_voxel.tolist() == [0, 1, 0, 2, 3]
    assert torch.allclose(vox.xyz[0], (points[0] + points[2]) / 2)
    assert torch.allclose(vox.features[0], (feats[0] + feats[2]) / 2)
    assert torch.equal(vox.features[3], feats[4])
    assert voxelize(points[:0], 0.1).indices.shape == (0, 4)
    with pytest.raises(ValueError, match="voxel_size"):
        voxelize(points, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        voxelize(torch.tensor([[float("nan"), 0.0, 0.0]]), 0.1)
    with pytest.raises(ValueError, match=r"points must be a floating-point \(P, 3\)"):
        voxelize(points[:, :2], 0.1)


def test_downsampled_xyz_is_the_mean_of_the_merged_voxels():
    indices = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, 2, 0, 0], [1, 0, 0, 1]])
    xyz = torch.tensor([[0.0, 0, 0], [2.0, 2, 2], [4.0, 0, 0], [7.0, 7, 7]])
    down = SparseConv3d(1, 1, 2, 2, indice_key="spconv1")(SparseConvTensor(torch.ones(4, 1), indices))
    assert down.indices.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    assert _downsample_xyz(xyz, down, "spconv1").tolist() == [[1.0, 1, 1], [4.0, 0, 0], [7.0, 7, 7]]


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="multiple of head_dim=16"):
        SphereFormerUNet(4, 19, channels=(24, 48))
    with pytest.raises(ValueError, match=">= 2 heads"):
        SphereFormerUNet(4, 19, channels=(16, 32))
    SphereFormerUNet(4, 19, channels=(16, 32), windows="cubic")  # one cubic head is fine
    with pytest.raises(ValueError, match="windows must be one of"):
        SphereFormerUNet(4, 19, windows="radial")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        SphereFormerUNet(4, 0)
    model = sphereformer_unet(3, 5, **SMALL)
    idx = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"features must have shape \(V, 3\)"):
        model(torch.randn(2, 4), idx, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"xyz must have shape \(2, 3\)"):
        model(torch.randn(2, 3), idx, torch.randn(3, 3))


# ---- data parallel (STANDARDS 10) ---------------------------------------------------------------


def _ddp_model():
    # float64 and eval-mode BatchNorm (running statistics): the gradient of the two-sweep batch is
    # then exactly the sum of the sweeps' gradients (train-mode BatchNorm needs SyncBatchNorm)
    torch.manual_seed(0)
    return sphereformer_unet(3, 5, **SMALL).double().eval()


def _ddp_sweeps():
    return [lidar_scene(32, seed=s, azimuth_res_deg=1.0, max_range=50.0) for s in (0, 1)]


def _ddp_loss(model, sweeps, total_voxels):
    """Cross-entropy summed over the sweeps' voxels / all voxels of the global batch (so that the
    ranks' gradients average to the one-process gradient)."""
    points = torch.cat([s.points for s in sweeps]).double()
    batch = torch.cat([torch.full((s.points.shape[0],), i) for i, s in enumerate(sweeps)])
    vox = voxelize(points, 0.4, batch=batch)
    logits = model(vox.xyz / 50, vox.indices, vox.xyz)
    target = vox.indices[:, 1:].sum(1) % 5  # a voxel's own class, whatever batch it is in
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum") / total_voxels


def _total_voxels(sweeps):
    return sum(voxelize(s.points.double(), 0.4).indices.shape[0] for s in sweeps)


def _ddp_worker(rank, tmp):
    """DDP, then FSDP2 (the U-Net and the root sharded), each rank on one of the two sweeps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    sweeps = _ddp_sweeps()
    total = _total_voxels(sweeps)
    grads = {}
    model = _ddp_model()
    ddp = DDP(model)  # kept in a variable: the reducer must outlive the backward
    (_ddp_loss(ddp, sweeps[rank:rank + 1], total) * 2).backward()
    grads["ddp"] = {n: p.grad for n, p in model.named_parameters()}
    model = _ddp_model()
    mesh = init_device_mesh("cpu", (2,))
    fully_shard(model.unet, mesh=mesh)
    fully_shard(model, mesh=mesh)
    (_ddp_loss(model, sweeps[rank:rank + 1], total) * 2).backward()
    grads["fsdp2"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    torch.save(grads, tmp / f"rank{rank}.pt")


@pytest.mark.distributed
def test_ddp_and_fsdp2_gradients_match_one_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo")
    from tests.integration.test_distributed import run_workers

    results = run_workers(_ddp_worker, tmp_path)
    model = _ddp_model()
    sweeps = _ddp_sweeps()
    _ddp_loss(model, sweeps, _total_voxels(sweeps)).backward()
    for rank, res in enumerate(results):
        for wrapper in ("ddp", "fsdp2"):
            for name, p in model.named_parameters():
                torch.testing.assert_close(res[wrapper][name], p.grad, rtol=1e-9, atol=1e-12,
                                           msg=f"{wrapper} rank {rank}: {name}")
