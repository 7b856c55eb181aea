"""The one-decoder-layer ASAG detector: RoIAlign against torchvision, shapes, a training step,
inference without the auxiliary heads, the parameter count and the multiply-adds of the ResNet-50
model at 800x1333 against counts written from the official modules' structure.

The expected counts are written from iSEE-Laboratory/ASAG ``models/rpn.py`` (``RelationBlock``),
``models/adamixer_decoder.py`` / ``adamixer_decoder_utils.py`` (``AdaMixerDecoder``,
``AdaMixerDecoderStage``, ``AdaptiveSamplingMixing``, ``AdaptiveMixing``), torchvision's
``FeaturePyramidNetwork`` and ``resnet50``, not from effnn's modules.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effnn.models import asag_detector
from effnn.models.asag import DenseAnchorHead, detection_loss, hungarian_match
from effnn.ops.roi_align import multi_scale_roi_align, roi_align

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def random_boxes(shape, scale, gen):
    b = torch.rand(*shape, 4, dtype=F64, generator=gen) * scale
    return torch.cat([torch.minimum(b[..., :2], b[..., 2:]), torch.maximum(b[..., :2], b[..., 2:])], -1)


# ---- RoIAlign -----------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_roi_align_matches_torchvision(aligned, sampling_ratio):
    tv = pytest.importorskip("torchvision.ops")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 13, 17, dtype=F64, generator=gen)
    boxes = random_boxes((2, 30), 90, gen) - 10  # some beyond the map, some partly outside
    boxes[0, 0] = torch.tensor([5.0, 5.0, 5.5, 5.2], dtype=F64)  # under one cell
    boxes[0, 1] = torch.tensor([20.0, 20.0, 10.0, 10.0], dtype=F64)  # malformed (x1 < x0)
    boxes[1, 0] = torch.tensor([-30.0, -30.0, -10.0, -8.0], dtype=F64)  # wholly outside
    rois = torch.cat([torch.arange(2, dtype=F64).repeat_interleave(30)[:, None], boxes.flatten(0, 1)], 1)
    ref = tv.roi_align(x, rois, 7, 0.25, sampling_ratio, aligned)
    ours = roi_align(x, boxes, 7, 0.25, sampling_ratio, aligned).flatten(0, 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_multi_scale_roi_align_matches_torchvision():
    tv = pytest.importorskip("torchvision.ops")
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 4, 512 // s, 640 // s, dtype=F64, generator=gen) for s in (4, 8, 16, 32)]
    boxes = random_boxes((2, 40), 640, gen)
    boxes[:, :10] *= 0.1  # small boxes: the finest level
    boxes[:, 10] = torch.tensor([0.0, 0.0, 600.0, 500.0], dtype=F64)  # the coarsest
    pool = tv.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
    ref = pool(dict(zip(pool.featmap_names, feats, strict=True)), list(boxes), [(512, 640), (500, 600)])
    ours = multi_scale_roi_align(feats, (4, 8, 16, 32), boxes)
    levels = {int(v) for v in torch.floor(4 + torch.log2(((boxes[..., 2:] - boxes[..., :2]).prod(-1)).sqrt() / 224 + 1e-6)).clamp(2, 5).flatten()}
    assert levels == {2, 3, 4, 5}  # every level is exercised
    torch.testing.assert_close(ours.flatten(0, 1), ref, rtol=0, atol=1e-12)


def test_roi_align_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 6, 7, dtype=F64, generator=gen, requires_grad=True)
    boxes = random_boxes((1, 3), 28, gen)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, boxes, 2, 0.25, 2), (x,))


# ---- the small detector -------------------------------------------------------------------------


TARGETS = [
    {"boxes": torch.tensor([[0.3, 0.3, 0.1, 0.12], [0.6, 0.55, 0.4, 0.3]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


def small(anchors="asag"):
    torch.manual_seed(0)
    kw = {"compress_dim": 4} if anchors == "asag" else {}
    return asag_detector(3, backbone="small", anchors=anchors, d_model=32, feedforward_channels=64, **kw)


@pytest.mark.parametrize("anchors", ["asag", "dense"])
def test_train_step_reaches_every_trainable_parameter(anchors):
    model = small(anchors).train()
    images = torch.randn(2, 3, 128, 160)
    sizes = torch.tensor([[128, 160], [100, 120]])
    out = model(images, sizes, TARGETS, epoch=1)
    B, N = out["valid"].shape
    assert out["pred_logits"].shape == (B, N, 3) and out["pred_boxes"].shape == (B, N, 4)
    assert len(out["aux_outputs"]) == 3
    assert all(lg.shape == (B, N, 3) and bx.shape == (B, N, 4) for lg, bx in out["aux_outputs"])
    assert out["proposals"][0].shape == (B, N, 3)
    losses = detection_loss(out, TARGETS)
    expected = {f"loss_{k}{s}" for k in ("ce", "bbox", "giou") for s in ("", "_rpn", "_0", "_1", "_2", "_anchor")}
    assert expected <= losses.keys()
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # non-zero everywhere, except behind the zero-initialised ``fc_reg`` (the official init)
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert zero and all(".reg_fcs." in n for n in zero), zero


def test_eval_runs_only_the_main_head():
    model = small().eval()
    called = []
    for i, head in enumerate(model.decoder.bbox_head):
        head.register_forward_hook(lambda *_, i=i: called.append(i))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128))
        dets = model.detect(torch.randn(2, 3, 128, 128), top_k=10)
    assert called == [3, 3]  # the last stage is the main head (official ``used_head="main"``)
    assert "aux_outputs" not in out
    assert out["pred_logits"].shape[:2] == out["valid"].shape
    assert len(dets) == 2 and dets[0]["boxes"].shape == (10, 4) and dets[0]["labels"].max() < 3
    model.train()
    out = model(torch.randn(2, 3, 128, 128), targets=TARGETS, epoch=1)
    assert called[2:] == [0, 1, 2, 3]


def test_padded_anchors_do_not_change_valid_queries():
    """Padding anchors (whole-image boxes) are hidden from the valid queries' attention, so a
    query's output does not depend on how much padding its batch adds."""
    model = small().eval()
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        feats = model.neck(model.backbone(images))
        anchors = model.anchor_generator(feats[1:], torch.tensor([[128, 128]]))
        wh = torch.tensor([[128.0, 128.0]])
        ref = model.rpn(feats, anchors.boxes, wh, anchors.valid)
        pad = torch.tensor([[64.0, 64.0, 128.0, 128.0]]).expand(1, 7, 4)
        boxes = torch.cat([anchors.boxes, pad], 1)
        valid = torch.cat([anchors.valid, torch.zeros(1, 7, dtype=torch.bool)], 1)
        out = model.rpn(feats, boxes, wh, valid)
    n = anchors.boxes.shape[1]
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(b[:, :n], a, rtol=1e-5, atol=1e-5)


