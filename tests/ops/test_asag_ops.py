import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import effnn
from effnn.ops.asag import (
    PatchPredictions,
    anchor_generator_loss,
    area_weights,
    box_cxcywh_to_xyxy,
    crop_pos_from_centers,
    image_to_patch,
    linear_sum_assignment,
    nms,
    patch_to_image,
    quality_focal_loss_with_ignore,
    query_weight_norm,
    query_weighted_box_losses,
    query_weighted_focal_loss,
    query_weights,
    resize_valid_bilinear,
)
from tests.naive import _asag_nms_naive, asag_anchor_loss_naive, asag_query_weights_naive

D = torch.float64
NORM0 = (1 / (1 + math.exp(1.5))) / (1 / (1 + math.exp(-3)))  # Norm(0) = sigmoid(-1.5) / sigmoid(3)


# ---- Query Weighting: closed forms, monotonicity, the naive formula ---------------------------


def test_query_weights_closed_forms():
    assert NORM0 == pytest.approx(0.191508, abs=1e-6)
    s = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0], dtype=D)
    iou = torch.tensor([0.7, 1.0, 0.0, 0.3, 0.0], dtype=D)
    w_pos, w_neg = query_weights(s, iou)
    torch.testing.assert_close(w_pos, torch.tensor([NORM0, 1.0, NORM0, float(query_weight_norm(torch.tensor(0.3**0.6, dtype=D))), NORM0], dtype=D))
    # w_neg: 0 at a perfect match, Norm(1) - Norm(0) = 0.8085 for a sure score and IoU^0.6 < 0.5
    torch.testing.assert_close(w_neg[:4], torch.tensor([0.0, 0.0, 1 - NORM0, 1 - NORM0], dtype=D))
    assert 1 - NORM0 == pytest.approx(0.8085, abs=1e-4)
    assert effnn.query_weights is query_weights


def test_query_weights_against_naive():
    g = torch.Generator().manual_seed(1)
    s, iou = torch.rand(200, generator=g, dtype=D), torch.rand(200, generator=g, dtype=D)
    for gamma1, gamma2 in ((0.4, 0.6), (1.0, 1.0)):
        w_pos, w_neg = query_weights(s, iou, gamma1, gamma2)
        ref = torch.tensor([asag_query_weights_naive(a, b, gamma1, gamma2) for a, b in zip(s.tolist(), iou.tolist(), strict=False)], dtype=D)
        torch.testing.assert_close(w_pos, ref[:, 0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w_neg, ref[:, 1], rtol=1e-12, atol=1e-12)
    assert not query_weights(s.requires_grad_(), iou)[0].requires_grad  # loss weights only


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_query_weights_monotone(s1, s2, i1, i2):
    (s_lo, s_hi), (i_lo, i_hi) = sorted((s1, s2)), sorted((i1, i2))
    t = lambda *v: torch.tensor(v, dtype=D)  # noqa: E731
    p, n = query_weights(t(s_lo, s_hi, s_lo), t(i_lo, i_lo, i_hi))
    eps = 1e-12
    assert p[1] >= p[0] - eps and p[2] >= p[0] - eps  # w_pos rises with score and IoU
    assert n[1] >= n[0] - eps and n[2] <= n[0] + eps  # w_neg rises with score, falls with IoU
    assert NORM0 - eps <= p.min() and p.max() <= 1 + eps and -eps <= n.min() and n.max() <= 1 - NORM0 + eps


def test_area_weights():
    b = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.25, 0.25]], dtype=D)
    torch.testing.assert_close(area_weights(b), torch.tensor([4.0, 1.0, 3.25], dtype=D))
    torch.testing.assert_close(area_weights(b, inverse=True), torch.tensor([1.0, 4.0, 1.75], dtype=D))


