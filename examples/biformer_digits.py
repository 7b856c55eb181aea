"""A reduced BiFormer trained on scikit-learn's digits, on the CPU.

The model is :class:`effnn.models.BiFormer` with the official block structure (conv stem, depthwise
position conv, pre-norm bi-level routing attention with LCE, MLP, a last stage of full attention
with LePE, BatchNorm and mean-pooled head), shrunk to the digits' scale:

- the 8x8 images are upsampled (bilinear) to 32x32 and cut by the stem into an 8x8 token map;
- stage 1: 32 channels, 2 blocks of ``BiLevelRoutingAttention`` with 4x4 regions of 2x2 tokens
  (``n_win=4``), each query region attending to its ``topk=4`` most affine regions;
- stage 2: 64 channels on a 4x4 map, 2 blocks of full attention with LePE (``AttentionLePE``).

It trains with AdamW and a cosine schedule on a fixed stratified split (1347 training / 450 test
images) and prints the test accuracy.

Run it (about 2 minutes on 2 busy cores with one thread; nothing is downloaded)::

    python examples/biformer_digits.py --threads 1

``tests/integration/test_biformer_digits.py`` runs a shortened version (:func:`train` with a few
steps) and checks that the loss falls.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from effnn.models import BiFormer


@dataclass(frozen=True)
class Config:
    image_size: int = 32
    embed_dim: tuple[int, ...] = (32, 64)
    depth: tuple[int, ...] = (2, 2)
    topks: tuple[int, ...] = (4, -2)  # -2: full attention with LePE (the official stage 4)
    n_win: int = 4
    head_dim: int = 16
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    drop_path_rate: float = 0.1
    max_steps: int | None = None  # stop early (the shortened run of the tests)


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(image_size: int = 32, test_size: float = 0.25) -> Data:
    """scikit-learn's 1797 8x8 digits as (N, 1, image_size, image_size) float tensors (bilinear
    upsampling, standardised with the training split's mean and std); a fixed stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=0
    )

    def images(a) -> Tensor:
        t = torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8)
        return F.interpolate(t, size=image_size, mode="bilinear", align_corners=False)

    x_train, x_test = images(x_train), images(x_test)
    mean, std = x_train.mean(), x_train.std()
    return Data((x_train - mean) / std, torch.tensor(y_train), (x_test - mean) / std, torch.tensor(y_test))


def build_model(cfg: Config, seed: int = 0) -> BiFormer:
    torch.manual_seed(seed)
    return BiFormer(
        depth=cfg.depth, embed_dim=cfg.embed_dim, mlp_ratios=(3,) * len(cfg.depth), topks=cfg.topks,
        head_dim=cfg.head_dim, n_win=cfg.n_win, drop_path_rate=cfg.drop_path_rate, in_chans=1,
        num_classes=10,
    )


@torch.no_grad()
def accuracy(model: BiFormer, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum(
        (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def train(cfg: Config = Config(), seed: int = 0, data: Data | None = None, log: bool = False) -> dict:
    """Train the reduced BiFormer; returns ``{"losses": per-step training losses, "test_accuracy",
    "steps", "seconds"}``."""
    data = data if data is not None else load_digits(cfg.image_size)
    model = build_model(cfg, seed)
    steps_per_epoch = math.ceil(len(data.x_train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    while len(losses) < total:
        model.train()
        order = torch.randperm(len(data.x_train), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if len(losses) == total:
                break
        if log:
            epoch = math.ceil(len(losses) / steps_per_epoch)
            print(f"epoch {epoch:3d}  loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    acc = accuracy(model, data.x_test, data.y_test)
    return {"losses": losses, "test_accuracy": acc, "steps": len(losses),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (1 is much faster on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(epochs=args.epochs)
    data = load_digits(cfg.image_size)
    params = sum(p.numel() for p in build_model(cfg, args.seed).parameters())
    print(f"reduced BiFormer: {params} parameters; {len(data.x_train)} training / "
          f"{len(data.x_test)} test images, {cfg.image_size}x{cfg.image_size}")
    result = train(cfg, args.seed, data, log=True)
    print(f"test accuracy: {result['test_accuracy']:.4f} ({result['steps']} steps, "
          f"{result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
