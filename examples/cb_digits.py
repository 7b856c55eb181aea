"""A small ViT trained on scikit-learn's digits with and without Context Broadcasting.

The same timm ``VisionTransformer`` (8x8 images, 2x2 patches: 16 patch tokens and a class token,
width 64, 4 blocks, 4 heads) is trained twice per seed: as built, and after
``effnn.insert_cb(model)``, which adds Context Broadcasting (Hyeon-Woo et al., ICCV 2023) after
every block's MLP. CB has no parameters, so with the same seed both runs start from the *same*
weights and see the same batches in the same order: the pairs differ only by CB.

Reported per seed and as mean +- standard deviation over seeds, on a fixed stratified held-out
split (360 of the 1,797 images): top-1 accuracy, expected calibration error (ECE, 15 equal-width
confidence bins, the usual definition) and negative log-likelihood.

Run it (about a minute on two CPU cores)::

    python examples/cb_digits.py --seeds 0 1 2 3 4 --epochs 40

The functions are importable (``tests/integration/test_insert_cb.py`` runs a shortened version).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import effnn

TEST_SIZE = 360
ECE_BINS = 15


@dataclass(frozen=True)
class Digits:
    x_train: Tensor  # (N, 1, 8, 8), standardised with the training set's pixel mean and std
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(test_size: int = TEST_SIZE, split_seed: int = 0) -> Digits:
    """scikit-learn's digits (1,797 8x8 images, 10 classes; shipped with the package, offline),
    split into train and a stratified held-out set, pixels standardised with the training set's
    mean and standard deviation (unscaled 0..16 pixels leave the ViT on a loss plateau for the
    first epochs)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=split_seed,
        stratify=y.numpy(),
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def make_vit(seed: int, cb: bool) -> nn.Module:
    """The small ViT, initialised from ``seed``; with ``cb`` Context Broadcasting is inserted after
    every block's MLP (the weights are the same either way)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
        num_heads=4, mlp_ratio=2.0,
    )
    if cb:
        effnn.insert_cb(model)
    return model


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width confidence bins of (bin size / N) * |accuracy - mean confidence|,
    the confidence being the top softmax probability (Guo et al., 2017)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).to(probs.dtype)
    # bin b holds confidences in (b/bins, (b+1)/bins]
    which = (conf * bins).ceil().long().clamp(1, bins) - 1
    acc_sum = torch.zeros(bins, dtype=probs.dtype).index_add_(0, which, correct)
    conf_sum = torch.zeros(bins, dtype=probs.dtype).index_add_(0, which, conf)
    # (n_b / N) * |acc_b - conf_b| = |sum of correct - sum of confidences in bin b| / N
    return float((acc_sum - conf_sum).abs().sum() / len(labels))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    model.eval()
    logits = model(x)
    probs = logits.softmax(dim=1)
    return {
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "ece": expected_calibration_error(probs, y),
        "nll": float(F.cross_entropy(logits, y)),
    }


def train(
    model: nn.Module, data: Digits, seed: int, epochs: int, batch_size: int = 64,
    lr: float = 2e-3, weight_decay: float = 0.05,
) -> list[float]:
    """AdamW with a cosine schedule and one warm-up epoch; batches drawn from ``seed``. Returns the
    mean training loss of each epoch."""
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total)),
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        total_loss = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
        losses.append(total_loss / n)
    return losses


def run(seeds: list[int], epochs: int, data: Digits | None = None) -> list[dict]:
    """Train and evaluate both variants for every seed; one record per (seed, variant)."""
    data = data or load_digits()
    records = []
    for seed in seeds:
        for cb in (False, True):
            model = make_vit(seed, cb)
            t0 = time.perf_counter()
            losses = train(model, data, seed, epochs)
            records.append({
                "seed": seed, "cb": cb, "losses": losses, "seconds": time.perf_counter() - t0,
                **evaluate(model, data.x_test, data.y_test),
            })
    return records


def summary(records: list[dict]) -> str:
    """Per-seed table and mean +- std over seeds, without and with CB side by side."""
    lines = ["| seed | acc (no CB) | acc (CB) | ECE (no CB) | ECE (CB) | NLL (no CB) | NLL (CB) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["seed"], r["cb"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    for s in seeds:
        a, b = by[(s, False)], by[(s, True)]
        lines.append(f"| {s} | {100 * a['accuracy']:.2f}% | {100 * b['accuracy']:.2f}% | "
                     f"{100 * a['ece']:.2f}% | {100 * b['ece']:.2f}% | {a['nll']:.4f} | "
                     f"{b['nll']:.4f} |")

    def stat(key: str, cb: bool, scale: float) -> str:
        values = [scale * by[(s, cb)][key] for s in seeds]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} +- {sd:.2f}"

    lines.append(f"| mean +- std | {stat('accuracy', False, 100)}% | {stat('accuracy', True, 100)}% "
                 f"| {stat('ece', False, 100)}% | {stat('ece', True, 100)}% | "
                 f"{stat('nll', False, 1)} | {stat('nll', True, 1)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: this model is too small to gain from more, "
                             "and extra threads only wait on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = run(args.seeds, args.epochs)
    print(f"digits: {len(load_digits().y_train)} train / {TEST_SIZE} held-out images; "
          f"{args.epochs} epochs; seeds {args.seeds}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(summary(records))
    seconds = [r["seconds"] for r in records]
    print(f"training time per run: {statistics.median(seconds):.1f} s (median)")


if __name__ == "__main__":
    main()
