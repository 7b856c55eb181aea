"""A shortened run of examples/asag_shapes.py: the ASAG detector, trained end to end on four
images, learns anchors that cover the objects, probing P3 for the small ones; and the example's
COCO-style AP is checked on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from tests.examples import load_example


@pytest.fixture
def example():
    return load_example("asag_shapes.py")


def test_shortened_run_learns_anchors_and_probes_p3(example, one_thread):
    # a reduced detector (no auxiliary heads) on 4 images of 128x128 with 19 objects, 11 of them
    # under 40 px: 60 steps (15 of them on ground-truth patches); recall 1.0 here, ~11 s
    cfg = example.Config(image_size=128, n_train=4, batch_size=4, steps=60, lr=1e-3, warmup=10,
                         gt_patch_steps=15, d_model=32, compress_dim=4, feedforward_channels=64, num_aux_stages=0)
    data = example.make_dataset(cfg.n_train, cfg.image_size, cfg.seed)
    small = sum(int(((t["boxes"][:, 2:] * cfg.image_size).amax(1) < 40).sum()) for t in data[1])
    assert small == 11
    before = example.anchor_stats(example.build(cfg, "asag"), *data)
    result = example.train(cfg, "asag", data)
    after = example.anchor_stats(result["model"], *data)
    assert result["steps"] == 60 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert before["recall"] < 0.5 and before["p3_patches"] == 0
    assert after["recall"] > 0.9 and after["recall_small"] > 0.9, after
    assert after["p3_patches"] > 0, after  # small objects are probed on P3


def test_average_precision_on_known_cases(example):
    size = 100
    t = {"boxes": torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.7, 0.7, 0.3, 0.3]]), "labels": torch.tensor([0, 1])}
    exact = {"boxes": torch.tensor([[15.0, 15.0, 35.0, 35.0], [55.0, 55.0, 85.0, 85.0]]),
             "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    assert example.average_precision([exact], [t], size, num_classes=2) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    # class 1 found at IoU 0.62 (30x18.6 inside the 30x30 GT): a true positive at the thresholds
    # 0.50, 0.55, 0.60 only, so its AP is 3/10 and the mean (1 + 0.3) / 2
    shifted = {**exact, "boxes": torch.tensor([[15.0, 15.0, 35.0, 35.0], [55.0, 55.0, 85.0, 73.6]])}
    ap = example.average_precision([shifted], [t], size, num_classes=2)
    assert ap["AP50"] == pytest.approx(1.0) and ap["AP"] == pytest.approx((1 + 0.3) / 2)
    # a false positive ranked above the true one halves the precision at every recall
    fp = {"boxes": torch.tensor([[60.0, 0.0, 80.0, 20.0], [15.0, 15.0, 35.0, 35.0]]),
          "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([0, 0])}
    one = {"boxes": t["boxes"][:1], "labels": t["labels"][:1]}
    assert example.average_precision([fp], [one], size, num_classes=1)["AP"] == pytest.approx(0.5)
