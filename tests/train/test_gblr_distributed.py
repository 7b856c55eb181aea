"""GaudiGBLRLinear trains under DDP and FSDP2 with the same gradients and parameters as one
process (STANDARDS 10), the proximal step on the widths included (under FSDP2 the widths are
sharded one row per rank, so the step works on the whole tensor). The launch helpers are those of tests/integration/test_distributed.py."""

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



def _fsdp2_worker(rank: int, tmp: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    with torch.device("meta"):
        model = make_model()
    mesh = init_device_mesh("cpu", (2,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    assert isinstance(model[0].widths, DTensor)
    # rank 0 holds the checkpoint (parameters and the sigma/frequency buffers); others receive it
    full_sd = torch.load(tmp / "init.pt", weights_only=True) if rank == 0 else {}
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    xs, ys = make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = None
    for x, y in zip(local_half(xs, rank), local_half(ys, rank), strict=True):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if grads is None:
            grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        optimizer.step()
    params = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    soft_shrink_widths(model, lr=0.05, thres=1.0, target_width=0.2)
    shrunk = {n: p.full_tensor().clone() for n, p in model.named_parameters() if n.endswith("widths")}
    torch.save({"grads": grads, "params": params, "shrunk": shrunk}, tmp / f"rank{rank}.pt")


def test_fsdp2_matches_one_process(tmp_path):
    """Built on meta, sharded (widths (2, K): one row per rank), loaded by broadcast from rank 0:
    the same gradients and SGD steps as one process, and the same widths after the proximal
    step."""
    model = make_model()
    torch.save(model.state_dict(), tmp_path / "init.pt")
    results = run_workers(_fsdp2_worker, tmp_path)
    xs, ys = make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_grads = None
    for x, y in zip(xs, ys, strict=True):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if ref_grads is None:
            ref_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
    for rank, res in enumerate(results):
        for name, g in ref_grads.items():
            torch.testing.assert_close(res["grads"][name], g, **TOL, msg=f"rank {rank}: grad of {name}")
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["params"][name], p.detach(), **TOL, msg=f"rank {rank}: {name}")
    soft_shrink_widths(model, lr=0.05, thres=1.0, target_width=0.2)
    expected = {n: p.detach() for n, p in model.named_parameters() if n.endswith("widths")}
    wrong = [f"rank {rank}: {name}" for rank, res in enumerate(results) for name, w in expected.items()
             if not torch.allclose(res["shrunk"][name], w, **{"rtol": TOL["rtol"], "atol": TOL["atol"]})]
    assert not wrong, f"soft_shrink_widths on FSDP2-sharded widths differs from one process: {wrong}"
