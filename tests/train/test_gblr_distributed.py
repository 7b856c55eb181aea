"""GaudiGBLRLinear trains under DDP with the same gradients and parameters as one process, the
proximal step on the widths included (STANDARDS 10); the launch helpers are those of
tests/integration/test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from effnn.nn.gblr import GaudiGBLRLinear
from effnn.train.gblr import soft_shrink_widths
from tests.integration.test_distributed import TOL, local_half, pytestmark, run_workers  # noqa: F401

STEPS, BATCH, IN, CLASSES, SEED = 3, 8, 16, 5, 4321


def make_model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        GaudiGBLRLinear(IN, 24, sigma=2.0, width_init="unif", location_init="unif"),
        nn.GELU(),
        GaudiGBLRLinear(24, CLASSES, sigma=None, width_init="unif", location_init="unif"),
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(STEPS, BATCH, IN, generator=g), torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)


def train(model: nn.Module, params: nn.Module, xs, ys) -> tuple[dict, dict]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    first = None
    for x, y in zip(xs, ys, strict=True):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if first is None:
            first = {n: p.grad.detach().clone() for n, p in params.named_parameters()}
        optimizer.step()
        soft_shrink_widths(params, lr=0.05, thres=1.0, target_width=0.2)
    return first, {n: p.detach().clone() for n, p in params.named_parameters()}


def _ddp_worker(rank: int, tmp: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    xs, ys = make_data()
    grads, params = train(DDP(model), model, local_half(xs, rank), local_half(ys, rank))
    torch.save({"grads": grads, "params": params}, tmp / f"rank{rank}.pt")


def test_ddp_matches_one_process(tmp_path):
    results = run_workers(_ddp_worker, tmp_path)
    model = make_model()
    ref_grads, ref_params = train(model, model, *make_data())
    for rank, res in enumerate(results):
        for name, g in ref_grads.items():
            torch.testing.assert_close(res["grads"][name], g, **TOL, msg=f"rank {rank}: grad of {name}")
        for name, p in ref_params.items():
            torch.testing.assert_close(res["params"][name], p, **TOL, msg=f"rank {rank}: {name}")
    assert ref_grads["0.widths"].abs().sum() > 0
