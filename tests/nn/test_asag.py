import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import effnn
from effnn import SparseAnchorGenerator, anchor_generator_loss
from tests.naive import asag_generator_naive

D = torch.float64
STRIDES = (8, 16, 32)


def make(seed=0, d_model=16, compress_dim=4, dtype=D, **kw):
    """A small generator whose heads predict small boxes of middling confidence, so that probing
    reaches P4 and P3 (with the official initialisation every box is about half the image and
    nothing is probed)."""
    torch.manual_seed(seed)
    g = SparseAnchorGenerator(d_model=d_model, compress_dim=compress_dim, dtype=dtype, **kw).eval()
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.normal_(0, 0.1)
        for ln, emb in zip(g.layernorm, g.pos_embedding, strict=False):
            ln.weight.normal_(1, 0.1)
            ln.bias.normal_(0, 0.1)
            emb.weight.normal_(0, 0.1)
        for head in (g.proj_all, g.proj_patch):
            last = head.layers[2]
            last.weight.mul_(0.05)
            b = last.bias.view(-1, 5)
            b[:, 2:4] = -2.5  # boxes ~8% of their patch
            b[:, 4] = torch.linspace(-3, 1.5, b.shape[0], dtype=dtype)  # confidences 0.05 .. 0.8
    return g


