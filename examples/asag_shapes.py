"""The one-decoder-layer ASAG detector trained on procedural shapes, on the CPU, against the same
detector with dense grid anchors.

Images hold 3-7 non-overlapping shapes of three classes (rectangle, ellipse, triangle) in random
colours on a noisy, shaded background; about half of them are 12-40 px (small enough that the
generator probes P3), the rest 40 px to 0.47 of the image side. Two detectors are built with
:func:`effnn.models.asag_detector` (``backbone="small"``) and trained the same way (AdamW, the
official losses and Query Weighting, gradient clipping 0.1); they differ only in the anchors:

- ``asag``: :class:`effnn.SparseAnchorGenerator` (patches, adaptive probing of P4 / P3);
- ``dense``: :class:`effnn.models.asag.DenseAnchorHead` (one box per P3-P5 cell, the
  100 most confident).

It prints COCO-style AP (IoU 0.50:0.95, 101-point interpolation, 100 detections per image) and
AP50 on held-out images, the anchors' recall at IoU 0.5 and how many P4 / P3 patches were probed.

Run it (about 15 minutes on one busy core; nothing is downloaded)::

    python examples/asag_shapes.py --threads 1

(128x128 images, 256 for training and 64 held out, 600 steps of 4 images per detector;
``--steps N`` changes the schedule, ``--anchors asag`` or ``--anchors dense`` trains one of the
two.)

``python examples/asag_shapes.py --cost`` prints the parameters, multiply-adds and CPU latency of
the ResNet-50 detector at 800x1333 instead. ``tests/integration/test_asag_shapes.py`` runs a
shortened version (:func:`train` with a few steps on a few images).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from effnn.models.asag import asag_detector, detection_loss
from effnn.ops.asag import box_cxcywh_to_xyxy, box_iou

CLASSES = ("rectangle", "ellipse", "triangle")


@dataclass(frozen=True)
class Config:
    image_size: int = 128
    n_train: int = 256
    n_test: int = 64
    batch_size: int = 4
    steps: int = 600
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    gt_patch_steps: int = 50  # the generator's ground-truth-patch warm-up ("epoch 0")
    clip: float = 0.1
    d_model: int = 64
    compress_dim: int = 8
    feedforward_channels: int = 256
    num_aux_stages: int = 3  # the official recipe's parallel training heads
    seed: int = 0


# ---- data ---------------------------------------------------------------------------------------


def make_image(size: int, gen: torch.Generator, min_objects: int = 3, max_objects: int = 7) -> tuple[Tensor, dict]:
    """One image (3, size, size) in [0, 1] and its targets: "boxes" (G, 4) normalised (cx, cy, w,
    h), "labels" (G,). Shapes fill their boxes (a triangle's apex touches the top edge)."""

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    shade = rand(3, 1, 1) * 0.4 + 0.1
    img = shade + 0.15 * (xx / size - 0.5) * (rand(3, 1, 1) - 0.5) + 0.05 * torch.randn(3, size, size, generator=gen)
    n = int(torch.randint(min_objects, max_objects + 1, (1,), generator=gen))
    boxes, labels = [], []
    for i in range(n):
        for _ in range(50):  # rejection sampling: no two objects overlap (2 px apart)
            small = i % 2 == 0
            lo, hi = (12, 40) if small else (40, max(48, 0.47 * size))
            w, h = (lo + rand(2) * (hi - lo)).tolist()
            x0 = float(rand(1)) * (size - w)
            y0 = float(rand(1)) * (size - h)
            b = torch.tensor([x0, y0, x0 + w, y0 + h])
            if all((torch.minimum(b[2:], o[2:] + 2) - torch.maximum(b[:2], o[:2] - 2)).clamp(min=0).prod() == 0 for o in boxes):
                break
        else:
            continue
        cls = int(torch.randint(0, 3, (1,), generator=gen))
        x0, y0, x1, y1 = b.tolist()
        if cls == 0:
            mask = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        elif cls == 1:
            mask = ((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1
        else:  # apex at the top centre, base at the bottom
            t = (yy - y0) / (y1 - y0)
            half = t * (x1 - x0) / 2
            mask = (t >= 0) & (t <= 1) & ((xx - (x0 + x1) / 2).abs() <= half)
        colour = rand(3, 1, 1) * 0.6 + 0.4 * (rand(1) > 0.5)
        img = torch.where(mask, colour.expand(3, size, size), img)
        boxes.append(b)
        labels.append(cls)
    xyxy = torch.stack(boxes) / size
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    return img.clamp(0, 1), {"boxes": cxcywh, "labels": torch.tensor(labels)}


def make_dataset(n: int, size: int, seed: int) -> tuple[Tensor, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    items = [make_image(size, gen) for _ in range(n)]
    return torch.stack([x for x, _ in items]), [t for _, t in items]


def normalise(images: Tensor) -> Tensor:
    return (images - 0.5) / 0.25


# ---- evaluation ---------------------------------------------------------------------------------


def average_precision(detections: list[dict], targets: list[dict], size: int, num_classes: int = 3) -> dict[str, float]:
    """COCO-style box AP: for each class and IoU threshold 0.50:0.05:0.95, detections of all images
    ranked by score, each matched greedily to the best-overlapping unmatched GT of its image at
    IoU >= t (COCO's rule), precision made monotone and read at 101 recall points; AP is the mean
    over classes (with GT) and thresholds, AP50 the t = 0.5 column. No crowd / area ranges."""
    thresholds = torch.linspace(0.5, 0.95, 10)
    per_class = []
    for c in range(num_classes):
        scores, hits, n_gt = [], [], 0
        for det, tgt in zip(detections, targets, strict=True):
            gt = box_cxcywh_to_xyxy(tgt["boxes"][tgt["labels"] == c]) * size
            n_gt += len(gt)
            keep = det["labels"] == c
            s, b = det["scores"][keep], det["boxes"][keep]
            order = s.argsort(descending=True)
            s, b = s[order], b[order]
            matched = torch.zeros(len(thresholds), len(b), dtype=torch.bool)
            if len(gt) and len(b):
                iou = box_iou(b, gt)[0]
                for ti, t in enumerate(thresholds.tolist()):
                    taken = torch.zeros(len(gt), dtype=torch.bool)
                    for d in range(len(b)):
                        cand = iou[d].masked_fill(taken, -1)
                        j = int(cand.argmax())
                        if cand[j] >= t:
                            taken[j] = True
                            matched[ti, d] = True
            scores.append(s)
            hits.append(matched)
        if n_gt == 0:
            continue
        s = torch.cat(scores)
        if len(s) == 0:  # nothing detected for this class
            per_class.append(torch.zeros(len(thresholds)))
            continue
        h = torch.cat(hits, 1)[:, s.argsort(descending=True, stable=True)].float()
        tp = h.cumsum(1)
        recall = tp / n_gt
        precision = tp / torch.arange(1, h.shape[1] + 1)
        precision = precision.flip(1).cummax(1).values.flip(1)  # monotone (COCO's envelope)
        points = torch.linspace(0, 1, 101)
        ap = torch.zeros(len(thresholds))
        for ti in range(len(thresholds)):
            idx = torch.searchsorted(recall[ti].contiguous(), points)
            ok = idx < recall.shape[1]
            ap[ti] = torch.where(ok, precision[ti][idx.clamp(max=recall.shape[1] - 1)], 0).mean()
        per_class.append(ap)
    ap = torch.stack(per_class)
    return {"AP": float(ap.mean()), "AP50": float(ap[:, 0].mean()), "AP75": float(ap[:, 5].mean())}


@torch.no_grad()
def anchor_stats(model, images: Tensor, targets: list[dict], batch_size: int = 8) -> dict[str, float]:
    """Recall of the GT boxes at IoU 0.5 by the valid anchors (eval mode), overall and for GT under
    40 px; mean anchors and probed P4 / P3 patches per image."""
    model.eval()
    size = images.shape[-1]
    hits, small_hits, n_anchors, p4, p3 = [], [], 0, 0, 0
    for i in range(0, len(images), batch_size):
        out = model(normalise(images[i:i + batch_size]))
        a = out["anchors"]
        n_anchors += int(a.valid.sum())
        p4 += sum(len(p.batch_idx) for p in a.patches if p.level == 4)
        p3 += sum(len(p.batch_idx) for p in a.patches if p.level == 3)
        for b, t in enumerate(targets[i:i + batch_size]):
            gt = box_cxcywh_to_xyxy(t["boxes"]) * size
            iou = box_iou(gt, box_cxcywh_to_xyxy(a.boxes[b, a.valid[b]]))[0]
            hit = iou.amax(1) >= 0.5 if iou.shape[1] else torch.zeros(len(gt), dtype=torch.bool)
            hits.append(hit)
            small_hits.append(hit[(t["boxes"][:, 2:] * size).amax(1) < 40])
    n = len(images)
    return {"recall": float(torch.cat(hits).float().mean()), "recall_small": float(torch.cat(small_hits).float().mean()),
            "anchors": n_anchors / n, "p4_patches": p4 / n, "p3_patches": p3 / n}


@torch.no_grad()
def evaluate(model, images: Tensor, targets: list[dict], batch_size: int = 8) -> dict[str, float]:
    model.eval()
    dets = []
    for i in range(0, len(images), batch_size):
        dets += model.detect(normalise(images[i:i + batch_size]))
    return average_precision(dets, targets, images.shape[-1])


# ---- training -----------------------------------------------------------------------------------


def build(cfg: Config, anchors: str):
    torch.manual_seed(cfg.seed)
    kw = {"compress_dim": cfg.compress_dim} if anchors == "asag" else {}
    return asag_detector(len(CLASSES), backbone="small", anchors=anchors, d_model=cfg.d_model,
                         feedforward_channels=cfg.feedforward_channels, num_aux_stages=cfg.num_aux_stages, **kw)


def train(cfg: Config, anchors: str = "asag", data=None, log: bool = False) -> dict:
    """Train one detector; returns {"losses", "steps", "seconds", "model"}."""
    images, targets = data if data is not None else make_dataset(cfg.n_train, cfg.image_size, cfg.seed)
    model = build(cfg, anchors)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos:pos + cfg.batch_size].tolist()
        pos += cfg.batch_size
        batch_targets = [targets[i] for i in idx]
        out = model(normalise(images[idx]), targets=batch_targets, epoch=0 if step < cfg.gt_patch_steps else 1)
        loss = detection_loss(out, batch_targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % 50 == 0:
            print(f"  [{anchors}] step {step + 1:4d}  loss {statistics.mean(losses[-50:]):8.3f}  "
                  f"{time.perf_counter() - start:5.0f}s", flush=True)
    return {"losses": losses, "steps": len(losses), "seconds": time.perf_counter() - start, "model": model}


# ---- cost of the ResNet-50 detector -------------------------------------------------------------


def cost(threads: int, repeats: int = 5) -> None:
    """Parameters, multiply-adds (FlopCounterMode / 2) by part, and eval latency of the ResNet-50
    detector on one 800x1333 image (padded to 800x1344)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = asag_detector(80).eval()
    parts = ("backbone", "neck", "anchor_generator", "rpn", "decoder")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,} (" + ", ".join(
        f"{k} {sum(p.numel() for p in getattr(model, k).parameters()):,}" for k in parts) + ")")
    main_head = model.decoder.bbox_head[-1]
    print(f"  of which the 3 auxiliary stages (not run at inference): "
          f"{3 * sum(p.numel() for p in main_head.parameters()):,}")
    x = torch.randn(1, 3, 800, 1344)
    sizes = torch.tensor([[800, 1333]])
    with torch.no_grad(), FlopCounterMode(display=False, depth=2) as fc:
        out = model(x, sizes)
    n = int(out["valid"].sum())
    counts = fc.get_flop_counts()
    print(f"multiply-adds: {fc.get_total_flops() / 2e9:.2f} G with {n} anchors (" + ", ".join(
        f"{k} {sum(counts.get(f'ASAGDetector.{k}', {}).values()) / 2e9:.3f} G" for k in parts) + ")")
    # QK^T and AV of the two attentions run in nn.MultiheadAttention's fused eval kernel, unseen
    print(f"  + {2 * 2 * n * n * 256 / 1e9:.3f} G attention products the counter does not see")
    torch.set_num_threads(threads)
    times = []
    with torch.no_grad():
        model(x, sizes)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x, sizes)
            times.append(time.perf_counter() - t)
    print(f"latency (eval, batch 1, {threads} thread(s), median of {repeats}): {statistics.median(times) * 1e3:.0f} ms "
          f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anchors", choices=("asag", "dense", "both"), default="both")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cost", action="store_true", help="the ResNet-50 detector's cost at 800x1333 instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost:
        cost(args.threads or torch.get_num_threads())
        return
    cfg = replace(Config(), steps=args.steps, seed=args.seed)
    start = time.perf_counter()
    train_data = make_dataset(cfg.n_train, cfg.image_size, cfg.seed)
    test_data = make_dataset(cfg.n_test, cfg.image_size, cfg.seed + 1000)
    n_obj = sum(len(t["boxes"]) for t in train_data[1])
    print(f"{cfg.n_train} training / {cfg.n_test} test images {cfg.image_size}x{cfg.image_size}, "
          f"{n_obj} training objects; {cfg.steps} steps of batch {cfg.batch_size}, {torch.get_num_threads()} thread(s)")
    rows = []
    for anchors in ("asag", "dense") if args.anchors == "both" else (args.anchors,):
        result = train(cfg, anchors, train_data, log=True)
        model = result["model"]
        ap = evaluate(model, *test_data)
        st = anchor_stats(model, *test_data)
        rows.append((anchors, ap, st, result))
        print(f"{anchors}: AP {ap['AP']:.3f}  AP50 {ap['AP50']:.3f}  AP75 {ap['AP75']:.3f} | anchors/img {st['anchors']:.0f}, "
              f"recall@0.5 {st['recall']:.3f} (<40 px {st['recall_small']:.3f}), P4/P3 patches/img "
              f"{st['p4_patches']:.1f}/{st['p3_patches']:.1f} | {result['seconds']:.0f} s", flush=True)
    print("\n| anchors | AP | AP50 | AP75 | anchors / image | anchor recall@0.5 (< 40 px) | P4 / P3 patches / image | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for anchors, ap, st, result in rows:
        patches = f"{st['p4_patches']:.1f} / {st['p3_patches']:.1f}" if anchors == "asag" else "-"
        print(f"| {anchors} | {ap['AP']:.3f} | {ap['AP50']:.3f} | {ap['AP75']:.3f} | {st['anchors']:.0f} | "
              f"{st['recall']:.3f} ({st['recall_small']:.3f}) | {patches} | {result['seconds']:.0f} |")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