def test_hungarian_match_is_optimal_and_skips_padding():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 3, generator=gen)
    boxes = torch.rand(2, 6, 4, generator=gen) * 0.4 + 0.2
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    targets = [{"boxes": torch.rand(2, 4, generator=gen) * 0.4 + 0.2, "labels": torch.tensor([0, 1])},
               {"boxes": torch.rand(3, 4, generator=gen) * 0.4 + 0.2, "labels": torch.tensor([2, 2, 0])}]
    b, q, t = hungarian_match(logits, boxes, valid, targets)
    assert b.tolist() == [0, 0, 1, 1, 1]
    assert valid[b, q].all() and len(set(zip(b.tolist(), q.tolist(), strict=True))) == 5
    assert sorted(t[b == 1].tolist()) == [0, 1, 2]


def test_dense_anchor_head_takes_the_top_cells():
    head = DenseAnchorHead(16, num_anchors=7)
    feats = [torch.randn(2, 16, 64 // s, 64 // s) for s in (8, 16, 32)]
    anchors, pred = head(feats, torch.tensor([[64, 64], [40, 64]]))
    assert anchors.boxes.shape == (2, 7, 4) and pred.shape == (2, 64 + 16 + 4, 5)
    # image 1 is 40 px high: cells whose centre lies below it are never anchors
    assert (anchors.boxes[1, :, 1] < 40).all() and anchors.valid.all()


def test_bad_input():
    model = small().train()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 100, 128))
    with pytest.raises(ValueError, match="targets"):
        model(torch.randn(2, 3, 128, 128))
    with pytest.raises(ValueError, match="backbone"):
        asag_detector(3, backbone="resnet18")
    with pytest.raises(ValueError, match="num_queries"):
        asag_detector(3, backbone="small", num_queries=200)