def maps(sizes, d_model=16, extent=None, dtype=D, seed=0):
    """Random [P3, P4, P5] for images of (h, w) sizes, padded to ``extent`` (default: the largest,
    rounded up to 32), with random values in the padding."""
    gen = torch.Generator().manual_seed(seed)
    H, W = extent or (max(-(-h // 32) * 32 for h, _ in sizes), max(-(-w // 32) * 32 for _, w in sizes))
    return [torch.randn(len(sizes), d_model, H // s, W // s, generator=gen, dtype=dtype) for s in STRIDES]


def anchors_of(out, b):
    n = int(out.valid[b].sum())
    assert out.valid[b, :n].all() and not out.valid[b, n:].any()
    return torch.cat([out.boxes[b, :n], out.scores[b, :n, None], out.levels[b, :n, None].to(out.boxes.dtype)], 1)


# ---- official layout ------------------------------------------------------------------------------

OFFICIAL_100Q = {
    **{f"compress.{i}.0.weight": (128, 256, 1, 1) for i in range(3)},
    **{f"compress.{i}.0.bias": (128,) for i in range(3)},
    **{f"compress.{i}.2.weight": (8, 128, 3, 3) for i in range(3)},
    **{f"compress.{i}.2.bias": (8,) for i in range(3)},
    "P6.weight": (8, 8, 3, 3), "P6.bias": (8,),
    **{f"layernorm.{i}.{p}": (225, 8) for i in range(3) for p in ("weight", "bias")},
    **{f"pos_embedding.{i}.weight": (225, 8) for i in range(3)},
    **{f"proj_{n}.layers.0.weight": (1000, 1800) for n in ("all", "patch")},
    **{f"proj_{n}.layers.0.bias": (1000,) for n in ("all", "patch")},
    **{f"proj_{n}.layers.1.weight": (1000, 1000) for n in ("all", "patch")},
    **{f"proj_{n}.layers.1.bias": (1000,) for n in ("all", "patch")},
    "proj_all.layers.2.weight": (250, 1000), "proj_all.layers.2.bias": (250,),
    "proj_patch.layers.2.weight": (100, 1000), "proj_patch.layers.2.bias": (100,),
}


def test_state_dict_matches_the_official_module():
    g = SparseAnchorGenerator()
    assert {k: tuple(v.shape) for k, v in g.state_dict().items()} == OFFICIAL_100Q
    assert sum(p.numel() for p in g.parameters()) == 6_097_494  # the official 100-query generator
    g300 = SparseAnchorGenerator(num_pred_anchor1=150, num_pred_anchor2=50, use_anchor_threshold=0.05)
    assert sum(p.numel() for p in g300.parameters()) == 6_748_144
    assert (g300.min_anchor, g300.max_anchor) == (50, 500) and (g.min_anchor, g.max_anchor) == (5, 200)
    # official init: Xavier for every >= 2-D parameter (LayerNorm tables too), zero position tables
    assert all((e.weight == 0).all() for e in g.pos_embedding)
    assert not (g.layernorm[0].weight == 1).all()
    assert "used_inference_level='P3P6'" in repr(g)


def test_checkpoint_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    g, h = make(0), make(1)
    save_file(g.state_dict(), tmp_path / "g.safetensors")
    h.load_state_dict(load_file(tmp_path / "g.safetensors"), strict=True)
    x = maps([(256, 320)])
    a, b, c = g(x), h(x), copy.deepcopy(g)(x)
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.boxes, c.boxes)
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    buf.seek(0)
    h.load_state_dict(torch.load(buf, weights_only=True))


# ---- official semantics, image by image ----------------------------------------------------------


@pytest.mark.parametrize("level,seed", [("P3P6", 0), ("P3P6", 1), ("P4P6", 2), ("P5P6", 0)])
def test_matches_naive_official_loop(level, seed):
    g = make(seed, used_inference_level=level)
    sizes = [(256, 320), (200, 300), (150, 100)]
    x = maps(sizes, seed=seed)
    out = g(x, torch.tensor(sizes))
    ref = asag_generator_naive(g.state_dict(), x, sizes, used_inference_level=level)
    probed = {p.level: len(p.batch_idx) for p in out.patches}
    assert probed.get(4, 0) > 0 or level == "P5P6"
    assert probed.get(3, 0) > 0 or level != "P3P6"
    for b in range(len(sizes)):
        got, want = anchors_of(out, b), torch.tensor(ref[b], dtype=D).reshape(-1, 6)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)


def test_min_and_max_anchor_counts():
    g = make(0, max_anchor=30, used_inference_level="P5P6")
    out = g(maps([(256, 320)]), torch.tensor([[256, 320]]))
    assert out.valid.sum() == 30  # the 30 best of the fixed stage, by score
    assert torch.all(out.scores[0, 1:] <= out.scores[0, :-1])
    g = make(0, use_anchor_threshold=0.99, min_anchor=7)
    out = g(maps([(256, 320)]), torch.tensor([[256, 320]]))
    # nothing passes 0.99: the fixed stage gives its best 7, the replaced ones included
    assert out.valid.sum() >= 7 and (out.levels[0, :7] >= 5).all()


# ---- properties ------------------------------------------------------------------------------------


def test_same_anchors_alone_or_in_a_batch():
    g = make(0)
    sizes = [(256, 320), (160, 224), (96, 288)]
    x = maps(sizes)
    batch = g(x, torch.tensor(sizes))
    for b, (h, w) in enumerate(sizes):
        alone_maps = [f[b:b + 1, :, : -(-h // s), : -(-w // s)] for f, s in zip(x, STRIDES, strict=False)]
        alone = g(alone_maps, torch.tensor([[h, w]]))
        torch.testing.assert_close(anchors_of(alone, 0), anchors_of(batch, b), rtol=1e-12, atol=1e-10)


def test_extra_padding_does_not_change_anchors():
    g = make(1)
    sizes = [(200, 300), (256, 320)]
    x = maps(sizes)
    out = g(x, torch.tensor(sizes))
    big = maps(sizes, extent=(320, 416), seed=5)  # other values in the padding
    for f, b in zip(x, big, strict=False):
        b[:, :, : f.shape[2], : f.shape[3]] = f
    out_big = g(big, torch.tensor(sizes))
    for b in range(2):
        torch.testing.assert_close(anchors_of(out_big, b), anchors_of(out, b), rtol=1e-12, atol=1e-10)


def test_truncated_levels_are_consistent():
    x, sizes = maps([(256, 320), (224, 288)]), torch.tensor([[256, 320], [224, 288]])
    outs = {lv: make(2, used_inference_level=lv, max_anchor=10_000)(x, sizes) for lv in ("P5P6", "P4P6", "P3P6")}
    assert set(outs["P5P6"].levels[outs["P5P6"].valid].tolist()) <= {5, 6}
    for b in range(2):
        fixed = {lv: anchors_of(o, b)[anchors_of(o, b)[:, 5] >= 5] for lv, o in outs.items()}
        p4 = {lv: anchors_of(o, b)[anchors_of(o, b)[:, 5] == 4] for lv, o in outs.items()}
        # P4P6 and P3P6 keep the same fixed-stage anchors (the unselected ones); P5P6 keeps all of them
        assert torch.equal(fixed["P4P6"], fixed["P3P6"])
        assert len(fixed["P5P6"]) > len(fixed["P4P6"])
        assert all((fixed["P5P6"] == row).all(1).any() for row in fixed["P4P6"])
        # P3P6 emits the P4 anchors of P4P6 that it did not replace
        assert 0 < len(p4["P3P6"]) < len(p4["P4P6"])
        assert all((p4["P4P6"] == row).all(1).any() for row in p4["P3P6"])


def test_early_stop_when_nothing_is_selected():
    g = make(0, threshold1=0.0)  # nothing is "middling": no probing, no crash (fast_inference crashed)
    out = g(maps([(256, 320)]), torch.tensor([[256, 320]]))
    assert [p.level for p in out.patches] == [6, 5]
    assert out.valid.sum() >= g.min_anchor


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 239), st.integers(1, 239))
def test_small_images(h, w):
    g = SMALL
    x = [torch.randn(1, 16, -(-h // s), -(-w // s), dtype=D) for s in STRIDES]
    out = g(x, torch.tensor([[h, w]]))
    n = int(out.valid.sum())
    assert g.min_anchor <= n <= g.max_anchor
    assert torch.isfinite(out.boxes).all()
    ref = asag_generator_naive(g.state_dict(), x, [(h, w)])[0]
    torch.testing.assert_close(anchors_of(out, 0), torch.tensor(ref, dtype=D).reshape(-1, 6), rtol=1e-10, atol=1e-9)


SMALL = make(3)


def test_patch_compression_paths_agree():
    g = make(0)
    x = maps([(256, 320), (120, 200)])[0]
    valid = torch.tensor([[32, 40], [15, 25]])
    img = torch.tensor([0, 0, 1, 1, 1])
    crop = torch.tensor([[0, 0], [25, 17], [3, 4], [10, 0], [24, 30]])  # inside, at borders, beyond
    dense = g._crop(g._compress_dense(0, x, valid), valid, img, crop)
    windows = g._compress_windows(0, x, valid, img, crop)
    torch.testing.assert_close(windows, dense, rtol=1e-12, atol=1e-12)
    assert (dense[4] == 0).all()  # a patch wholly outside the valid region reads zeros


def test_max_patches_per_level():
    x, sizes = maps([(256, 320)]), torch.tensor([[256, 320]])
    free = make(0, nms_threshold=1.0)(x, sizes)
    capped = make(0, nms_threshold=1.0, max_patches_per_level=2)(x, sizes)
    assert {p.level: len(p.batch_idx) for p in free.patches}[4] > 2
    assert all(len(p.batch_idx) <= 2 for p in capped.patches if p.level in (4, 3))


# ---- training ----------------------------------------------------------------------------------------

TARGETS = [
    torch.tensor([[0.3, 0.3, 0.05, 0.06], [0.6, 0.5, 0.1, 0.1], [0.2, 0.7, 0.08, 0.1], [0.5, 0.5, 0.8, 0.9]], dtype=D),
    torch.zeros(0, 4, dtype=D),
]


def test_training_patches_and_loss():
    g = make(0).train()
    sizes = torch.tensor([[256, 320], [200, 288]])
    x = maps([(256, 320), (200, 288)])
    for epoch in (0, 5):
        out = g(x, sizes, TARGETS, epoch=epoch)
        kinds = {p.level: p for p in out.patches}
        assert len(kinds[6].batch_idx) == 8 and kinds[6].flip.tolist() == [0, 1, 2, 3] * 2
        for lv in (4, 3):
            p = kinds[lv]
            assert (torch.bincount(p.batch_idx, minlength=2) >= 4).all()  # N_TP patches per image
            assert torch.equal(p.batch_idx, p.batch_idx.sort().values)
            if epoch == 0:  # GT patches only, emitted; image 1 has no GT: random, not emitted
                assert p.emitted[p.batch_idx == 0].any() and not p.emitted[p.batch_idx == 1].any()
                # each emitted GT patch contains a small GT box
                s, ps = p.stride, p.patch_size
                for crop in p.crop_pos[p.emitted]:
                    boxes = TARGETS[0][:, :] * torch.tensor([320, 256, 320, 256], dtype=D)
                    lo, hi = crop * s, (crop + ps) * s
                    inside = ((boxes[:, :2] - boxes[:, 2:] / 2 >= lo - s) & (boxes[:, :2] + boxes[:, 2:] / 2 <= hi + s)).all(1)
                    assert inside.any()
        loss = anchor_generator_loss(out.patches, TARGETS, sizes)
        g.zero_grad()
        loss["loss_anchor"].backward()
        for name in ("compress.0.0.weight", "compress.1.2.weight", "compress.2.0.weight", "P6.weight",
                     "proj_all.layers.0.weight", "proj_patch.layers.2.weight", "layernorm.2.weight"):
            grad = dict(g.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="training needs targets"):
        g(x, sizes)
    with pytest.raises(ValueError, match=r"targets\[1\] must be a \(G, 4\) tensor"):
        g(x, sizes, [TARGETS[0], torch.zeros(8, dtype=D)])


def test_dict_targets_and_float32_autocast():
    g = make(0, dtype=torch.float32).train()
    x = maps([(256, 320)], dtype=torch.float32)
    t = [{"boxes": TARGETS[0].float(), "labels": torch.zeros(4, dtype=torch.long)}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = g(x, torch.tensor([[256, 320]]), t)
    assert out.boxes.dtype == torch.float32 and out.patches[0].pred.dtype == torch.float32


# ---- bad input -----------------------------------------------------------------------------------------


def test_errors():
    g = make(0)
    x = maps([(256, 320)])
    sizes = torch.tensor([[256, 320]])
    with pytest.raises(ValueError, match="list of 3 maps"):
        g(x[:2], sizes)
    with pytest.raises(ValueError, match=r"features\[P4\] must be \(B, 16, H, W\)"):
        g([x[0], x[1][:, :8], x[2]], sizes)
    with pytest.raises(ValueError, match="batch sizes"):
        g([x[0], torch.cat([x[1], x[1]]), x[2]], sizes)
    with pytest.raises(TypeError, match="floating point"):
        g([x[0].long(), x[1], x[2]], sizes)
    with pytest.raises(ValueError, match=r"image_sizes must be a \(B=1, 2\)"):
        g(x, torch.tensor([256, 320]))
    with pytest.raises(ValueError, match="exceed the P3 map"):
        g(x, torch.tensor([[400, 320]]))
    with pytest.raises(ValueError, match="finite and >= 1"):
        g(x, torch.tensor([[0.0, 320.0]]))
    with pytest.raises(ValueError, match="empty batch"):
        g([f[:0] for f in x], sizes[:0])
    with pytest.raises(ValueError, match="used_inference_level"):
        SparseAnchorGenerator(used_inference_level="P2P6")
    with pytest.raises(ValueError, match="stride"):
        SparseAnchorGenerator(stride=(8, 16))
    with pytest.raises(ValueError, match="activation"):
        SparseAnchorGenerator(activation="tanh")
    with pytest.raises(ValueError, match="threshold1"):
        SparseAnchorGenerator(threshold1=1.5)
    with pytest.raises(ValueError, match="min_anchor"):
        SparseAnchorGenerator(min_anchor=10, max_anchor=5)
    assert effnn.nn.SparseAnchorGenerator is SparseAnchorGenerator


# ---- cost, gradients, NaN, round trips ------------------------------------------------------------


def test_flops_at_800x1333_count_only_probed_patches():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    feats = [torch.randn(1, 256, 800 // s, 1344 // s) for s in STRIDES]
    sizes = torch.tensor([[800, 1333]])
    fixed = 25 * 42 * (256 * 128 + 128 * 8 * 9) + 15 * 15 * 8 * 8 * 9 + 5 * (1800 * 1000 + 1000 * 1000 + 1000 * 250)
    per_patch = 17 * 17 * 256 * 128 + 15 * 15 * 128 * 8 * 9 + 1800 * 1000 + 1000 * 1000 + 1000 * 100
    g = SparseAnchorGenerator(dtype=torch.float32).eval()
    for probe in (False, True):
        if probe:  # heads biased to small boxes of middling confidence, so P4 and P3 are probed
            with torch.no_grad():
                for head in (g.proj_all, g.proj_patch):
                    last = head.layers[2]
                    last.weight.mul_(0.05)
                    b = last.bias.view(-1, 5)
                    b[:, 2:4] = -2.5
                    b[:, 4] = torch.linspace(-3, 1.5, b.shape[0])
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = g(feats, sizes)
        patches = sum(len(p.batch_idx) for p in out.patches if p.level in (4, 3))
        assert (patches > 0) == probe
        # the fixed stage is the paper's "0.06 GFLOPs" (multiply-adds); the released code also
        # compresses P4 and P3 densely: 0.94 G multiply-adds at this size
        assert counter.get_total_flops() == 2 * (fixed + patches * per_patch)
    assert fixed == 59_462_800


def test_gradcheck_through_the_generator():
    g = make(0, d_model=4, compress_dim=1, num_pred_anchor1=3, num_pred_anchor2=2)
    g.train()
    sizes = torch.tensor([[64, 64]])
    x = [torch.randn(1, 4, 64 // s, 64 // s, dtype=D) for s in STRIDES]
    targets = [torch.tensor([[0.4, 0.4, 0.1, 0.1]], dtype=D)]

    def fn(p4, p5):
        torch.manual_seed(0)  # the same random training patches every call
        out = g([x[0], p4, p5], sizes, targets)
        return tuple(p.pred for p in out.patches)

    assert torch.autograd.gradcheck(fn, (x[1].requires_grad_(), x[2].requires_grad_()), atol=1e-6, fast_mode=True)


def test_nan_inside_is_an_error_outside_is_ignored():
    g = make(0)
    x = maps([(200, 300), (256, 320)])
    x[0][0, :, -1, -1] = float("nan")  # padding of image 0
    out = g(x, torch.tensor([[200, 300], [256, 320]]))
    assert torch.isfinite(out.boxes).all()
    x[0][1, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"features\[P3\] has NaN or inf"):
        g(x, torch.tensor([[200, 300], [256, 320]]))


def test_pickle_and_dtype_round_trip():
    import pickle

    g = make(0)
    x = maps([(256, 320)])
    ref = g(x)
    h = pickle.loads(pickle.dumps(g))
    assert torch.equal(h(x).boxes, ref.boxes)
    g32 = copy.deepcopy(g).to(torch.float32)
    out = g32([f.float() for f in x])
    assert out.boxes.dtype == torch.float32 and out.valid.sum() == ref.valid.sum()
    torch.testing.assert_close(out.boxes, ref.boxes.float(), rtol=1e-4, atol=1e-2)


# ---- static shapes: torch.compile and torch.export ------------------------------------------------


@pytest.mark.parametrize("level", ["P3P6", "P4P6", "P5P6"])
def test_static_shapes_equal_the_dynamic_path(level):
    sizes = [(256, 320), (200, 300), (150, 100)]
    x = maps(sizes, seed=1)
    dyn = make(1, used_inference_level=level, max_patches_per_level=3)(x, torch.tensor(sizes))
    st = make(1, used_inference_level=level, max_patches_per_level=3, static_shapes=True)(x, torch.tensor(sizes))
    assert st.boxes.shape == (3, 200, 4)  # max_anchor slots
    for b in range(3):  # (the MLP batches differ: last-bit differences only)
        torch.testing.assert_close(anchors_of(st, b), anchors_of(dyn, b), rtol=1e-12, atol=1e-10)
    for p, q in zip(st.patches[2:], dyn.patches[2:], strict=True):
        assert p.level == q.level and int(p.emitted.sum()) == len(q.batch_idx) and len(p.batch_idx) == 3 * 3
    with pytest.raises(ValueError, match="needs max_patches_per_level"):
        SparseAnchorGenerator(static_shapes=True)


@pytest.mark.slow  # about 5-13 s on 2 cores: dynamo tracing and export
def test_static_shapes_compile_and_export():
    g = make(0, max_patches_per_level=2, static_shapes=True)
    sizes = torch.tensor([[256, 320], [200, 300]])
    x = maps([(256, 320), (200, 300)])
    ref = g(x, sizes)
    out = torch.compile(g, fullgraph=True, backend="eager")(x, sizes)  # no graph break
    torch.testing.assert_close(out.boxes, ref.boxes)
    ep = torch.export.export(g, (x, sizes))
    out = ep.module()(x, sizes)
    torch.testing.assert_close(out.boxes, ref.boxes)
    assert torch.equal(out.valid, ref.valid) and torch.equal(out.levels, ref.levels)


# ---- DDP (STANDARDS 10) ------------------------------------------------------------------------------

DDP_SIZES = [(256, 320), (224, 288)]


def _ddp_loss(model, rank):
    x = [f[rank:rank + 1] for f in maps(DDP_SIZES)]
    sizes = torch.tensor(DDP_SIZES[rank:rank + 1])
    out = model(x, sizes)
    return anchor_generator_loss(out.patches, TARGETS[rank:rank + 1], sizes)["loss_anchor"]


def _ddp_worker(rank, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = make(0)  # same seed on every rank; eval mode: deterministic patches
    # a level that probes nothing on one rank leaves its parameters unused there
    ddp = DDP(g, find_unused_parameters=True)
    _ddp_loss(ddp, rank).backward()
    torch.save({n: p.grad for n, p in g.named_parameters()}, tmp / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow  # two spawned processes
def test_ddp_matches_one_process(tmp_path):
    from tests.integration.test_distributed import run_workers

    results = run_workers(_ddp_worker, tmp_path)
    g = make(0)
    (0.5 * (_ddp_loss(g, 0) + _ddp_loss(g, 1))).backward()  # DDP averages the ranks' gradients
    for res in results:
        for name, p in g.named_parameters():
            torch.testing.assert_close(res[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


# ---- it learns: a tiny backbone + the generator overfit two procedural images --------------------


def _rectangles(n, size, gen):
    """Images with four filled rectangles each: two small (10-29 px, so P3 is probed), two large."""
    imgs, targets = torch.zeros(n, 3, size, size), []
    for i in range(n):
        boxes = []
        for j in range(4):
            lo, hi = (10, 30) if j < 2 else (40, size // 2)
            w, h = torch.randint(lo, hi, (2,), generator=gen).tolist()
            x0, y0 = (int(torch.randint(0, size - v, (1,), generator=gen)) for v in (w, h))
            imgs[i, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=gen) * 0.8 + 0.2
            boxes.append([(x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size])
        targets.append(torch.tensor(boxes))
    return imgs, targets


@pytest.mark.slow  # 30-65 s on 2 shared cores (the backbone backward dominates)
def test_generator_learns_anchors_for_small_and_large_objects():
    from torch import nn

    from effnn.ops.asag import box_cxcywh_to_xyxy, box_iou

    torch.manual_seed(0)
    size, d = 128, 32
    imgs, targets = _rectangles(2, size, torch.Generator().manual_seed(1))
    sizes = torch.tensor([[size, size]] * 2)

    def conv(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.GroupNorm(8, o), nn.ReLU())

    c3 = nn.Sequential(conv(3, 16), conv(16, 32), conv(32, d))  # strides 8, 16, 32
    c4, c5 = conv(d, d), conv(d, d)
    gen = SparseAnchorGenerator(d_model=d, compress_dim=4)
    params = [p for m in (c3, c4, c5, gen) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def run(targets=None, epoch=None):
        p3 = c3(imgs)
        p4 = c4(p3)
        return gen([p3, p4, c5(p4)], sizes, targets, epoch)

    def recall():
        gen.eval()
        with torch.no_grad():
            out = run()
        gen.train()
        hits = [box_iou(box_cxcywh_to_xyxy(t * size), box_cxcywh_to_xyxy(out.boxes[b, out.valid[b]]))[0].amax(1) >= 0.5
                for b, t in enumerate(targets)]
        return torch.cat(hits).float().mean(), torch.cat([h[:2] for h in hits]).float().mean(), out

    before, _, _ = recall()
    for step in range(50):  # ground-truth patches first (use_target_epoch=1), then generated ones
        out = run(targets, epoch=0 if step < 12 else 1)
        loss = anchor_generator_loss(out.patches, targets, sizes)["loss_anchor"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, small, out = recall()
    assert before < 0.5 and after >= 0.9 and small >= 0.75, (before, after, small)
    assert any(p.level == 3 and len(p.batch_idx) > 0 for p in out.patches)  # P3 probed for small objects


def _fsdp_worker(rank, tmp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    g = make(0)
    fully_shard(g, mesh=init_device_mesh("cpu", (2,)))  # one unit: the same collectives on every rank
    _ddp_loss(g, rank).backward()
    # FSDP2 reduce-scatters the mean of the ranks' gradients
    torch.save({n: p.grad.full_tensor() for n, p in g.named_parameters() if p.grad is not None}, tmp / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow  # two spawned processes
def test_fsdp2_matches_one_process(tmp_path):
    from tests.integration.test_distributed import run_workers

    results = run_workers(_fsdp_worker, tmp_path)
    g = make(0)
    (0.5 * (_ddp_loss(g, 0) + _ddp_loss(g, 1))).backward()
    for res in results:
        assert res.keys() == {n for n, p in g.named_parameters() if p.grad is not None}
        for name, p in g.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(res[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_bfloat16_parameters_keep_float32_coordinates_and_loss():
    x = maps([(256, 320), (200, 300)])
    sizes = torch.tensor([[256, 320], [200, 300]])
    ref = make(0)(x, sizes)
    g = make(0).to(torch.bfloat16)
    out = g([f.bfloat16() for f in x], sizes)
    assert out.boxes.dtype == out.scores.dtype == torch.float32  # pixel coordinates need > 8 bits
    assert abs(int(out.valid.sum()) - int(ref.valid.sum())) <= 10
    g.train()
    out = g([f.bfloat16() for f in x], sizes, TARGETS)
    loss = anchor_generator_loss(out.patches, TARGETS, sizes)
    assert loss["loss_anchor"].dtype == torch.float32 and torch.isfinite(loss["loss_anchor"])
    loss["loss_anchor"].backward()
    assert g.proj_patch.layers[0].weight.grad.dtype == torch.bfloat16
