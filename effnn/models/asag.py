"""The one-decoder-layer ASAG detector (ASAG-A: Fu et al., "Building Strong One-Decoder-Layer
Sparse Detectors via Adaptive Sparse Anchor Generation", ICCV 2023), assembled from effnn parts.

backbone (timm ResNet-50 ``features_only`` with frozen BatchNorm, or a small conv net for the
CPU) -> FPN (P2-P5) -> :class:`effnn.SparseAnchorGenerator` on P3-P5 (or, as the baseline,
:class:`DenseAnchorHead`: one box per cell, top-k) -> :class:`RelationBlock` (RoIAlign on P2-P5,
the RoI query initialiser: class logits and refined "dynamic proposals") -> ONE
:class:`effnn.nn.adamixer.AdaMixerDecoderStage`; in training 3 more parallel stages on the same
proposals and queries (auxiliary heads, not run at inference). :func:`detection_loss` matches
every output one-to-one (Hungarian) and weights the losses with Query Weighting.

Module names follow the official model (iSEE-Laboratory/ASAG ``models/asag.py``: ``backbone``,
``neck``, ``anchor_generator``, ``rpn``, ``decoder.decoder_embedding``, ``decoder.bbox_head.{i}``;
the main head is the last), so the heads' parameters have the official names and shapes. The
backbone is timm's ResNet-50 (``conv1``, ``layer1`` ... names, without the official
``backbone.0.body.`` prefix) and ``neck`` uses torchvision 0.11's FPN names (``inner_blocks.{i}``,
``layer_blocks.{i}``). Nothing is downloaded: ``pretrained=False`` everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnn.nn.adamixer import (
    MLP,
    AdaMixerDecoderStage,
    boxes_to_xyzr,
    branches,
    head_fcs,
    iof_self_attention,
    refine_xyzr,
    reset_head,
    xyzr_to_boxes,
)
from effnn.nn.asag import SparseAnchorGenerator, SparseAnchors
from effnn.ops.asag import (
    _group_loss,
    anchor_generator_loss,
    area_weights,
    box_cxcywh_to_xyxy,
    box_iou_aligned,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    linear_sum_assignment,
    padded_targets,
    query_weighted_box_losses,
    query_weighted_focal_loss,
    query_weights,
)
from effnn.ops.roi_align import multi_scale_roi_align

__all__ = [
    "ASAGDetector",
    "DenseAnchorHead",
    "FPN",
    "RelationBlock",
    "SmallBackbone",
    "asag_detector",
    "detection_loss",
    "hungarian_match",
]

STRIDES = (4, 8, 16, 32)  # P2-P5


# ---- backbone and neck --------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine (buffers, not parameters), as the official
    backbone (DETR's ``FrozenBatchNorm2d``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


def resnet50_backbone() -> nn.Module:
    """timm ResNet-50, ``features_only`` C2-C5 (256, 512, 1024, 2048 channels, strides 4-32),
    frozen BatchNorm, stem and layer1 frozen (the official ``BackboneBase`` trains layer2-4)."""
    import timm  # optional dependency, needed only for this backbone

    net = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4),
                            norm_layer=FrozenBatchNorm2d)
    for name, p in net.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    return net


class SmallBackbone(nn.Module):
    """A small conv net for CPU training: C2-C5 at strides 4, 8, 16, 32 (conv 3x3, BatchNorm,
    ReLU; two convs per stage). Shape: (B, 3, H, W) -> [(B, channels[i], H / 2^(i+2), ...)]."""

    def __init__(self, channels: Sequence[int] = (32, 64, 96, 128)) -> None:
        super().__init__()

        def conv(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        c = list(channels)
        self.stem = nn.Sequential(conv(3, c[0] // 2, 2), conv(c[0] // 2, c[0], 2), conv(c[0], c[0], 1))
        self.stages = nn.ModuleList(nn.Sequential(conv(a, b, 2), conv(b, b, 1)) for a, b in zip(c[:-1], c[1:], strict=True))
        self.channels = tuple(c)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = [self.stem(x)]
        for stage in self.stages:
            out.append(stage(out[-1]))
        return out


class FPN(nn.Module):
    """Feature pyramid (Lin et al., CVPR 2017) as ``torchvision.ops.FeaturePyramidNetwork`` (no
    extra level): lateral 1x1 convs (``inner_blocks``), top-down nearest upsampling and sum, 3x3
    output convs (``layer_blocks``); Kaiming-uniform (a=1) weights, zero biases.
    Shape: [C2..C5] -> [P2..P5], each ``out_channels``."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.layer_blocks = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        last = self.inner_blocks[-1](features[-1])
        out = [self.layer_blocks[-1](last)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[i](features[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            out.insert(0, self.layer_blocks[i](last))
        return out


# ---- the RoI query initialiser ------------------------------------------------------------------


class RelationBlock(nn.Module):
    """ASAG's RoI query initialiser (official ``RelationBlock``, ``models/rpn.py``): each anchor
    is RoI-aligned (7x7, sampling ratio 2, FPN level rule) on P2-P5, flattened and projected
    (``roi``) and layer-normed (``tokens_norm1``) into a content query; then IoF-biased
    self-attention with the sinusoidal xyzr embedding (``attn``, ``iof_tau``, ``tokens_norm3``),
    an FFN with residual (``tokens_proj``, ``tokens_norm2``), and class / xyzr-delta heads
    (``cls_fcs`` -> ``fc_cls``, ``reg_fcs`` x3 -> ``fc_reg``): the "dynamic proposals".

    Shapes: features [P2..P5] (B, d_model, H_l, W_l); anchors (B, N, 4) (cx, cy, w, h) pixels;
    image_wh (B, 2) valid (w, h) pixels; valid (B, N). Returns (boxes (B, N, 4) normalised
    (cx, cy, w, h), logits (B, N, num_classes), query (B, N, d_model), refined xyzr (B, N, 4),
    detached: the decoder's boxes)."""

    def __init__(self, num_classes: int, d_model: int = 256, feedforward_channels: int = 2048,
                 num_heads: int = 8, activation: str = "gelu", strides: Sequence[int] = STRIDES) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.roi = nn.Linear(d_model * 7 * 7, d_model)
        self.tokens_norm1 = nn.LayerNorm(d_model)
        self.tokens_proj = MLP((d_model, feedforward_channels, d_model), activation)
        self.tokens_norm2 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.iof_tau = nn.Parameter(torch.ones(num_heads))
        self.tokens_norm3 = nn.LayerNorm(d_model)
        self.cls_fcs = head_fcs(d_model, 1, activation)
        self.fc_cls = nn.Linear(d_model, num_classes)
        self.reg_fcs = head_fcs(d_model, 3, activation)
        self.fc_reg = nn.Linear(d_model, 4)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_head(self)

    def forward(self, features: Sequence[Tensor], anchors: Tensor, image_wh: Tensor, valid: Tensor):
        B, N, _ = anchors.shape
        xyxy = box_cxcywh_to_xyxy(anchors.detach())
        rois = multi_scale_roi_align(features, self.strides, xyxy, 7, 2)  # (B, N, C, 7, 7)
        query = self.tokens_norm1(self.roi(rois.reshape(B, N, -1)))
        xyzr = boxes_to_xyzr(xyxy, self.strides[0])
        query = self.tokens_norm3(iof_self_attention(self.attn, query, xyzr, self.iof_tau, valid))
        query = self.tokens_norm2(query + self.tokens_proj(query))
        logits, delta = branches(self, query)
        xyzr = refine_xyzr(xyzr, delta)
        return xyzr_to_normalized(xyzr, self.strides[0], image_wh), logits, query, xyzr.detach()


def xyzr_to_normalized(xyzr: Tensor, stride: int, image_wh: Tensor) -> Tensor:
    """xyzr on the stride grid -> (cx, cy, w, h) normalised by the valid image size."""
    return box_xyxy_to_cxcywh(xyzr_to_boxes(xyzr) * stride / image_wh.repeat(1, 2)[:, None, :])


class AdaMixerDecoder(nn.Module):
    """``num_stages`` parallel AdaMixer stages (official ``AdaMixerDecoder`` with the cascade
    lines commented out): every stage gets the same xyzr and the same queries plus its own learned
    ``decoder_embedding`` row. The last stage is the main head; in eval only it runs."""

    def __init__(self, num_classes: int, num_stages: int, **stage) -> None:
        super().__init__()
        self.decoder_embedding = nn.Embedding(num_stages, stage.get("content_dim", 256))
        self.bbox_head = nn.ModuleList(AdaMixerDecoderStage(num_classes, **stage) for _ in range(num_stages))

    def forward(self, features, xyzr, query, image_wh, valid) -> list[tuple[Tensor, Tensor]]:
        stages = range(len(self.bbox_head)) if self.training else [len(self.bbox_head) - 1]
        out = []
        for i in stages:
            head = self.bbox_head[i]
            logits, new_xyzr, _ = head(features, xyzr, query + self.decoder_embedding.weight[i], valid)
            out.append((logits, xyzr_to_normalized(new_xyzr, head.strides[0], image_wh)))
        return out


# ---- the dense baseline -------------------------------------------------------------------------


class DenseAnchorHead(nn.Module):
    """Dense grid anchors, the baseline of ASAG's comparison (dense query initialisation as in
    Efficient DETR / Featurized QR-CNN's query generation network): on P3-P5, a shared head
    (3x3 conv, GroupNorm, activation, 1x1 conv) predicts one box and a confidence per cell:
    centre = cell centre + tanh(t_xy) stride, size = 4 stride exp(clamp(t_wh, -3, 3)); the
    ``num_anchors`` most confident cells of each image become the anchors. Trained with the
    generator's criterion applied to the whole grid as one "patch" (:func:`dense_anchor_loss`).

    Shapes: features [P3, P4, P5]; image_sizes (B, 2) valid (h, w). Returns
    :class:`effnn.SparseAnchors` (``patches`` empty) and the raw predictions (B, cells, 5):
    normalised (cx, cy, w, h) and the confidence logit."""

    def __init__(self, d_model: int, strides: Sequence[int] = (8, 16, 32), num_anchors: int = 100) -> None:
        super().__init__()
        self.strides, self.num_anchors = tuple(strides), num_anchors
        self.conv = nn.Sequential(nn.Conv2d(d_model, d_model, 3, padding=1), nn.GroupNorm(8, d_model), nn.GELU())
        self.pred = nn.Conv2d(d_model, 5, 1)
        nn.init.normal_(self.pred.weight, std=0.01)
        nn.init.zeros_(self.pred.bias)
        nn.init.constant_(self.pred.bias[4:], -4.595)  # prior 0.01

    def forward(self, features: Sequence[Tensor], image_sizes: Tensor) -> tuple[SparseAnchors, Tensor]:
        wh = image_sizes.flip(-1).to(features[0].dtype)
        preds, levels = [], []
        for f, s in zip(features, self.strides, strict=True):
            B, _, H, W = f.shape
            t = self.pred(self.conv(f)).permute(0, 2, 3, 1).reshape(B, H * W, 5)
            ys, xs = torch.meshgrid(torch.arange(H, device=f.device), torch.arange(W, device=f.device), indexing="ij")
            centre = (torch.stack([xs, ys], -1).reshape(1, H * W, 2).to(f.dtype) + 0.5) * s
            c = centre + torch.tanh(t[..., :2]) * s
            size = 4 * s * torch.exp(t[..., 2:4].clamp(-3, 3))
            preds.append(torch.cat([c / wh[:, None], size / wh[:, None], t[..., 4:]], -1))
            levels.append(torch.full((H * W,), int(math.log2(s)), device=f.device))  # 3, 4, 5
        pred = torch.cat(preds, 1)
        level = torch.cat(levels)
        inside = (pred[..., 0] < 1) & (pred[..., 1] < 1)  # cells of the batch padding: never anchors
        score = torch.sigmoid(pred[..., 4].detach()).masked_fill(~inside, -1)
        k = min(self.num_anchors, pred.shape[1])
        top = score.topk(k, dim=1).indices
        boxes = pred[..., :4].detach().gather(1, top[..., None].expand(-1, -1, 4)) * wh.repeat(1, 2)[:, None]
        scores = score.gather(1, top)
        anchors = SparseAnchors(boxes, scores.clamp(min=0), scores >= 0, level[top], [])
        return anchors, pred


def dense_anchor_loss(pred: Tensor, targets: Sequence[Tensor], area_weight: float = 4.0,
                      loss_weights: tuple[float, float, float] = (8.0, 4.0, 2.0)) -> dict[str, Tensor]:
    """The generator's criterion (class-agnostic Hungarian, IoU soft labels with ignore, Query-
    Weighted L1 / GIoU; effnn.ops.asag) with each image's whole grid as one patch: pred (B, cells,
    5) from :class:`DenseAnchorHead`, targets per image (G, 4) normalised (cx, cy, w, h)."""
    boxes, mask = padded_targets(targets, pred.device, pred.dtype)
    ce, l1, giou, _ = _group_loss(pred, boxes, mask, area_weight, False, 0.4, 0.6, (2.0, 5.0, 2.0))
    n = max(float(mask.sum()), 1.0)
    ce, l1, giou = ce / n, l1 / n, giou / n
    return {"loss_ce_anchor": ce, "loss_bbox_anchor": l1, "loss_giou_anchor": giou,
            "loss_anchor": loss_weights[0] * ce + loss_weights[1] * l1 + loss_weights[2] * giou}


# ---- the detector -------------------------------------------------------------------------------


class ASAGDetector(nn.Module):
    """The one-decoder-layer ASAG detector (ASAG-A); build it with :func:`asag_detector`.

    ``forward(images, image_sizes=None, targets=None, epoch=None)``: images (B, 3, H, W), H and W
    multiples of 32 (batch padding right / bottom); image_sizes (B, 2) valid (h, w) pixels
    (default: the whole image); targets (training): per image a dict with "boxes" (G, 4)
    normalised (cx, cy, w, h) of the valid image and "labels" (G,); epoch: the generator's
    ground-truth-patch warm-up (``use_target_epoch``). Returns a dict: "pred_logits" (B, N,
    num_classes), "pred_boxes" (B, N, 4) normalised (cx, cy, w, h), "valid" (B, N) (real anchors),
    "aux_outputs" (training: the 3 auxiliary stages' (logits, boxes)), "proposals" (the
    RelationBlock's (logits, boxes)), "anchors" (:class:`effnn.SparseAnchors`, pixels),
    "dense_pred" (dense baseline only) and "image_sizes". Train with :func:`detection_loss`."""

    def __init__(self, backbone: nn.Module, backbone_channels: Sequence[int], num_classes: int, d_model: int,
                 anchor_generator: nn.Module, num_stages: int = 4, feedforward_channels: int = 2048,
                 in_points: int = 32, out_points: int = 128, n_groups: int = 4, num_heads: int = 8,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.neck = FPN(backbone_channels, d_model)
        self.anchor_generator = anchor_generator
        self.rpn = RelationBlock(num_classes, d_model, feedforward_channels, num_heads, activation)
        self.decoder = AdaMixerDecoder(
            num_classes, num_stages, content_dim=d_model, num_heads=num_heads, feedforward_channels=feedforward_channels,
            in_points=in_points, out_points=out_points, n_groups=n_groups, strides=STRIDES, activation=activation)

    def forward(self, images: Tensor, image_sizes: Tensor | None = None, targets: Sequence[dict] | None = None,
                epoch: int | None = None) -> dict:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 32 or images.shape[3] % 32:
            raise ValueError(f"ASAGDetector: images must be (B, 3, H, W) with H, W multiples of 32, got {tuple(images.shape)}")
        B = images.shape[0]
        if image_sizes is None:
            image_sizes = torch.tensor(images.shape[2:], device=images.device).expand(B, 2)
        if self.training and (targets is None or len(targets) != B):
            raise ValueError(f"ASAGDetector: training needs targets for each of the {B} images")
        feats = self.neck(self.backbone(images))
        image_wh = image_sizes.flip(-1).to(feats[0].dtype)
        out: dict = {"image_sizes": image_sizes}
        if isinstance(self.anchor_generator, DenseAnchorHead):
            anchors, out["dense_pred"] = self.anchor_generator(feats[1:], image_sizes)
        else:
            boxes = None if targets is None else [t["boxes"] for t in targets]
            anchors = self.anchor_generator(feats[1:], image_sizes, boxes if self.training else None, epoch)
        out["anchors"] = anchors
        proposals, prop_logits, query, xyzr = self.rpn(feats, anchors.boxes.to(feats[0].dtype), image_wh, anchors.valid)
        out["proposals"] = (prop_logits, proposals)
        stages = self.decoder(feats, xyzr, query, image_wh, anchors.valid)
        out["pred_logits"], out["pred_boxes"] = stages[-1]
        out["valid"] = anchors.valid
        if self.training:
            out["aux_outputs"] = stages[:-1]
        return out

    @torch.no_grad()
    def detect(self, images: Tensor, image_sizes: Tensor | None = None, top_k: int = 100) -> list[dict[str, Tensor]]:
        """Eval-mode detections per image (the official ``PostProcess``): the ``top_k`` best
        (query, class) pairs by sigmoid score, boxes xyxy in pixels of the valid image."""
        out = self(images, image_sizes)
        prob = torch.sigmoid(out["pred_logits"]).masked_fill(~out["valid"][..., None], 0)
        B, N, K = prob.shape
        scores, idx = prob.flatten(1).topk(min(top_k, N * K), dim=1)
        q, labels = idx // K, idx % K
        wh = out["image_sizes"].flip(-1).to(prob.dtype).repeat(1, 2)
        boxes = box_cxcywh_to_xyxy(out["pred_boxes"]).gather(1, q[..., None].expand(-1, -1, 4)) * wh[:, None]
        return [{"boxes": boxes[b], "scores": scores[b], "labels": labels[b]} for b in range(B)]


def asag_detector(
    num_classes: int = 80,
    backbone: str = "resnet50",
    num_queries: int = 100,
    anchors: str = "asag",
    d_model: int | None = None,
    feedforward_channels: int | None = None,
    out_points: int | None = None,
    in_points: int = 32,
    num_aux_stages: int = 3,
    **generator_kwargs,
) -> ASAGDetector:
    """ASAG-A with one AdaMixer decoder layer (and ``num_aux_stages`` parallel training heads).

    backbone: "resnet50" (timm, random init, frozen BatchNorm; the paper's setting: d_model 256,
    FFN 2048, 32 in / 128 out points, 4 groups, GELU) or "small" (:class:`SmallBackbone`,
    d_model 64, FFN 256, 32 out points: trains on the CPU). num_queries: 100 (the generator's
    50 / 20 anchors per fixed / probing patch, confidence threshold 0.1, 5-200 anchors) or 300
    (150 / 50, 0.05, 50-500), the two official settings. anchors: "asag"
    (:class:`effnn.SparseAnchorGenerator`) or "dense" (:class:`DenseAnchorHead`, top
    ``num_queries`` cells: the baseline). ``generator_kwargs`` go to the generator."""
    if backbone == "resnet50":
        net, channels = resnet50_backbone(), (256, 512, 1024, 2048)
        d_model, ffn, out_points = d_model or 256, feedforward_channels or 2048, out_points or 128
    elif backbone == "small":
        net = SmallBackbone()
        channels = net.channels
        d_model, ffn, out_points = d_model or 64, feedforward_channels or 256, out_points or 32
    else:
        raise ValueError(f"asag_detector: backbone must be 'resnet50' or 'small', got {backbone!r}")
    if num_queries not in (100, 300):
        raise ValueError(f"asag_detector: num_queries must be 100 or 300 (the official settings), got {num_queries}")
    if anchors == "asag":
        config = {"num_pred_anchor1": 50, "num_pred_anchor2": 20} if num_queries == 100 else {
            "num_pred_anchor1": 150, "num_pred_anchor2": 50, "use_anchor_threshold": 0.05}
        generator = SparseAnchorGenerator(d_model=d_model, **{**config, **generator_kwargs})
    elif anchors == "dense":
        generator = DenseAnchorHead(d_model, num_anchors=num_queries)
    else:
        raise ValueError(f"asag_detector: anchors must be 'asag' or 'dense', got {anchors!r}")
    return ASAGDetector(net, channels, num_classes, d_model, generator, 1 + num_aux_stages, ffn, in_points, out_points)


# ---- matching and losses ------------------------------------------------------------------------


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, valid: Tensor, targets: Sequence[dict], area_weight: float = 4.0,
                    cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:
    """One-to-one matching of the official ``HungarianMatcher``: focal class cost (alpha 0.25,
    gamma 2) x cost_class + L1 x cost_bbox - GIoU x cost_giou, each GT's column times its
    :func:`effnn.ops.asag.area_weights`; only ``valid`` queries. logits (B, N, K), boxes (B, N, 4)
    normalised (cx, cy, w, h). Returns (batch, query, target) index tensors of the matches."""
    prob = torch.sigmoid(logits.float())
    neg = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
    pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
    bi, qi, ti = [], [], []
    for b, t in enumerate(targets):
        if len(t["boxes"]) == 0:
            continue
        rows = torch.nonzero(valid[b]).flatten()
        tgt = t["boxes"].to(boxes.dtype)
        lab = t["labels"]
        c = cost_bbox * torch.cdist(boxes[b, rows].float(), tgt.float(), p=1)
        c = c + cost_class * (pos[b, rows][:, lab] - neg[b, rows][:, lab])
        c = c - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes[b, rows]), box_cxcywh_to_xyxy(tgt))[1].float()
        r, g = linear_sum_assignment(c * area_weights(tgt.float(), area_weight)[None])
        r, g = torch.as_tensor(r, dtype=torch.long), torch.as_tensor(g, dtype=torch.long)
        bi.append(torch.full_like(r, b))
        qi.append(rows.cpu()[r])
        ti.append(g)
    dev = logits.device
    if not bi:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e, e
    return torch.cat(bi).to(dev), torch.cat(qi).to(dev), torch.cat(ti).to(dev)


def set_loss(logits: Tensor, boxes: Tensor, valid: Tensor, targets: Sequence[dict], num_boxes: float,
             area_weight: float = 4.0, gamma1: float = 0.4, gamma2: float = 0.6) -> dict[str, Tensor]:
    """Query-Weighted one-to-one losses of one output (official ``loss_labels`` / ``loss_boxes``
    with the ``get_weight("decoder")`` weights): (CE, L1, GIoU) sums / num_boxes."""
    b, q, t = hungarian_match(logits, boxes, valid, targets, area_weight)
    if len(b):
        tgt = torch.cat([x["boxes"] for x in targets]).to(boxes.dtype)
        labels = torch.cat([x["labels"] for x in targets]).to(logits.device)
        offsets = torch.tensor([0] + [len(x["boxes"]) for x in targets], device=logits.device).cumsum(0)
        tgt, labels = tgt[offsets[b] + t], labels[offsets[b] + t]
    else:
        tgt, labels = boxes.new_zeros(0, 4), torch.zeros(0, dtype=torch.long, device=logits.device)
    src = boxes[b, q]
    with torch.no_grad():
        iou = box_iou_aligned(box_cxcywh_to_xyxy(src.detach()), box_cxcywh_to_xyxy(tgt))
        w_pos, w_neg = query_weights(torch.sigmoid(logits[b, q, labels].detach()), iou, gamma1, gamma2)
        a = area_weights(tgt, area_weight)
    ce = query_weighted_focal_loss(logits, b, q, labels, w_pos, w_neg, a, valid, num_boxes)
    l1, giou = query_weighted_box_losses(src, tgt, w_pos, a, num_boxes)
    return {"loss_ce": ce, "loss_bbox": l1, "loss_giou": giou}


def detection_loss(outputs: dict, targets: Sequence[dict], loss_weights: tuple[float, float, float] = (2.0, 5.0, 2.0)) -> dict[str, Tensor]:
    """The official ``SetCriterion`` (without denoising): Query-Weighted one-to-one losses on the
    main stage, each auxiliary stage (suffix ``_i``) and the RelationBlock's proposals (suffix
    ``_rpn``), weighted CE 2, L1 5, GIoU 2; plus the anchor generator's criterion (CE 8, L1 4,
    GIoU 2). num_boxes = the batch's GT count (at least 1; not all-reduced). Returns every term
    and "loss", the weighted total."""
    num_boxes = max(float(sum(len(t["boxes"]) for t in targets)), 1.0)
    valid = outputs["valid"]
    heads = [("", (outputs["pred_logits"], outputs["pred_boxes"])), ("_rpn", outputs["proposals"])]
    heads += [(f"_{i}", o) for i, o in enumerate(outputs.get("aux_outputs", []))]
    losses: dict[str, Tensor] = {}
    total = outputs["pred_logits"].new_zeros(())
    for suffix, (logits, boxes) in heads:
        for (name, value), w in zip(set_loss(logits, boxes, valid, targets, num_boxes).items(), loss_weights, strict=True):
            losses[name + suffix] = value
            total = total + w * value
    gt = [t["boxes"] for t in targets]
    if "dense_pred" in outputs:
        anchor = dense_anchor_loss(outputs["dense_pred"], gt)
    else:
        anchor = anchor_generator_loss(outputs["anchors"].patches, gt, outputs["image_sizes"])
    losses.update(anchor)
    losses["loss"] = total + anchor["loss_anchor"]
    return losses