def test_weighted_focal_loss_against_loop():
    g = torch.Generator().manual_seed(0)
    B, Q, C = 2, 5, 3
    logits = torch.randn(B, Q, C, generator=g, dtype=D, requires_grad=True)
    bi, qi, lab = torch.tensor([0, 0, 1]), torch.tensor([1, 3, 0]), torch.tensor([2, 0, 1])
    wp, wn, a = torch.rand(3, generator=g, dtype=D), torch.rand(3, generator=g, dtype=D), torch.rand(3, generator=g, dtype=D) + 1
    valid = torch.ones(B, Q, dtype=torch.bool)
    valid[1, 4] = False
    loss = query_weighted_focal_loss(logits, bi, qi, lab, wp, wn, a, valid, num_boxes=3.0)
    ref = 0.0
    for b, q, c in itertools.product(range(B), range(Q), range(C)):
        x = float(logits[b, q, c].detach())
        p = 1 / (1 + math.exp(-x))
        if not valid[b, q]:
            continue
        m = [j for j in range(3) if (bi[j], qi[j], lab[j]) == (b, q, c)]
        if m:
            j = m[0]
            ref += a[j] * (wp[j] * -math.log(p) + wn[j] * -math.log(1 - p))
        else:
            ref += -math.log(1 - p) * p * p
    torch.testing.assert_close(loss, torch.as_tensor(ref / 3.0, dtype=D), rtol=1e-12, atol=1e-12)
    fn = lambda x: query_weighted_focal_loss(x, bi, qi, lab, wp, wn, a, valid, 3.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


def test_weighted_box_losses_and_qfl():
    g = torch.Generator().manual_seed(0)
    pred = torch.cat([torch.rand(4, 2, generator=g, dtype=D), torch.rand(4, 2, generator=g, dtype=D) * 0.3 + 0.1], 1)
    tgt = torch.cat([torch.rand(4, 2, generator=g, dtype=D), torch.rand(4, 2, generator=g, dtype=D) * 0.3 + 0.1], 1)
    w, a = torch.rand(4, generator=g, dtype=D), torch.rand(4, generator=g, dtype=D) + 1
    l1, giou = query_weighted_box_losses(pred.requires_grad_(), tgt, w, a, num_boxes=2.0)
    torch.testing.assert_close(l1, ((pred - tgt).abs().sum(1) * w * a).sum() / 2)
    gi = torch.diag(_giou_matrix(pred.detach(), tgt))
    torch.testing.assert_close(giou, ((1 - gi) * w * a).sum() / 2)
    assert torch.autograd.gradcheck(lambda p: sum(query_weighted_box_losses(p, tgt, w, a)), (pred,))
    logits = torch.randn(3, 4, generator=g, dtype=D, requires_grad=True)
    pi, si, iou = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0.6, 0.2], dtype=D)
    ignore = torch.zeros(3, 4, dtype=torch.bool)
    ignore[1, 0] = True
    loss = quality_focal_loss_with_ignore(logits, pi, si, iou, torch.tensor([2.0, 1.0], dtype=D), ignore)
    p = torch.sigmoid(logits.detach())
    ref = (-torch.log1p(-p) * p**2)
    ref[0, 1] = (F.binary_cross_entropy(p[0, 1], iou[0]) * (iou[0] - p[0, 1]).abs() ** 2 * 2)
    ref[2, 3] = (F.binary_cross_entropy(p[2, 3], iou[1]) * (iou[1] - p[2, 3]).abs() ** 2 * 1)
    ref[1, 0] = 0
    torch.testing.assert_close(loss, ref.sum())


def _giou_matrix(a, b):
    return effnn.ops.asag.generalized_box_iou(box_cxcywh_to_xyxy(a), box_cxcywh_to_xyxy(b))[1]


# ---- matching and NMS -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 7), (7, 4), (20, 5), (0, 3)])
def test_linear_sum_assignment_exact(shape):
    rng = np.random.default_rng(sum(shape))
    c = rng.normal(size=shape)
    r, k = linear_sum_assignment(c)
    assert len(r) == min(shape) and len(set(k.tolist())) == len(k) and list(r) == sorted(r)
    if min(shape) and max(shape) <= 7:  # brute force
        best = min(
            sum(c[i, j] for i, j in (zip(rows, cols, strict=False) if shape[0] <= shape[1] else zip(cols, rows, strict=False)))
            for rows in [range(min(shape))]
            for cols in itertools.permutations(range(max(shape)), min(shape))
        )
        assert c[r, k].sum() == pytest.approx(best, abs=1e-12)
    scipy = pytest.importorskip("scipy.optimize")
    r2, k2 = scipy.linear_sum_assignment(c)
    assert np.array_equal(r, r2) and np.array_equal(k, k2)  # unique optimum on random costs