# ---- parameters and multiply-adds of the ResNet-50 model ------------------------------------------

RESNET50 = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # planes, blocks, stride


def resnet50_convs(h, w):
    """(conv parameters, conv multiply-adds at an h x w input) of torchvision's ResNet-50 C2-C5
    (stride in the 3x3 conv, v1.5; no fc)."""
    h, w = h // 2, w // 2
    params, macs = 3 * 64 * 49, 3 * 64 * 49 * h * w
    h, w = h // 2, w // 2  # max pool
    c = 64
    for planes, blocks, stride in RESNET50:
        for i in range(blocks):
            s = stride if i == 0 else 1
            ho, wo = h // s, w // s
            params += c * planes + planes * planes * 9 + planes * planes * 4
            macs += c * planes * h * w + planes * planes * 9 * ho * wo + planes * planes * 4 * ho * wo
            if i == 0:
                params += c * planes * 4
                macs += c * planes * 4 * ho * wo
            c, h, w = planes * 4, ho, wo
    return params, macs


def heads_params(num_classes, d=256, ffn=2048, heads=4, in_points=32, out_points=128, groups=4):
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    ln = 2 * d
    mha = 3 * d * d + 3 * d + d * d + d
    branches = lin(d, d, False) + ln + lin(d, num_classes) + 3 * (lin(d, d, False) + ln) + lin(d, 4)
    rpn = lin(49 * d, d) + 3 * ln + lin(d, ffn) + lin(ffn, d) + mha + 8 + branches
    e = d // groups
    mixing = lin(d, groups * (e * e + in_points * out_points)) + lin(e * out_points * groups, d)
    stage = mha + ln + lin(d, ffn) + lin(ffn, d) + ln + branches + 8 + lin(d, in_points * groups * 3) + ln + mixing
    return rpn, stage, heads * d


def test_resnet50_parameter_count():
    with torch.device("meta"):  # counts only: no memory, no initialisation time
        model = asag_detector(80)
    backbone, _ = resnet50_convs(800, 1344)
    fpn = sum(c * 256 + 256 for c in (256, 512, 1024, 2048)) + 4 * (256 * 256 * 9 + 256)
    rpn, stage, embedding = heads_params(80)
    expected = backbone + fpn + 6_097_494 + rpn + 4 * stage + embedding  # the generator: official count
    assert sum(p.numel() for p in model.parameters()) == expected == 111_751_906
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_convs = 3 * 64 * 49 + 64 * 64 + 64 * 64 * 9 + 64 * 256 + 64 * 256 + 2 * (256 * 64 + 64 * 64 * 9 + 64 * 256)
    assert trainable == expected - frozen_convs  # stem and layer1 frozen, as the official backbone
    assert not any(b.requires_grad for b in model.backbone.buffers())  # frozen BatchNorm
    assert 3 * stage == 55_530_900  # the auxiliary stages: half the parameters, none run at inference


