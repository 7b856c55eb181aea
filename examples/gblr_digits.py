"""A small ViT on scikit-learn's digits, dense and with GBLR linears that learn their structure
under a network-wide budget (Lee & Kim, ICLR 2024; effnn.GaudiGBLRLinear).

The same timm ``VisionTransformer`` (8x8 images, 2x2 patches: 16 patch tokens and a class token,
width 64, 4 blocks, 4 heads, MLP ratio 2) is trained twice per seed: dense, and with every linear
of the blocks (qkv, proj, fc1, fc2) swapped for ``GaudiGBLRLinear`` (r = 1, K = min(in, out), the
official 'splr' initialisation at location 0, which costs as much as dense). The GBLR run follows
the official recipe at a small scale: sigma annealed 1 -> 100 (``SigmaSchedule``), widths and
locations in their own AdamW group with betas (0, 0.999) (``gblr_param_groups``), and after every
optimizer step the proximal soft-shrink of the widths, paused while the network's mean width is
below the target (``soft_shrink_widths``, the official ``TargetedSoftshrink``).

Reported: held-out accuracy of both, the model's multiply-adds per image (official count for the
GBLR layers, eval mode) against dense, and per layer the learned cost as a share of its dense
cost -- the budget is network-wide, so the layers' shares differ.

Run it (a few minutes on two CPU cores)::

    python examples/gblr_digits.py --seeds 0 --epochs 40 --target-width 0.125

The functions are importable (``tests/train/test_gblr_digits.py`` runs a shortened version).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import effnn
from effnn.train.gblr import (
    SigmaSchedule,
    gblr_layers,
    gblr_param_groups,
    mean_width,
    model_macs,
    soft_shrink_widths,
)

TEST_SIZE = 360


@dataclass(frozen=True)
class Digits:
    x_train: Tensor  # (N, 1, 8, 8), standardised with the training set's pixel mean and std
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(test_size: int = TEST_SIZE, split_seed: int = 0) -> Digits:
    """scikit-learn's digits (1,797 8x8 images, shipped with the package), a stratified held-out
    split, pixels standardised with the training set's statistics."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_size, random_state=split_seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def make_vit(seed: int, gblr: bool) -> nn.Module:
    """The small ViT from ``seed``; with ``gblr`` every linear but the head becomes a
    ``GaudiGBLRLinear`` ('splr' widths at location 0, sigma 1 to start the schedule)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
        mlp_ratio=2.0,
    )
    if gblr:
        effnn.swap_linear(model, effnn.GBLRConfig(init="random", sigma=1.0), target_modules="all-linear")
    return model


def train(
    model: nn.Module, data: Digits, seed: int, epochs: int, *, target_width: float, thres: float = 1.0,
    batch_size: int = 64, lr: float = 2e-3, structure_lr: float = 2e-3, weight_decay: float = 0.05,
) -> dict[str, list[float]]:
    """AdamW, cosine schedule with one warm-up epoch; for a GBLR model also the sigma schedule
    (1 -> 100 over the first 80 % of the epochs) and the targeted soft-shrink after every step.
    Returns the per-epoch mean training loss and, for GBLR, the mean width after each epoch."""
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    is_gblr = bool(gblr_layers(model))
    groups = gblr_param_groups(model, weight_decay, structure_lr) if is_gblr else model.parameters()
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    sigma = SigmaSchedule(1.0, 100.0, start=0, end=max(1, int(0.8 * epochs)))
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "mean_width": []}
    for epoch in range(epochs):
        model.train()
        if is_gblr:
            sigma.apply(model, epoch)
        order = torch.randperm(n, generator=generator)
        total_loss = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if is_gblr:
                soft_shrink_widths(model, lr=optimizer.param_groups[-1]["lr"], thres=thres,
                                   target_width=target_width)
            total_loss += loss.item() * len(idx)
        history["loss"].append(total_loss / n)
        if is_gblr:
            history["mean_width"].append(mean_width(model))
    return history


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def layer_costs(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, learned multiply-adds per token (official count, eval mode), dense in * out)."""
    model.eval()
    return [(name, m.macs_per_token(), m.in_features * m.out_features)
            for name, m in model.named_modules() if isinstance(m, effnn.GaudiGBLRLinear)]


def run(seed: int, epochs: int, target_width: float, data: Digits | None = None) -> dict:
    data = data or load_digits()
    out: dict = {}
    for variant in ("dense", "gblr"):
        model = make_vit(seed, gblr=variant == "gblr")
        t0 = time.perf_counter()
        history = train(model, data, seed, epochs, target_width=target_width)
        out[variant] = {
            "history": history,
            "seconds": time.perf_counter() - t0,
            "accuracy": accuracy(model, data.x_test, data.y_test),
            "macs": model_macs(model.eval(), data.x_test[:1]),
            "model": model,
        }
    out["layers"] = layer_costs(out["gblr"]["model"])
    return out


def report(result: dict) -> str:
    dense, gblr = result["dense"], result["gblr"]
    lines = [
        f"held-out accuracy: dense {100 * dense['accuracy']:.2f}%, GBLR {100 * gblr['accuracy']:.2f}%",
        f"multiply-adds per image: dense {dense['macs']:,}, GBLR {gblr['macs']:,} "
        f"({100 * gblr['macs'] / dense['macs']:.1f}% of dense; GBLR layers at the official count)",
        f"mean width after each epoch: {', '.join(f'{w:.3f}' for w in gblr['history']['mean_width'])}",
        f"training time: dense {dense['seconds']:.0f} s, GBLR {gblr['seconds']:.0f} s",
        "",
        "| layer | learned MACs/token | dense MACs/token | share |",
        "|---|---:|---:|---:|",
    ]
    for name, macs, full in result["layers"]:
        lines.append(f"| {name} | {macs:,} | {full:,} | {100 * macs / full:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--target-width", type=float, default=0.125,
                        help="network mean width the proximal step drives to (0.125: ~25%% of dense)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the model is small, and extra threads only "
                             "wait on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits()
    for seed in args.seeds:
        print(f"seed {seed}, {args.epochs} epochs, target mean width {args.target_width}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(report(run(seed, args.epochs, args.target_width, data)))


if __name__ == "__main__":
    main()