def test_linear_sum_assignment_ties_and_errors():
    r, k = linear_sum_assignment(np.zeros((3, 5)))
    assert len(set(k.tolist())) == 3
    with pytest.raises(ValueError, match="NaN or inf"):
        linear_sum_assignment(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        linear_sum_assignment(np.zeros(3))


def test_nms_matches_greedy_and_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g, dtype=D) * 100
    boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=g, dtype=D) * 40 + 5], 1)
    scores = torch.rand(60, generator=g, dtype=D)
    groups = torch.randint(0, 3, (60,), generator=g)
    keep = nms(boxes, scores, 0.25, groups)
    ref = []
    for grp in range(3):
        idx = torch.nonzero(groups == grp).flatten()
        ref += [int(idx[i]) for i in _asag_nms_naive(boxes[idx], scores[idx], 0.25)]
    assert sorted(keep.tolist()) == sorted(ref)
    assert torch.all(scores[keep][1:] <= scores[keep][:-1])
    tv = pytest.importorskip("torchvision")
    assert torch.equal(keep, tv.ops.batched_nms(boxes, scores, groups, 0.25))
    assert len(nms(boxes[:0], scores[:0], 0.5)) == 0


# ---- patches and coordinates ------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3), st.sampled_from([5, 30]))
def test_resize_valid_bilinear_is_interpolate(sizes, out):
    x = torch.randn(len(sizes), 3, 9, 9, dtype=D)
    y = resize_valid_bilinear(x, torch.tensor(sizes), out)
    for b, (h, w) in enumerate(sizes):
        ref = F.interpolate(x[b:b + 1, :, :h, :w], size=(out, out), mode="bilinear")
        torch.testing.assert_close(y[b:b + 1], ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.floats(1, 2000), st.floats(1, 2000), st.floats(0, 1), st.floats(0, 1), st.sampled_from([8, 16]), st.sampled_from([5, 15]))
def test_crop_pos_inside_valid_cells(w, h, fx, fy, s, ps):
    c = torch.tensor([[fx * w, fy * h]], dtype=D)
    wh = torch.tensor([[w, h]], dtype=D)
    pos = crop_pos_from_centers(c, wh, s, ps)[0]
    cells = torch.ceil(wh[0] / s)
    assert (pos >= 0).all()
    for d in range(2):
        if cells[d] >= ps:  # the patch lies inside the valid cells and contains the centre's cell
            assert pos[d] + ps <= cells[d] and pos[d] <= c[0, d] / s < pos[d] + ps + 1
        else:  # a map smaller than a patch: start at 0, the rest is zero padding
            assert pos[d] == 0


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 100), st.integers(0, 100), st.floats(16, 1600), st.floats(16, 1600), st.sampled_from([8, 16, 32]),
       st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_patch_image_round_trip(x0, y0, w, h, s, box):
    crop = torch.tensor([[x0, y0]])
    grid = torch.tensor([[w / s, h / s]], dtype=D)
    b = torch.tensor([[box]], dtype=D)
    img = patch_to_image(b, crop, grid, 15)
    torch.testing.assert_close(image_to_patch(img, crop, grid, 15), b, rtol=1e-9, atol=1e-9)
    # the patch's corners land on its cells in pixels
    corner = patch_to_image(torch.tensor([[[0.0, 0.0, 1.0, 1.0]]], dtype=D), crop, grid, 15)[0, 0]
    torch.testing.assert_close(corner[:2] * torch.tensor([w, h], dtype=D), torch.tensor([x0 * s, y0 * s], dtype=D))
    torch.testing.assert_close(corner[2:] * torch.tensor([w, h], dtype=D), torch.tensor([15.0 * s, 15.0 * s], dtype=D))


# ---- the generator's criterion against a slot-by-slot loop ------------------------------------


def _preds(g, P, K):
    box = torch.cat([torch.rand(P, K, 2, generator=g, dtype=D), torch.rand(P, K, 2, generator=g, dtype=D) * 0.5 + 0.05], -1)
    return torch.cat([box, torch.randn(P, K, 1, generator=g, dtype=D)], -1).requires_grad_()