def multiply_adds(h, w, n, d=256, ffn=2048, K=80, P_in=32, P_out=128, G=4):
    """Multiply-adds of the eval forward of the ResNet-50 detector on an h x w image with n anchors
    and nothing probed: ResNet-50 convs, FPN convs, the generator's fixed stage, the RoI projection
    and the RelationBlock's and the main stage's linears and matrix products. The two attention
    products (QK^T, AV: 2 n^2 d per attention) are returned apart: FlopCounterMode does not see them
    inside ``nn.MultiheadAttention``'s fused eval path."""
    hw = [(h // s) * (w // s) for s in (4, 8, 16, 32)]
    backbone = resnet50_convs(h, w)[1]
    fpn = sum(c * 256 * a for c, a in zip((256, 512, 1024, 2048), hw, strict=True)) + sum(256 * 256 * 9 * a for a in hw)
    # the generator's fixed stage (tests/nn/test_asag.py): compression of P5, P6 conv, proj_all on 5 patches
    c5 = hw[3] * (256 * 128 + 128 * 8 * 9)
    generator = c5 + 15 * 15 * 8 * 8 * 9 + 5 * (1800 * 1000 + 1000 * 1000 + 1000 * 250)
    projections = 4 * d * d * n  # q, k, v, out
    branches = 4 * d * d * n + d * K * n + d * 4 * n
    rpn = 49 * d * d * n + projections + 2 * d * ffn * n + branches
    e = d // G
    mixing = d * G * (e * e + P_in * P_out) * n + G * n * (P_in * e * e + P_out * P_in * e) + e * P_out * G * d * n
    stage = projections + d * P_in * G * 3 * n + mixing + 2 * d * ffn * n + branches
    return backbone + fpn + generator + rpn + stage, 2 * 2 * n * n * d


def test_resnet50_multiply_adds():
    """FlopCounterMode (2 per multiply-add) of the eval forward at 480x640 equals the formula,
    which gives 153.55 G at 800x1333 (padded to 800x1344) with the 200 anchors that the random
    initialisation emits there (the generator probes nothing; measured by examples/asag_shapes.py
    --cost, docs/asag.md)."""
    with torch.device("meta"):
        model = asag_detector(80).eval()
    model.to_empty(device="cpu")  # values do not change the count; zeros are quicker than an init
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.zero_()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(torch.zeros(1, 3, 480, 640))
    n = int(out["valid"].sum())
    assert n > 0 and not any(len(p.batch_idx) for p in out["anchors"].patches if p.level in (3, 4))
    counted, products = multiply_adds(480, 640, n)
    assert fc.get_total_flops() == 2 * counted
    counted, products = multiply_adds(800, 1344, 200)
    assert counted == 153_509_958_800 and products == 40_960_000
    assert round((counted + products) / 1e9, 2) == 153.55


# ---- AdaMixer pieces against loops written from the official description -------------------------


def test_sampling_3d_matches_a_loop():
    """Every point reads every level bilinearly (zero outside the map; cell centres at (i + 0.5)
    stride) with weight softmax_l(-(z - l)^2 / 2), group g from channel group g."""
    from effnn.nn.adamixer import sampling_3d

    gen = torch.Generator().manual_seed(4)
    strides, G, P = (4, 8, 16), 2, 3
    feats = [torch.randn(1, 4, 32 // s, 40 // s, dtype=F64, generator=gen) for s in strides]
    pts = torch.rand(1, 2, G * P, 3, dtype=F64, generator=gen) * torch.tensor([11.0, 9.0, 2.0], dtype=F64) - torch.tensor([0.5, 0.5, 0.2], dtype=F64)
    out = sampling_3d(pts, feats, strides, G)
    C = 4 // G
    ref = torch.zeros(1, 2, G, P, C, dtype=F64)
    for n in range(2):
        for g in range(G):
            for p in range(P):
                x, y, z = pts[0, n, g * P + p].tolist()
                w = torch.softmax(torch.tensor([-((z - l) ** 2) / 2 for l in range(3)], dtype=F64), 0)
                for l, (f, s) in enumerate(zip(feats, strides, strict=True)):
                    fx, fy = x * strides[0] / s - 0.5, y * strides[0] / s - 0.5  # in cells
                    x0, y0 = int(torch.floor(torch.tensor(fx))), int(torch.floor(torch.tensor(fy)))
                    for yy, wy in ((y0, 1 - (fy - y0)), (y0 + 1, fy - y0)):
                        for xx, wx in ((x0, 1 - (fx - x0)), (x0 + 1, fx - x0)):
                            if 0 <= yy < f.shape[2] and 0 <= xx < f.shape[3]:
                                ref[0, n, g, p] += w[l] * wy * wx * f[0, g * C:(g + 1) * C, yy, xx]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_adaptive_mixing_and_iof_bias_match_loops():
    from effnn.nn.adamixer import AdaptiveMixing, boxes_to_xyzr, xyzr_to_boxes

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    mix = AdaptiveMixing(in_dim=8, in_points=3, n_groups=2, query_dim=6, out_points=5, activation="gelu").double()
    torch.nn.init.normal_(mix.parameter_generator[0].weight)  # the zero init would hide the query's part
    x = torch.randn(1, 2, 2, 3, 4, dtype=F64, generator=gen)
    q = torch.randn(1, 2, 6, dtype=F64, generator=gen)
    out = mix(x, q)
    for n in range(2):
        params = mix.parameter_generator(q[0, n]).view(2, -1)
        parts = []
        for g in range(2):
            M, S = params[g, :16].view(4, 4), params[g, 16:].view(5, 3)
            h = torch.nn.functional.gelu(torch.nn.functional.layer_norm(x[0, n, g] @ M, (3, 4)))
            parts.append(torch.nn.functional.gelu(torch.nn.functional.layer_norm(S @ h, (5, 4))).flatten())
        torch.testing.assert_close(out[0, n], q[0, n] + mix.out_proj(torch.cat(parts)), rtol=0, atol=1e-12)
    boxes = random_boxes((1, 5), 60, gen) + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64)
    torch.testing.assert_close(xyzr_to_boxes(boxes_to_xyzr(boxes, 4)) * 4, boxes, rtol=1e-6, atol=1e-6)


def test_iof_self_attention_matches_a_loop():
    """logits_h(i, j) = q_i . k_j / sqrt(d_h) + tau_h log(IoF(i, j) + 1e-7), IoF = intersection /
    area of box i; q = k = v = query + PE(xyzr); output W_o(attention) + (query + PE); valid
    queries do not attend to padding."""
    from effnn.nn.adamixer import boxes_to_xyzr, iof_self_attention, xyzr_position_embedding

    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    C, H, N = 8, 2, 4
    attn = torch.nn.MultiheadAttention(C, H, batch_first=True).double()
    tau = torch.rand(H, dtype=F64, generator=gen) * 4
    boxes = random_boxes((1, N), 40, gen) + torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=F64)
    xyzr = boxes_to_xyzr(boxes, 4)
    query = torch.randn(1, N, C, dtype=F64, generator=gen)
    valid = torch.tensor([[True, True, True, False]])
    out = iof_self_attention(attn, query, xyzr, tau, valid)
    x = query[0] + xyzr_position_embedding(xyzr, C // 4)[0]
    Wq, Wk, Wv = attn.in_proj_weight.view(3, C, C)
    bq, bk, bv = attn.in_proj_bias.view(3, C)
    heads = []
    for h in range(H):
        sl = slice(h * C // H, (h + 1) * C // H)
        rows = []
        for i in range(N):
            logits = []
            for j in range(N):
                lt = torch.maximum(boxes[0, i, :2], boxes[0, j, :2])
                rb = torch.minimum(boxes[0, i, 2:], boxes[0, j, 2:])
                inter = (rb - lt).clamp(min=0).prod() / 16  # in stride-4 cells, as the xyzr
                area = (boxes[0, i, 2:] - boxes[0, i, :2]).prod() / 16
                qi, kj = (Wq @ x[i] + bq)[sl], (Wk @ x[j] + bk)[sl]
                lg = qi @ kj / (C // H) ** 0.5 + tau[h] * torch.log(inter / area + 1e-7)
                logits.append(lg if (valid[0, j] or not valid[0, i]) else torch.tensor(-torch.inf, dtype=F64))
            p = torch.softmax(torch.stack(logits), 0)
            rows.append(sum(p[j] * (Wv @ x[j] + bv)[sl] for j in range(N)))
        heads.append(torch.stack(rows))
    ref = attn.out_proj(torch.cat(heads, 1)) + x
    torch.testing.assert_close(out[0], ref, rtol=1e-6, atol=1e-9)
