"""Adaptive Sparse Anchor Generation (ASAG, Fu et al., ICCV 2023): the pure functions.

- boxes: conversions, pairwise and aligned IoU / GIoU, an exact greedy NMS without torchvision;
- patches: batched cropping of compressed patches (gather, no loop over images or patches), the
  batched bilinear resize of each image's valid region, patch <-> image coordinates;
- Query Weighting (paper eq. 1-3, ``SetCriterion.get_weight`` of the official
  ``models/criterion.py``): :func:`query_weights`, :func:`area_weights` and the weighted losses
  :func:`query_weighted_focal_loss`, :func:`query_weighted_box_losses`;
- the generator's own criterion: an exact Hungarian solver (:func:`linear_sum_assignment`),
  class-agnostic per-patch matching (``AnchorHungarianMatcher``), IoU soft labels with ignore
  (``quality_focal_loss_with_ignore``) and :func:`anchor_generator_loss`.

Every function is plain PyTorch (the matching solver runs in NumPy on the host, as scipy's would).
Boxes are (cx, cy, w, h) unless a name says xyxy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = [
    "PatchPredictions",
    "anchor_generator_loss",
    "anchor_match_cost",
    "area_weights",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_iou_aligned",
    "box_xyxy_to_cxcywh",
    "crop_pos_from_centers",
    "generalized_box_iou",
    "generalized_box_iou_aligned",
    "image_to_patch",
    "linear_sum_assignment",
    "nms",
    "padded_targets",
    "patch_to_image",
    "query_weight_norm",
    "query_weighted_box_losses",
    "query_weighted_focal_loss",
    "query_weights",
    "quality_focal_loss_with_ignore",
    "resize_valid_bilinear",
]


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def box_cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), -1)


def box_xyxy_to_cxcywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), -1)


def _area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes (..., N, 4) x (..., M, 4) -> (..., N, M) each."""
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(boxes1)[..., :, None] + _area(boxes2)[..., None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise (IoU, GIoU) of xyxy boxes (..., N, 4) x (..., M, 4) -> (..., N, M) each."""
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou, iou - (hull - union) / hull


def box_iou_aligned(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched xyxy pairs (..., 4) x (..., 4) -> (...) (the diagonal of :func:`box_iou`)."""
    return generalized_box_iou_aligned(boxes1, boxes2)[0]


def generalized_box_iou_aligned(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """(IoU, GIoU) of matched xyxy pairs (..., 4) x (..., 4) -> (...) each."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(boxes1) + _area(boxes2) - inter
    iou = inter / union
    lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou, iou - (hull - union) / hull


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor | None = None) -> Tensor:
    """Greedy NMS, exactly ``torchvision.ops.batched_nms`` (``nms`` when ``idxs`` is None) without
    torchvision: boxes (N, 4) xyxy, scores (N,), idxs (N,) groups that never suppress each other.
    A box is dropped when its IoU with a kept box of higher score is above ``iou_threshold``.
    Returns the kept indices by decreasing score (ties in input order).

    The greedy result is the unique fixed point of keep[j] = no kept i before j suppresses j, so it
    is found by iterating that vectorised rule (entries settle in order; usually a few rounds)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    suppress = box_iou(b, b)[0] > iou_threshold
    if idxs is not None:
        g = idxs[order]
        suppress &= g[:, None] == g[None, :]
    suppress = torch.triu(suppress, diagonal=1)  # only a higher-scored box suppresses
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for _ in range(len(order)):
        new = ~(suppress & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


# --------------------------------------------------------------------------------------------
# Patches and coordinates
# --------------------------------------------------------------------------------------------


def _axis_bilinear(n_in: Tensor, n_out: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices and weights of ``F.interpolate(mode="bilinear", align_corners=False)`` along
    one axis, per image: ``n_in`` (B,) valid input lengths -> (i0, i1, lambda1), each (B, n_out)."""
    scale = n_in.to(dtype) / n_out  # PyTorch's area_pixel_compute_scale without a scale factor
    dst = torch.arange(n_out, device=n_in.device, dtype=dtype)
    src = (scale[:, None] * (dst + 0.5) - 0.5).clamp(min=0)
    i0 = src.long()  # src >= 0: truncation is floor
    i1 = torch.where(i0 < n_in[:, None] - 1, i0 + 1, i0)
    return i0, i1, src - i0.to(dtype)


def resize_valid_bilinear(x: Tensor, valid_hw: Tensor, size: int) -> Tensor:
    """Bilinearly resize the top-left valid window of each map to (size, size), batched.

    x (B, C, H, W); valid_hw (B, 2) integer (h, w), 1 <= h <= H, 1 <= w <= W. Image b's result is
    ``F.interpolate(x[b:b+1, :, :h, :w], size=(size, size), mode="bilinear")`` (align_corners=False),
    as the official generator computes it image by image."""
    B, C, H, W = x.shape
    r0, r1, lr = _axis_bilinear(valid_hw[:, 0], size, x.dtype)
    c0, c1, lc = _axis_bilinear(valid_hw[:, 1], size, x.dtype)

    def rows(i):
        return x.gather(2, i[:, None, :, None].expand(B, C, size, W))

    y = rows(r0) * (1 - lr)[:, None, :, None] + rows(r1) * lr[:, None, :, None]

    def cols(i):
        return y.gather(3, i[:, None, None, :].expand(B, C, size, size))

    return cols(c0) * (1 - lc)[:, None, None, :] + cols(c1) * lc[:, None, None, :]


def crop_pos_from_centers(
    centers: Tensor, valid_wh: Tensor, stride: int, patch_size: int
) -> Tensor:
    """Top-left (x, y) grid cell of the patch_size x patch_size patch centred on each point
    (``generate_crop_pos`` of the official generator): centers (N, 2) in pixels, valid_wh (N, 2)
    the image's valid (w, h) in pixels. The patch is shifted to end inside ceil(valid/stride) cells,
    then to start at >= 0 (so a map smaller than a patch starts at 0 and the rest is padding)."""
    pos = torch.floor(centers / stride - patch_size / 2)
    offset = (torch.ceil(valid_wh / stride) - (pos + patch_size)).clamp(max=0)
    return (pos + offset).clamp(min=0).long()


def patch_to_image(boxes: Tensor, crop_pos: Tensor, grid_wh: Tensor, patch_size: int) -> Tensor:
    """Patch-normalised (cx, cy, w, h) (N, K, 4) -> image-normalised, for patches of patch_size
    cells at top-left ``crop_pos`` (N, 2) on a grid of ``grid_wh`` (N, 2) cells per image side
    (valid size / stride; 30 for the fixed-stage map)."""
    scale = (patch_size / grid_wh).repeat(1, 2)[:, None, :]
    out = boxes * scale
    return torch.cat((out[..., :2] + (crop_pos / grid_wh)[:, None, :], out[..., 2:]), -1)


def image_to_patch(boxes: Tensor, crop_pos: Tensor, grid_wh: Tensor, patch_size: int) -> Tensor:
    """The inverse of :func:`patch_to_image` (no clipping)."""
    scale = (grid_wh / patch_size).repeat(1, 2)[:, None, :]
    shifted = torch.cat((boxes[..., :2] - (crop_pos / grid_wh)[:, None, :], boxes[..., 2:]), -1)
    return shifted * scale


# --------------------------------------------------------------------------------------------
# Query Weighting
# --------------------------------------------------------------------------------------------

_NORM_SLOPE = 4.5  # Norm(x) = sigmoid(4.5 (x - 1/3)) / sigmoid(3): [0, 1] -> [0.1915, 1]
_NORM_SHIFT = 1.0 / 3.0


def query_weight_norm(x: Tensor) -> Tensor:
    """Norm(x) = sigmoid(4.5 (x - 1/3)) / sigmoid(3) (paper eq. 2): maps [0, 1] to [0.1915, 1]."""
    return torch.sigmoid((x - _NORM_SHIFT) * _NORM_SLOPE) / (1 / (1 + math.exp(-3.0)))


def _negative_quality(x: Tensor) -> Tensor:
    """DW's negative-quality term with alpha=2 (``normalize`` in ``get_weight``): 1 below 0.5,
    then (4/3)(1 - x^2), falling to 0 at x = 1."""
    return torch.where(x < 0.5, torch.ones_like(x), (1 - x * x) * (4.0 / 3.0))


def query_weights(
    scores: Tensor, ious: Tensor, gamma1: float = 0.4, gamma2: float = 0.6
) -> tuple[Tensor, Tensor]:
    """Query Weighting (paper eq. 1-3, official ``SetCriterion.get_weight`` for decoder outputs).

    For one-to-one matched queries with predicted probability ``scores`` = sigmoid(logit of the
    matched GT's class) and ``ious`` = IoU with that GT (same shape, in [0, 1]):

        w_pos = Norm(s^g1 IoU^g2)                              in [0.1915, 1]
        w_neg = Norm(s^g1 P_neg(IoU^g2)) - Norm(0)             in [0, 0.8085]
        P_neg(x) = 1 if x < 0.5 else (4/3)(1 - x^2)

    Norm is :func:`query_weight_norm`; Norm(0) = sigmoid(-1.5)/sigmoid(3) = 0.191508. The paper
    writes "- sigmoid(-1.5)"; the official code subtracts the normalised value, as here. Both are
    computed without gradient (they are loss weights, not in the matching cost). The generator's
    own box weight is ``w_pos`` (the official "anchor" branch of ``get_weight``)."""
    with torch.no_grad():
        s = scores.pow(gamma1)
        q = ious.pow(gamma2)
        w_pos = query_weight_norm(s * q)
        w_neg = query_weight_norm(_negative_quality(q) * s) - query_weight_norm(torch.zeros_like(s))
    return w_pos, w_neg


def area_weights(boxes: Tensor, area_weight: float = 4.0, inverse: bool = False) -> Tensor:
    """Per-GT size weight of the official criterion and matcher (not in the paper):
    A - (A - 1) sqrt(w h) (up to A for tiny boxes), or 1 + (A - 1) sqrt(w h) with ``inverse``
    (the whole-image P6 patch). ``boxes`` (..., 4) normalised (cx, cy, w, h) -> (...)."""
    root = torch.sqrt(boxes[..., 2] * boxes[..., 3])
    if inverse:
        return (area_weight - 1) * root + 1
    return area_weight - root * (area_weight - 1)


def query_weighted_focal_loss(
    logits: Tensor,
    batch_idx: Tensor,
    query_idx: Tensor,
    labels: Tensor,
    w_pos: Tensor,
    w_neg: Tensor,
    a_weight: Tensor | None = None,
    valid_mask: Tensor | None = None,
    num_boxes: float = 1.0,
    beta: float = 2.0,
) -> Tensor:
    """Query-weighted classification loss (``DW_focal_loss`` + ``loss_labels`` of the official
    criterion). logits (B, Q, C); the M matches as batch_idx, query_idx, labels (M,) with their
    weights w_pos, w_neg, a_weight (M,). Every (query, class) entry costs BCE(p, 0) p^beta, except
    each matched (query, GT class) entry: a (w_pos BCE(p, 1) + w_neg BCE(p, 0)). Queries with
    ``valid_mask`` (B, Q) False cost nothing. Returns the sum / num_boxes."""
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = loss * torch.sigmoid(logits).pow(beta)
    x = logits[batch_idx, query_idx, labels]
    pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none") * w_pos
    neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * w_neg
    matched = pos + neg if a_weight is None else (pos + neg) * a_weight
    loss = loss.index_put((batch_idx, query_idx, labels), matched)
    if valid_mask is not None:
        loss = loss * valid_mask[..., None]
    return loss.sum() / num_boxes


def query_weighted_box_losses(
    pred_boxes: Tensor,
    target_boxes: Tensor,
    weight: Tensor,
    a_weight: Tensor | None = None,
    num_boxes: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """(L1, GIoU) losses of matched (cx, cy, w, h) pairs (M, 4), each pair times ``weight`` (M,)
    (w_pos for decoder outputs) and ``a_weight``; sums / num_boxes (``loss_boxes``)."""
    w = weight if a_weight is None else weight * a_weight
    l1 = (F.l1_loss(pred_boxes, target_boxes, reduction="none") * w[:, None]).sum() / num_boxes
    giou = generalized_box_iou_aligned(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))[1]
    return l1, ((1 - giou) * w).sum() / num_boxes


def quality_focal_loss_with_ignore(
    logits: Tensor,
    patch_idx: Tensor,
    slot_idx: Tensor,
    iou_targets: Tensor,
    a_weight: Tensor,
    ignore: Tensor,
    beta: float = 2.0,
) -> Tensor:
    """The generator's confidence loss (official ``quality_focal_loss_with_ignore`` times the
    number of slots): logits (P, K); every slot costs BCE(p, 0) p^beta except matched slots,
    BCE(p, IoU) |IoU - p|^beta a, with the IoU as soft label; slots with ``ignore`` (P, K) True
    cost nothing. Returns the sum (the caller normalises)."""
    p = torch.sigmoid(logits)
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    loss = loss * p.pow(beta)
    x = logits[patch_idx, slot_idx]
    pos = F.binary_cross_entropy_with_logits(x, iou_targets, reduction="none")
    pos = pos * (iou_targets - p[patch_idx, slot_idx]).abs().pow(beta) * a_weight
    loss = loss.index_put((patch_idx, slot_idx), pos)
    return loss.masked_fill(ignore, 0).sum()


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimum-cost assignment of a rectangular cost matrix (like
    ``scipy.optimize.linear_sum_assignment``; shortest augmenting paths with duals, Crouse 2016):
    min(n_rows, n_cols) pairs, rows ascending. Costs must be finite. Ties may be broken
    differently from scipy; the total cost is the same."""
    c = np.asarray(cost.detach().cpu() if isinstance(cost, Tensor) else cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"linear_sum_assignment: cost must be 2-D, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("linear_sum_assignment: cost has NaN or inf entries")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    nr, nc = c.shape
    u, v = np.zeros(nr), np.zeros(nc)
    path = np.full(nc, -1)
    col4row, row4col = np.full(nr, -1), np.full(nc, -1)
    for cur in range(nr):
        dist = np.full(nc, np.inf)
        seen_r, seen_c = np.zeros(nr, bool), np.zeros(nc, bool)
        i, low, sink = cur, 0.0, -1
        while sink < 0:
            seen_r[i] = True
            reduced = low + c[i] - u[i] - v
            better = ~seen_c & (reduced < dist)
            path[better] = i
            dist[better] = reduced[better]
            open_dist = np.where(seen_c, np.inf, dist)
            low = open_dist.min()
            ties = np.flatnonzero(open_dist == low)
            free = ties[row4col[ties] < 0]
            j = free[0] if len(free) else ties[0]  # prefer a free column: the path ends there
            seen_c[j] = True
            if row4col[j] < 0:
                sink = j
            else:
                i = row4col[j]
        u[cur] += low
        others = seen_r.copy()
        others[cur] = False
        u[others] += low - dist[col4row[others]]
        v[seen_c] -= low - dist[seen_c]
        j = sink
        while True:  # augment along the path
            i = path[j]
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == cur:
                break
    if transposed:
        order = np.argsort(col4row)
        return col4row[order], order
    return np.arange(nr), col4row


def anchor_match_cost(
    pred: Tensor,
    targets: Tensor,
    target_mask: Tensor,
    area_weight: float = 4.0,
    inverse: bool = False,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
) -> Tensor:
    """Class-agnostic matching cost of the official ``AnchorHungarianMatcher``, batched over
    patches: pred (P, K, 5) (sigmoid boxes, confidence logit), targets (P, G, 4) patch-normalised,
    target_mask (P, G). Focal class cost (alpha 0.25, gamma 2) x cost_class + L1 x cost_bbox
    - GIoU x cost_giou, each target's column times its :func:`area_weights`. Returns (P, K, G)
    (masked targets' columns are meaningless)."""
    prob = torch.sigmoid(pred[..., 4:5])  # (P, K, 1)
    neg = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
    pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
    box = pred[..., :4]
    safe = torch.where(target_mask[..., None], targets, torch.full_like(targets, 0.5))
    l1 = torch.cdist(box, safe, p=1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(box), box_cxcywh_to_xyxy(safe))[1]
    cost = cost_bbox * l1 + cost_class * (pos - neg) - cost_giou * giou
    return cost * area_weights(safe, area_weight, inverse)[:, None, :]


# --------------------------------------------------------------------------------------------
# The generator's criterion
# --------------------------------------------------------------------------------------------


class PatchPredictions(NamedTuple):
    """The raw predictions of one kind of patch, what the generator's loss needs.

    level: 6 (whole-image P6 patch, plus its H, V and HV flips in training), 5 (the four 15x15
    quadrants of the 30x30 resized P5 map), 4 or 3 (probing patches on P4 / P3).
    pred: (P, K, 5): sigmoid (cx, cy, w, h) in patch coordinates and the confidence logit.
    batch_idx: (P,) image of each patch. crop_pos: (P, 2) top-left (x, y) cell of each patch on
    its grid (the 30x30 map for level 5, stride cells for levels 4 and 3; zeros for level 6).
    flip: (P,) 0 none, 1 horizontal, 2 vertical, 3 both (level 6 in training; zeros otherwise).
    emitted: (P,) whether the patch's anchors may reach the output (False for the training-only
    ground-truth and random patches, the official ``targets_offset`` tag).
    stride: the level's stride in pixels (32 for levels 6 and 5). patch_size: cells per side."""

    level: int
    pred: Tensor
    batch_idx: Tensor
    crop_pos: Tensor
    flip: Tensor
    emitted: Tensor
    stride: int
    patch_size: int


def padded_targets(targets: Sequence[Tensor], device, dtype) -> tuple[Tensor, Tensor]:
    """Per-image (G_b, 4) boxes -> one (B, max(G_b, 1), 4) tensor and its (B, G) mask."""
    lengths = torch.tensor([len(t) for t in targets], device=device)
    boxes = pad_sequence([t.to(device=device, dtype=dtype).reshape(-1, 4) for t in targets], batch_first=True)
    if boxes.shape[1] == 0:
        boxes = boxes.new_zeros(len(targets), 1, 4)
    mask = torch.arange(boxes.shape[1], device=device) < lengths[:, None]
    return boxes, mask


def _flip_targets(boxes: Tensor, flip: Tensor) -> Tensor:
    """Normalised (cx, cy, w, h) mirrored per patch: flip (P,) 1 = x, 2 = y, 3 = both."""
    fx = ((flip == 1) | (flip == 3))[:, None]
    fy = ((flip == 2) | (flip == 3))[:, None]
    cx = torch.where(fx, 1 - boxes[..., 0], boxes[..., 0])
    cy = torch.where(fy, 1 - boxes[..., 1], boxes[..., 1])
    return torch.stack((cx, cy, boxes[..., 2], boxes[..., 3]), -1)


def _patch_targets(
    boxes: Tensor, mask: Tensor, lo: Tensor, hi: Tensor, grid_wh: Tensor, patch_size: int,
    max_wh: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The targets of each patch in its own coordinates (``split_targets`` /
    ``get_anchor_targets``): GT whose centre lies in [lo, hi] (inclusive, normalised image
    coordinates; and w, h <= max_wh when given), clipped to the patch and rescaled."""
    c = boxes[..., :2]
    inside = mask & (c >= lo[:, None]).all(-1) & (c <= hi[:, None]).all(-1)
    if max_wh is not None:
        inside &= (boxes[..., 2:] <= max_wh[:, None]).all(-1)
    xyxy = box_cxcywh_to_xyxy(boxes)
    lo4, hi4 = lo.repeat(1, 2)[:, None], hi.repeat(1, 2)[:, None]
    xyxy = torch.minimum(torch.maximum(xyxy, lo4), hi4)
    xyxy = (xyxy - lo4) * (grid_wh / patch_size).repeat(1, 2)[:, None]
    return box_xyxy_to_cxcywh(xyxy), inside


def _group_loss(pred, tboxes, tmask, area_weight, inverse, gamma1, gamma2, cost):
    """Sums of (confidence, L1, GIoU) losses of one group of patches, and the matched IoUs."""
    with torch.no_grad():
        C = anchor_match_cost(pred.detach(), tboxes, tmask, area_weight, inverse, *cost).cpu()
        pi, si, gi = [], [], []
        for p in torch.nonzero(tmask.any(1)).flatten().tolist():  # the solver runs per patch
            cols = torch.nonzero(tmask[p]).flatten()
            r, c = linear_sum_assignment(C[p][:, cols.cpu()])
            pi.append(torch.full((len(r),), p, dtype=torch.long))
            si.append(torch.as_tensor(r, dtype=torch.long))
            gi.append(cols.cpu()[torch.as_tensor(c, dtype=torch.long)])
    dev = pred.device
    cat = lambda xs: (torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)).to(dev)  # noqa: E731
    pi, si, gi = cat(pi), cat(si), cat(gi)
    src = pred[pi, si, :4]
    tgt = tboxes[pi, gi]
    with torch.no_grad():
        iou = box_iou_aligned(box_cxcywh_to_xyxy(src.detach()), box_cxcywh_to_xyxy(tgt))
        a = area_weights(tgt, area_weight, inverse)
        w = query_weights(torch.sigmoid(pred[pi, si, 4].detach()), iou, gamma1, gamma2)[0]
        # unmatched slots overlapping any GT of their patch at IoU >= 0.5 are ignored
        all_iou = box_iou(box_cxcywh_to_xyxy(pred[..., :4].detach()), box_cxcywh_to_xyxy(tboxes))[0]
        ignore = (all_iou.masked_fill(~tmask[:, None, :], 0).amax(-1) >= 0.5)  # G >= 1: targets are padded
        ignore[pi, si] = False
    ce = quality_focal_loss_with_ignore(pred[..., 4], pi, si, iou, a, ignore)
    l1, giou = query_weighted_box_losses(src, tgt, w, a)
    return ce, l1, giou, iou


def anchor_generator_loss(
    patches: Sequence[PatchPredictions],
    targets: Sequence[Tensor],
    image_sizes: Tensor,
    area_weight: float = 4.0,
    gamma1: float = 0.4,
    gamma2: float = 0.6,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    loss_weights: tuple[float, float, float] = (8.0, 4.0, 2.0),
) -> dict[str, Tensor]:
    """The generator's criterion (the anchor part of the official ``SetCriterion.forward``).

    patches: the generator's ``patches`` output; targets: per image (G_b, 4) GT boxes, normalised
    (cx, cy, w, h) of the valid image; image_sizes (B, 2) valid (h, w) in pixels.
    Each patch is matched alone and class-agnostically to the GT whose centre it contains (for P4 /
    P3 patches, also no larger than the patch), in patch coordinates; P6 copies are matched to the
    correspondingly flipped GT with the inverse area weight. Confidence: IoU soft labels (quality
    focal loss, beta 2) with unmatched slots of IoU >= 0.5 ignored; boxes: L1 and GIoU weighted by
    Norm(s^g1 IoU^g2) times the area weight. Sums over the P6, P5 and (x 4 / #patches) P4+P3
    groups, divided by the number of GT boxes in the batch (at least 1).

    Returns {"loss_ce_anchor", "loss_bbox_anchor", "loss_giou_anchor", "loss_anchor" (weighted by
    ``loss_weights``, the official 8, 4, 2), "iou_anchor" (mean matched IoU, no gradient)}."""
    if not patches:
        raise ValueError("anchor_generator_loss: patches is empty")
    ref = patches[0].pred
    ref = ref.new_zeros((), dtype=torch.promote_types(ref.dtype, torch.float32))  # half: in float32
    if len(targets) != len(image_sizes):
        raise ValueError(
            f"anchor_generator_loss: {len(targets)} targets for {len(image_sizes)} images"
        )
    boxes, mask = padded_targets(targets, ref.device, ref.dtype)
    wh = image_sizes.to(ref.device, ref.dtype).flip(-1)  # (B, 2) valid (w, h)
    num_boxes = max(float(mask.sum()), 1.0)
    cost = (cost_class, cost_bbox, cost_giou)
    zero = ref.new_zeros(())
    totals = [zero, zero, zero]
    ious = []
    probing = [p for p in patches if p.level in (4, 3)]
    n_probing = sum(len(p.batch_idx) for p in probing)
    groups = []
    for p in patches:
        b = p.batch_idx
        if p.level == 6:
            groups.append((p.pred.to(ref.dtype), _flip_targets(boxes[b], p.flip), mask[b], True, 1.0))
        elif p.level == 5:
            lo = p.crop_pos.to(ref.dtype) / 30
            grid = torch.full_like(lo, 30.0)
            t, m = _patch_targets(boxes[b], mask[b], lo, lo + 0.5, grid, p.patch_size, None)
            groups.append((p.pred.to(ref.dtype), t, m, False, 1.0))
    if n_probing:
        preds, ts, ms = [], [], []
        for p in probing:
            b = p.batch_idx
            grid = wh[b] / p.stride
            ps = p.patch_size
            lo = p.crop_pos.to(ref.dtype) / grid
            hi = (p.crop_pos.to(ref.dtype) + ps) / grid
            t, m = _patch_targets(boxes[b], mask[b], lo, hi, grid, ps, ps / grid)
            preds.append(p.pred.to(ref.dtype))
            ts.append(t)
            ms.append(m)
        groups.append((torch.cat(preds), torch.cat(ts), torch.cat(ms), False, 4.0 / n_probing))
    for pred, t, m, inverse, scale in groups:
        ce, l1, giou, iou = _group_loss(pred, t, m, area_weight, inverse, gamma1, gamma2, cost)
        totals = [totals[0] + ce * scale, totals[1] + l1 * scale, totals[2] + giou * scale]
        ious.append(iou)
    ce, l1, giou = (x / num_boxes for x in totals)
    all_iou = torch.cat(ious)
    return {
        "loss_ce_anchor": ce,
        "loss_bbox_anchor": l1,
        "loss_giou_anchor": giou,
        "loss_anchor": loss_weights[0] * ce + loss_weights[1] * l1 + loss_weights[2] * giou,
        "iou_anchor": all_iou.mean() if len(all_iou) else ref.new_ones(()),
    }