def test_anchor_generator_loss_against_loop():
    g = torch.Generator().manual_seed(3)
    K = 4
    # two images of 256x320: one P6 patch each, 4 quadrants each, 3 P4 patches (stride 16, 5 cells)
    sizes = torch.tensor([[256, 320], [256, 320]])
    targets = [torch.tensor([[0.2, 0.3, 0.1, 0.12], [0.7, 0.6, 0.2, 0.3], [0.3, 0.8, 0.05, 0.05]], dtype=D),
               torch.tensor([[0.55, 0.45, 0.08, 0.1]], dtype=D)]
    p6, p5, p4 = _preds(g, 2, K), _preds(g, 8, K), _preds(g, 3, K)
    one = lambda n: torch.ones(n, dtype=torch.bool)  # noqa: E731
    zeros = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731
    quads = torch.tensor([[0, 0], [15, 0], [0, 15], [15, 15]]).repeat(2, 1)
    crop4 = torch.tensor([[0, 0], [2, 6], [8, 4]])
    patches = [
        PatchPredictions(6, p6, torch.tensor([0, 1]), zeros(2)[:, None].repeat(1, 2), zeros(2), one(2), 32, 15),
        PatchPredictions(5, p5, torch.arange(2).repeat_interleave(4), quads, zeros(8), one(8), 32, 15),
        PatchPredictions(4, p4, torch.tensor([0, 0, 1]), crop4, zeros(3), one(3), 16, 5),
    ]
    out = anchor_generator_loss(patches, targets, sizes)

    def split(b, x0, y0, gw, gh, ps, max_wh):
        rows = []
        for t in targets[b].tolist():
            lo, hi = (x0 / gw, y0 / gh), ((x0 + ps) / gw, (y0 + ps) / gh)
            if not (lo[0] <= t[0] <= hi[0] and lo[1] <= t[1] <= hi[1]):
                continue
            if max_wh and (t[2] > ps / gw or t[3] > ps / gh):
                continue
            x1, y1 = min(max(t[0] - t[2] / 2, lo[0]), hi[0]), min(max(t[1] - t[3] / 2, lo[1]), hi[1])
            x2, y2 = min(max(t[0] + t[2] / 2, lo[0]), hi[0]), min(max(t[1] + t[3] / 2, lo[1]), hi[1])
            x1, x2 = (x1 - lo[0]) * gw / ps, (x2 - lo[0]) * gw / ps
            y1, y2 = (y1 - lo[1]) * gh / ps, (y2 - lo[1]) * gh / ps
            rows.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        return torch.tensor(rows, dtype=D).reshape(-1, 4)

    groups = [
        ([(p6[b].detach(), targets[b]) for b in range(2)], True, 1.0),
        ([(p5[i].detach(), split(i // 4, *quads[i].tolist(), 30, 30, 15, False)) for i in range(8)], False, 1.0),
        ([(p4[i].detach(), split(b, *crop4[i].tolist(), 320 / 16, 256 / 16, 5, True)) for i, b in enumerate([0, 0, 1])], False, 4 / 3),
    ]
    assert sum(len(t) for _, t in groups[2][0]) > 0  # the P4 patches have targets
    ce, l1, giou = asag_anchor_loss_naive(groups)
    for key, ref in (("loss_ce_anchor", ce), ("loss_bbox_anchor", l1), ("loss_giou_anchor", giou)):
        torch.testing.assert_close(out[key], torch.as_tensor(ref / 4, dtype=D), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["loss_anchor"], out["loss_ce_anchor"] * 8 + out["loss_bbox_anchor"] * 4 + out["loss_giou_anchor"] * 2)
    out["loss_anchor"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (p6, p5, p4))


def test_anchor_generator_loss_without_targets():
    g = torch.Generator().manual_seed(0)
    p6 = _preds(g, 1, 3)
    patches = [PatchPredictions(6, p6, torch.tensor([0]), torch.zeros(1, 2, dtype=torch.long),
                                torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), 32, 15)]
    out = anchor_generator_loss(patches, [torch.zeros(0, 4, dtype=D)], torch.tensor([[64, 64]]))
    p = torch.sigmoid(p6[..., 4].detach())
    torch.testing.assert_close(out["loss_ce_anchor"], (-torch.log1p(-p) * p**2).sum())
    assert out["loss_bbox_anchor"] == 0 and out["loss_giou_anchor"] == 0
    with pytest.raises(ValueError, match="targets for"):
        anchor_generator_loss(patches, [], torch.tensor([[64, 64]]))
